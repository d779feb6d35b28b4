"""Side-by-side benchmark harness: turnout vs direct vs HAProxy vs nginx, plus change-safety scenarios.

Run `python -m benchmarks [--quick]`; see the README, "Performance". Nothing here is imported by the proxy.
"""
