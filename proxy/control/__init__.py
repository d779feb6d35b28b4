"""Control plane services: the watcher that installs every route table, the check and readiness gates,
the leader election, and progressive delivery (canary rollouts and the session drain).

Design rule: every state change here goes through proxy.changes and the store, and every route table
through proxy.control.watcher; nothing in control/ touches the request path."""
