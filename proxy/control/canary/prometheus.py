"""Where a rollout's numbers come from when it names a Prometheus server: the PromQL for each side of the
comparison and the client that runs it.

Design rule: a Prometheus window is the same Window as this proxy's counters give, so the verdict
(proxy.control.canary.analysis) does not know where its numbers came from."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from proxy.control.canary.analysis import Window

# Metric names as proxy.telemetry.metrics exports them (queried when a rollout uses --prometheus).
PROM_REQUESTS = "turnout_requests_total"
PROM_DURATION_BUCKET = "turnout_request_duration_seconds_bucket"
PROM_UPSTREAM_ERRORS = "turnout_upstream_errors_total"
PROM_FALLBACKS = "turnout_fallbacks_total"
PROM_GRPC = "turnout_grpc_responses_total"
# The default settings.grpc_error_codes (a query cannot read the proxy's settings).
PROM_GRPC_ERRORS = "2|4|12|13|14|15"
# Prometheus rejects ranges below its scrape resolution poorly; a whole second is the smallest we ask for.
PROM_MIN_RANGE = 1
PROM_TIMEOUT = 10.0


def _prom_regex(names: Iterable[str]) -> str:
    # Version names are [A-Za-z0-9._-]; only '.' is special in a regex, and PromQL strings escape '\'.
    return "|".join(sorted(n.replace(".", "\\\\.") for n in names))


def prometheus_queries(route: str, versions: Iterable[str], seconds: float) -> dict[str, str]:
    """PromQL for one side of the comparison over the last `seconds`: requests, errors, p99 (p50, p90).

    Errors as proxy.control.canary.analysis.counters_of counts them: 5xx answers, gRPC responses with an error
    status (the default grpc_error_codes) plus requests moved away down the route's fallback chain (also
    counted as requests of the version), all on this route only.
    """
    sel = f'route="{route}",version=~"{_prom_regex(versions)}"'
    rng = f"[{max(PROM_MIN_RANGE, round(seconds))}s]"
    fsel = f'route="{route}",from_version=~"{_prom_regex(versions)}"'
    return {
        "requests": f"(sum(increase({PROM_REQUESTS}{{{sel}}}{rng})) or vector(0))"
                    f" + (sum(increase({PROM_FALLBACKS}{{{fsel}}}{rng})) or vector(0))",
        "errors": f'(sum(increase({PROM_REQUESTS}{{{sel},code=~"5.."}}{rng})) or vector(0))'
                  f' + (sum(increase({PROM_GRPC}{{{sel},grpc_status=~"{PROM_GRPC_ERRORS}"}}{rng})) or vector(0))'
                  f" + (sum(increase({PROM_FALLBACKS}{{{fsel}}}{rng})) or vector(0))",
        "p99": f"histogram_quantile(0.99, sum by (le) (rate({PROM_DURATION_BUCKET}{{{sel}}}{rng})))",
        # For the judge's rules on other quantiles (proxy.control.canary.judge).
        "p50": f"histogram_quantile(0.5, sum by (le) (rate({PROM_DURATION_BUCKET}{{{sel}}}{rng})))",
        "p90": f"histogram_quantile(0.9, sum by (le) (rate({PROM_DURATION_BUCKET}{{{sel}}}{rng})))",
    }


def parse_prometheus_value(body: Any) -> float | None:
    """The single number of an instant-query response; None for no series or NaN. Raises on an error body."""
    if not isinstance(body, Mapping) or body.get("status") != "success":
        err = body.get("error") if isinstance(body, Mapping) else None
        raise ValueError(f"prometheus query failed: {err if err else repr(body)}")
    data = body.get("data") or {}
    result = data.get("result")
    if data.get("resultType") == "scalar":
        result = [{"value": result}]
    if not isinstance(result, list) or not result:
        return None
    value = float(result[0]["value"][1])
    return None if math.isnan(value) else value  # NaN: histogram_quantile over no requests


class PrometheusSource:
    """Reads both windows from a Prometheus server's HTTP API instead of this proxy's own counters."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def __repr__(self) -> str:
        return f"<PrometheusSource {self.url}>"

    async def window(self, route: str, versions: Iterable[str], seconds: float) -> Window:
        import aiohttp

        queries = prometheus_queries(route, versions, seconds)
        values: dict[str, float | None] = {}
        timeout = aiohttp.ClientTimeout(total=PROM_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for name, q in queries.items():
                async with session.get(f"{self.url}/api/v1/query", params={"query": q}) as resp:
                    values[name] = parse_prometheus_value(await resp.json(content_type=None))
        return Window(round(values["requests"] or 0), round(values["errors"] or 0), values["p99"], values["p50"],
                      values["p90"])
