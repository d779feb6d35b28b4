"""Automated canary: raise a new version's share of a route step by step while its numbers hold, and roll
back at once when they do not.

Design rule: the decision is a pure function (`analyse`) of two windows of numbers (canary, baseline) over
the requests since the last step, and the limits. The controller only gathers those numbers, keeps where
each rollout stands in the store's meta (so a restarted proxy resumes it) and applies each decision through
proxy.changes.set_split, so every step and every rollback is a revision with actor "canary" and a reason that
carries the numbers it was decided on.

- analysis.py    the pure part: counters, windows, the verdict, the weights of each step
- prometheus.py  the same windows read from a Prometheus server instead of this proxy's counters
- rollout.py     the config, where a rollout stands, and how both are kept in the store's meta
- (proxy.control.leader)  which replica drives rollouts (always this one, or an etcd lease)
- controller.py  CanaryController: the loop that measures, decides and applies, and the operator commands
"""

from proxy.control.canary.analysis import (
    P99_MIN_SAMPLES,
    P99_NOISE_FLOOR,
    Analysis,
    Counters,
    Thresholds,
    Verdict,
    Window,
    analyse,
    counters_of,
    histogram_quantile,
    rollback_weights,
    step_weights,
)
from proxy.control.canary.controller import ACTOR, CanaryController, StatsSource, plan_baselines
from proxy.control.canary.prometheus import (
    PROM_DURATION_BUCKET,
    PROM_FALLBACKS,
    PROM_MIN_RANGE,
    PROM_REQUESTS,
    PROM_TIMEOUT,
    PROM_UPSTREAM_ERRORS,
    PrometheusSource,
    parse_prometheus_value,
    prometheus_queries,
)
from proxy.control.canary.rollout import (
    ACTIVE,
    DEFAULT_STEPS,
    INDEX_KEY,
    CanaryConfig,
    Rollout,
    Status,
    describe,
    load_rollout,
    load_rollouts,
    parse_config,
    rollout_from_json,
    rollout_to_json,
    save_rollout,
)
from proxy.control.leader import LEASE_TRUST, LEASE_TTL, AlwaysLeader, EtcdLeader, Leader, leader_for

__all__ = [
    "ACTIVE",
    "ACTOR",
    "DEFAULT_STEPS",
    "INDEX_KEY",
    "LEASE_TRUST",
    "LEASE_TTL",
    "P99_MIN_SAMPLES",
    "P99_NOISE_FLOOR",
    "PROM_DURATION_BUCKET",
    "PROM_FALLBACKS",
    "PROM_MIN_RANGE",
    "PROM_REQUESTS",
    "PROM_TIMEOUT",
    "PROM_UPSTREAM_ERRORS",
    "AlwaysLeader",
    "Analysis",
    "CanaryConfig",
    "CanaryController",
    "Counters",
    "EtcdLeader",
    "Leader",
    "PrometheusSource",
    "Rollout",
    "StatsSource",
    "Status",
    "Thresholds",
    "Verdict",
    "Window",
    "analyse",
    "counters_of",
    "describe",
    "histogram_quantile",
    "leader_for",
    "load_rollout",
    "load_rollouts",
    "parse_config",
    "parse_prometheus_value",
    "plan_baselines",
    "prometheus_queries",
    "rollback_weights",
    "rollout_from_json",
    "rollout_to_json",
    "save_rollout",
    "step_weights",
]
