"""Control plane services: the watcher that installs every route table, the check and readiness gates,
the leader election, and progressive delivery (canary rollouts and the session drain)."""
