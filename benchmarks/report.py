"""Results on disk: the JSON document (and its validator), a Markdown summary, and the PNG chart.

The JSON is the record; Markdown and PNG are derived from it alone, so a result file from an earlier run
can be re-rendered (`python -m benchmarks --render FILE.json`). NaN never reaches the JSON: a value that
could not be measured is null.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SCHEMA = "turnout-benchmark/1"
SCENARIO_NAMES = ("throughput", "latency", "pins", "memory", "change_safety", "rollback")
STATUSES = ("ok", "skipped", "failed")
PROXIES = ("turnout", "haproxy", "nginx")
COLORS = {"direct": "#9e9e9e", "turnout": "#1f77b4", "haproxy": "#d62728", "nginx": "#2ca02c"}


def clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


# Validation: what a well-formed result holds (used by tests/bench and before writing)

def _num(doc: Any, where: str, path: str, problems: list[str], positive: bool = False,
         nullable: bool = False) -> None:
    """Check the number at `path` (dotted keys) inside `doc`; problems name the full path `where.path`."""
    cur = doc
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            problems.append(f"{where}.{path}: missing")
            return
        cur = cur[part]
    if cur is None and nullable:
        return
    if isinstance(cur, bool) or not isinstance(cur, int | float) or not math.isfinite(cur):
        problems.append(f"{where}.{path}: expected a finite number, got {cur!r}")
    elif positive and cur <= 0:
        problems.append(f"{where}.{path}: expected > 0, got {cur!r}")


def validate(doc: Any) -> list[str]:
    """Every way `doc` is not a well-formed result (empty: fine). Never judges speed."""
    p: list[str] = []
    if not isinstance(doc, dict):
        return ["document: expected an object"]
    if doc.get("schema") != SCHEMA:
        p.append(f"schema: expected {SCHEMA!r}, got {doc.get('schema')!r}")
    for key in ("date", "machine", "plan", "scenarios"):
        if key not in doc:
            p.append(f"{key}: missing")
    if not isinstance(doc.get("quick"), bool):
        p.append("quick: expected true or false")
    scenarios = doc.get("scenarios")
    if not isinstance(scenarios, dict):
        return [*p, "scenarios: expected an object"]
    for name in SCENARIO_NAMES:
        s = scenarios.get(name)
        if not isinstance(s, dict):
            p.append(f"scenarios.{name}: missing")
            continue
        status = s.get("status")
        if status not in STATUSES:
            p.append(f"scenarios.{name}.status: expected one of {STATUSES}, got {status!r}")
        elif status != "ok":
            if not isinstance(s.get("reason"), str) or not s["reason"]:
                p.append(f"scenarios.{name}.reason: a {status} scenario must say why")
        else:
            _NUMBERS[name](s, f"scenarios.{name}", p)
    return p


def _targets(s: dict[str, Any], where: str, p: list[str]) -> dict[str, dict[str, Any]]:
    targets = s.get("targets")
    if not isinstance(targets, dict) or not targets:
        p.append(f"{where}.targets: expected a non-empty object")
        return {}
    out = {}
    for name, t in targets.items():
        if not isinstance(t, dict) or t.get("status") not in STATUSES:
            p.append(f"{where}.targets.{name}.status: missing or invalid")
        elif t["status"] != "ok":
            if not t.get("reason"):
                p.append(f"{where}.targets.{name}.reason: missing")
        else:
            out[name] = t
    return out


def _check_throughput(s: dict[str, Any], where: str, p: list[str]) -> None:
    targets = _targets(s, where, p)
    if "direct" not in targets:
        p.append(f"{where}.targets.direct: the baseline must have run")
    for name, t in targets.items():
        tw = f"{where}.targets.{name}"
        _num(t, tw, "median.rps", p, positive=True)
        if name != "direct":
            for k in ("cpu_us", "cpu_user_us", "cpu_sys_us"):
                _num(t, tw, f"median.{k}", p, positive=k == "cpu_us")
        for k in ("socket_errors", "non_2xx"):
            _num(t, tw, f"median.{k}", p)
    for kind in ("rps", "cpu_us"):
        for r in ("turnout/haproxy", "turnout/nginx"):
            _num(s, where, f"ratios.{kind}.{r}", p, nullable=True)


def _check_latency(s: dict[str, Any], where: str, p: list[str]) -> None:
    _num(s, where, "basis_rps", p, positive=True)
    levels = s.get("levels")
    if not isinstance(levels, list) or not levels:
        p.append(f"{where}.levels: expected a non-empty list")
        return
    for i, lv in enumerate(levels):
        lw = f"{where}.levels[{i}]"
        _num(lv, lw, "rate", p, positive=True)
        targets = lv.get("targets", {})
        if "direct" not in targets:
            p.append(f"{lw}.targets.direct: missing")
        for name, t in targets.items():
            tw = f"{lw}.targets.{name}"
            _num(t, tw, "p50_ms", p, positive=True)
            _num(t, tw, "p99_ms", p, positive=True)
            if name != "direct":
                _num(t, tw, "added_p50_ms", p)
                _num(t, tw, "added_p99_ms", p)


def _check_pins(s: dict[str, Any], where: str, p: list[str]) -> None:
    configs = s.get("configs")
    if not isinstance(configs, dict) or len(configs) != 2:
        p.append(f"{where}.configs: expected two pin counts")
        return
    for key, c in configs.items():
        _num(c, f"{where}.configs.{key}", "cpu_us", p, positive=True)
        _num(c, f"{where}.configs.{key}", "rps", p, positive=True)
    _num(s, where, "cpu_ratio_large_over_small", p, positive=True)


def _check_memory(s: dict[str, Any], where: str, p: list[str]) -> None:
    for name, t in _targets(s, where, p).items():
        tw = f"{where}.targets.{name}"
        for k in ("idle.rss_before_mib", "idle.rss_mib", "stream.rss_before_mib", "stream.rss_peak_mib"):
            _num(t, tw, k, p, positive=True)
        _num(t, tw, "idle.answered", p)
        _num(t, tw, "stream.body_bytes", p, positive=True)


def _check_change_safety(s: dict[str, Any], where: str, p: list[str]) -> None:
    for k in ("rate", "changes", "non_2xx", "socket_errors", "admin.ok", "load.sent"):
        _num(s, where, k, p)
    if not isinstance(s.get("passed"), bool):
        p.append(f"{where}.passed: expected true or false")


def _check_rollback(s: dict[str, Any], where: str, p: list[str]) -> None:
    modes = s.get("modes")
    if not isinstance(modes, dict) or not modes:
        p.append(f"{where}.modes: expected a non-empty object")
        return
    for name, m in modes.items():
        if not isinstance(m, dict) or m.get("status") not in STATUSES:
            p.append(f"{where}.modes.{name}.status: missing or invalid")
        elif m["status"] == "ok":
            _num(m, f"{where}.modes.{name}", "trials", p, positive=True)
            for k in ("first_p50_ms", "first_p99_ms", "all_p50_ms", "all_p99_ms"):
                _num(m, f"{where}.modes.{name}", k, p, positive=True)
        elif not m.get("reason"):
            p.append(f"{where}.modes.{name}.reason: missing")


_NUMBERS = {"throughput": _check_throughput, "latency": _check_latency, "pins": _check_pins,
            "memory": _check_memory, "change_safety": _check_change_safety, "rollback": _check_rollback}


# Markdown

def _f(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _short(reason: Any, limit: int = 200) -> str:
    """First line of a reason (a start failure carries the server's log tail, kept in the JSON)."""
    text = str(reason).strip().splitlines()[0].replace("|", "/") if reason else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _x(r: Any) -> str:
    return "-" if r is None else f"{r:.2f}x"


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    sc = doc["scenarios"]
    lines = [
        f"# turnout benchmark, {doc['date']}" + (" (quick: checks the harness, numbers mean little)"
                                                  if doc["quick"] else ""),
        "",
        f"Machine: {m.get('cpus')} CPUs, {m.get('kernel')}, Python {m.get('python')}; "
        f"{m.get('haproxy')}; {m.get('nginx')}; {m.get('wrk')}. Proxies pinned to core {m.get('proxy_core')}, "
        f"load and backends on core {m.get('load_core')}. Load average (1/5/15 min) at start "
        f"{m.get('load_average_at_start')}, at end {m.get('load_average_at_end')}: a busy machine makes "
        "absolute numbers meaningless. Read the ratios (same run, interleaved).",
        "",
    ]

    def skipped(s: dict[str, Any]) -> list[str]:
        return [f"*{s['status']}: {_short(s.get('reason'))}*", ""]

    s = sc["throughput"]
    lines += ["## 1-2. Closed-loop throughput and CPU per request (wrk -t1 -c32, keep-alive)", ""]
    if s["status"] != "ok":
        lines += skipped(s)
    else:
        lines += ["| target | req/s (median) | CPU µs/req | user | sys | errors |", "|---|---|---|---|---|---|"]
        for name, t in s["targets"].items():
            if t["status"] != "ok":
                lines.append(f"| {name} | {t['status']}: {_short(t.get('reason'))} | | | | |")
                continue
            md = t["median"]
            lines.append(f"| {name} | {_f(md['rps'], 0)} | {_f(md.get('cpu_us'))} | {_f(md.get('cpu_user_us'))} | "
                         f"{_f(md.get('cpu_sys_us'))} | {md['socket_errors'] + md['non_2xx']} |")
        r = s["ratios"]
        lines += ["", f"turnout/HAProxy: throughput {_x(r['rps']['turnout/haproxy'])}, CPU per request "
                  f"{_x(r['cpu_us']['turnout/haproxy'])}; turnout/nginx: throughput {_x(r['rps']['turnout/nginx'])}, "
                  f"CPU per request {_x(r['cpu_us']['turnout/nginx'])}.", ""]
        tm = s.get("turnout_metrics")
        if tm:
            lines += [f"turnout's /metrics answered {tm.get('status')} with {tm.get('turnout_series', 0)} "
                      "`turnout_*` samples after these runs (metrics were on while it was measured).", ""]

    s = sc["latency"]
    lines += ["## 3. Latency added over direct, open loop at fixed rates", ""]
    if s["status"] != "ok":
        lines += skipped(s)
    else:
        lines += [f"Rates are fractions of {s['rate_basis']}'s closed-loop maximum ({_f(s['basis_rps'], 0)} req/s).",
                  "", "| rate | target | p50 ms | p99 ms | added p50 ms | added p99 ms | rate reached |",
                  "|---|---|---|---|---|---|---|"]
        for lv in s["levels"]:
            for name, t in lv["targets"].items():
                lines.append(f"| {lv['fraction']:.0%} ({_f(lv['rate'], 0)}/s) | {name} | {_f(t['p50_ms'], 3)} | "
                             f"{_f(t['p99_ms'], 3)} | {_f(t.get('added_p50_ms'), 3)} | {_f(t.get('added_p99_ms'), 3)} "
                             f"| {'yes' if t['rate_reached'] else 'NO'} |")
        lines.append("")

    s = sc["pins"]
    lines += ["## 4. Routing cost: few vs many pins (turnout)", ""]
    if s["status"] != "ok":
        lines += skipped(s)
    else:
        lines += ["| pins | req/s | CPU µs/req | startup s |", "|---|---|---|---|"]
        for c in s["configs"].values():
            lines.append(f"| {c['pins']:,} | {_f(c['rps'], 0)} | {_f(c['cpu_us'])} | {_f(c['startup_seconds'], 2)} |")
        lines += ["", f"CPU per request, many/few pins: {_x(s['cpu_ratio_large_over_small'])}.", ""]

    s = sc["memory"]
    lines += ["## 5. Memory (RSS of the proxy's processes)", ""]
    if s["status"] != "ok":
        lines += skipped(s)
    else:
        lines += [f"| proxy | idle RSS MiB | with {s['idle_connections']:,} idle conns | KiB/conn | answered | "
                  "streaming 100 MB: peak MiB | growth MiB |", "|---|---|---|---|---|---|---|"]
        for name, t in s["targets"].items():
            if t["status"] != "ok":
                lines.append(f"| {name} | {t['status']}: {_short(t.get('reason'))} | | | | | |")
                continue
            i, st = t["idle"], t["stream"]
            lines.append(f"| {name} | {_f(i['rss_before_mib'])} | {_f(i['rss_mib'])} | {_f(i['kib_per_connection'])} | "
                         f"{i['answered']:,} | {_f(st['rss_peak_mib'])} | {_f(st['growth_mib'])} |")
        lines.append("")

    s = sc["change_safety"]
    lines += ["## 6a. Split changes under load (turnout)", ""]
    if s["status"] != "ok":
        lines += skipped(s)
    else:
        lines += [f"{s['admin']['ok']:,}/{s['changes']:,} split changes through the admin API during "
                  f"{s['seconds']:g} s at {_f(s['rate'], 0)} req/s ({s['load']['sent']:,} requests): "
                  f"**{s['non_2xx']} non-2xx, {s['socket_errors']} socket errors** (target 0: "
                  f"{'met' if s['passed'] else 'NOT met'}). Admin call p50 {_f(s['admin']['call_p50_ms'], 2)} ms, "
                  f"p99 {_f(s['admin']['call_p99_ms'], 2)} ms.", ""]

    s = sc["rollback"]
    lines += ["## 6b. Rollback latency: admin call → first request served by the restored version", ""]
    if s["status"] != "ok":
        lines += skipped(s)
    else:
        lines += ["| mode | trials | first poller p50 / p99 ms | all pollers p50 / p99 ms | admin call p50 ms "
                  "| all pollers p99 without the first 5 trials | first 5 trials (all pollers, ms) |",
                  "|---|---|---|---|---|---|---|"]
        for name, mo in s["modes"].items():
            if mo["status"] != "ok":
                lines.append(f"| {name} | {mo['status']}: {_short(mo.get('reason'))} | | | | | |")
                continue
            first = ", ".join(_f(x, 1) for x in mo.get("first_trials_all_ms") or [])
            lines.append(f"| {name} | {mo['trials']} | {_f(mo['first_p50_ms'], 2)} / {_f(mo['first_p99_ms'], 2)} | "
                         f"{_f(mo['all_p50_ms'], 2)} / {_f(mo['all_p99_ms'], 2)} | {_f(mo['admin_call_p50_ms'], 2)} "
                         f"| {_f(mo.get('warm_all_p99_ms'), 2)} | {first} |")
        lines += ["", "The p99 over all trials is the number compared with the targets. In our runs the slowest "
                  "trials were the first ones after the proxy started, hence the two extra columns.", ""]
    return "\n".join(lines)


# Chart

def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = doc["scenarios"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    title = f"turnout vs HAProxy vs nginx, {doc['date']}" + (" (quick run: harness check only)" if doc["quick"] else "")
    fig.suptitle(title + " — same machine, same run, interleaved; read the ratios", fontsize=12)

    def off(ax: Any, heading: str, s: dict[str, Any]) -> bool:
        ax.set_title(heading, fontsize=10)
        if s["status"] == "ok":
            return False
        ax.text(0.5, 0.5, f"{s['status']}:\n{_wrap(_short(s.get('reason')))}", ha="center", va="center",
                fontsize=8, transform=ax.transAxes)
        ax.set_axis_off()
        return True

    def bars(ax: Any, names: list[str], values: list[float | None], fmt: str) -> None:
        vals = [v or 0.0 for v in values]
        rects = ax.bar(names, vals, color=[COLORS.get(n, "#777") for n in names])
        for rect, v in zip(rects, values, strict=True):
            ax.annotate("-" if v is None else fmt.format(v), (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                        ha="center", va="bottom", fontsize=8)

    s = sc["throughput"]
    ax = axes[0][0]
    if not off(ax, "1. Throughput, wrk -c32 keep-alive (req/s, median)", s):
        ok = {n: t for n, t in s["targets"].items() if t["status"] == "ok"}
        bars(ax, list(ok), [t["median"]["rps"] for t in ok.values()], "{:,.0f}")
        r = s["ratios"]["rps"]
        ax.set_title(f"1. Throughput, wrk -c32 keep-alive (req/s, median)\nturnout/HAProxy "
                     f"{_x(r['turnout/haproxy'])}, turnout/nginx {_x(r['turnout/nginx'])}", fontsize=10)
    ax = axes[0][1]
    if not off(ax, "2. Proxy CPU per request (µs, user + sys)", s):
        ok = {n: t for n, t in s["targets"].items() if t["status"] == "ok" and n != "direct"}
        names = list(ok)
        user = [t["median"]["cpu_user_us"] or 0 for t in ok.values()]
        system = [t["median"]["cpu_sys_us"] or 0 for t in ok.values()]
        ax.bar(names, user, color=[COLORS.get(n, "#777") for n in names], label="user")
        ax.bar(names, system, bottom=user, color=[COLORS.get(n, "#777") for n in names], alpha=0.45, label="sys")
        for i, n in enumerate(names):
            ax.annotate(_f(ok[n]["median"]["cpu_us"]), (i, user[i] + system[i]), ha="center", va="bottom",
                        fontsize=8)
        ax.legend(fontsize=8)
        r = s["ratios"]["cpu_us"]
        ax.set_title(f"2. Proxy CPU per request (µs, user + sys)\nturnout/HAProxy {_x(r['turnout/haproxy'])}, "
                     f"turnout/nginx {_x(r['turnout/nginx'])}", fontsize=10)

    s = sc["latency"]
    ax = axes[0][2]
    if not off(ax, "3. Latency added over direct, open loop (ms)", s):
        names = [n for n in PROXIES if all(n in lv["targets"] for lv in s["levels"])]
        width = 0.8 / max(len(names), 1)
        for j, n in enumerate(names):
            xs = [i + j * width for i in range(len(s["levels"]))]
            p50 = [lv["targets"][n]["added_p50_ms"] or 0 for lv in s["levels"]]
            p99 = [lv["targets"][n]["added_p99_ms"] or 0 for lv in s["levels"]]
            ax.bar(xs, p99, width, color=COLORS[n], alpha=0.35)
            ax.bar(xs, p50, width, color=COLORS[n], label=n)
            for x, lv in zip(xs, s["levels"], strict=True):
                if not lv["targets"][n]["rate_reached"]:
                    ax.annotate("over-\nloaded", (x, lv["targets"][n]["added_p99_ms"] or 0), ha="center",
                                va="bottom", fontsize=6)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(s["levels"]))])
        ax.set_xticklabels([f"{lv['fraction']:.0%}\n{lv['rate']:,.0f}/s" for lv in s["levels"]], fontsize=8)
        # One overloaded proxy adds 100x more than the others: a linear axis would flatten them all to zero.
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_ylim(top=ax.get_ylim()[1] * 5)  # room for the "overloaded" notes under the title
        ax.axhline(0, color="black", linewidth=0.5)
        ax.legend(fontsize=8, title="solid p50, pale p99", title_fontsize=7)

    s = sc["pins"]
    ax = axes[1][0]
    if not off(ax, "4. turnout routing cost: CPU µs/request by pin count", s):
        cs = list(s["configs"].values())
        rects = ax.bar([f"{c['pins']:,} pins" for c in cs], [c["cpu_us"] or 0 for c in cs], color=COLORS["turnout"])
        for rect, c in zip(rects, cs, strict=True):
            ax.annotate(_f(c["cpu_us"]), (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center",
                        va="bottom", fontsize=8)
        ax.set_title(f"4. turnout CPU µs/request by pin count (ratio {_x(s['cpu_ratio_large_over_small'])})",
                     fontsize=10)

    s = sc["memory"]
    ax = axes[1][1]
    if not off(ax, "5. RSS (MiB): idle conns / streaming 100 MB to a slow reader", s):
        ok = {n: t for n, t in s["targets"].items() if t["status"] == "ok"}
        names = list(ok)
        pos = range(len(names))
        idle = [t["idle"]["rss_mib"] for t in ok.values()]
        stream = [t["stream"]["rss_peak_mib"] for t in ok.values()]
        ax.bar([x - 0.2 for x in pos], idle, 0.4, color=[COLORS.get(n, "#777") for n in names],
               label=f"{s['idle_connections']:,} idle conns")
        ax.bar([x + 0.2 for x in pos], stream, 0.4, color=[COLORS.get(n, "#777") for n in names], alpha=0.45,
               hatch="//", label="streaming peak")
        ax.set_xticks(list(pos))
        ax.set_xticklabels(names)
        ax.legend(fontsize=8)

    ax = axes[1][2]
    cs, rb = sc["change_safety"], sc["rollback"]
    ax.set_title("6. Change safety (turnout): rollback latency (ms)", fontsize=10)
    if rb["status"] == "ok":
        ok_modes = {n: m for n, m in rb["modes"].items() if m["status"] == "ok"}
        names = list(ok_modes)
        pos = range(len(names))
        ax.bar([x - 0.2 for x in pos], [m["all_p50_ms"] for m in ok_modes.values()], 0.4, label="p50",
               color=COLORS["turnout"])
        ax.bar([x + 0.2 for x in pos], [m["all_p99_ms"] for m in ok_modes.values()], 0.4, label="p99",
               color=COLORS["turnout"], alpha=0.45)
        ax.set_xticks(list(pos))
        ax.set_xticklabels(names, fontsize=8)
        ax.set_yscale("log")  # one process answers in ms, replicas may take 100x longer
        ax.legend(fontsize=8, loc="lower right")
        missing = [f"{n}: {m['status']}" for n, m in rb["modes"].items() if m["status"] != "ok"]
        if missing:
            ax.text(0.02, 0.80, _wrap("; ".join(missing)), transform=ax.transAxes, fontsize=7)
    else:
        ax.text(0.5, 0.5, f"rollback {rb['status']}:\n{_wrap(_short(rb.get('reason')))}", ha="center", va="center",
                fontsize=8, transform=ax.transAxes)
    if cs["status"] == "ok":
        note = (f"{cs['admin']['ok']}/{cs['changes']} split changes under load at {cs['rate']:,.0f} req/s:\n"
                f"{cs['non_2xx']} non-2xx, {cs['socket_errors']} socket errors")
    else:
        note = f"split changes under load {cs['status']}: {_wrap(_short(cs.get('reason')))}"
    ax.text(0.02, 0.97, note, transform=ax.transAxes, fontsize=8, va="top")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _wrap(text: str, width: int = 60) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    lines.append(cur)
    return "\n".join(lines[:6])


def write(doc: dict[str, Any], out_dir: Path, stem: str, latest: bool) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = clean(doc)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    paths[0].write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    paths[1].write_text(markdown(doc) + "\n")
    chart(doc, paths[2])
    if latest:
        for src in paths:
            dst = out_dir / f"latest{src.suffix}"
            dst.write_bytes(src.read_bytes())
    return paths
