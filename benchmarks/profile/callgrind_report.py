"""Instructions per request, by function, from two callgrind runs of benchmarks.profile.hotpath (#17).

    valgrind --tool=callgrind --callgrind-out-file=A.out \
        .venv/bin/python -m benchmarks.profile.hotpath -n 20000 --repeat 1
    valgrind --tool=callgrind --callgrind-out-file=B.out \
        .venv/bin/python -m benchmarks.profile.hotpath -n 40000 --repeat 1
    .venv/bin/python -m benchmarks.profile.callgrind_report A.out B.out --requests 20000 [--top 20] [--label before]

Per request = (Ir of B - Ir of A) / the requests B ran more than A, so start-up and warm-up cancel out; the
same subtraction per function (self cost, `callgrind_annotate --inclusive=no`) gives the breakdown.
Prints Markdown; `--json FILE` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

_LINE = re.compile(r"^\s*([\d,]+)\s+\([^)]*\)\s+(.*)$")
_TOTAL = re.compile(r"^\s*([\d,]+)\s+\(100\.0%\)\s+PROGRAM TOTALS")


def functions(path: Path) -> tuple[int, dict[str, int]]:
    argv = ["callgrind_annotate", "--inclusive=no", "--auto=no", "--threshold=100", str(path)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    total, by_fn = 0, {}
    for line in out.splitlines():
        t = _TOTAL.match(line)
        if t:
            total = int(t.group(1).replace(",", ""))
            continue
        m = _LINE.match(line)
        if m and "PROGRAM TOTALS" not in line and not m.group(2).startswith("=>"):
            name = m.group(2).strip()
            name = re.sub(r"\s+\[[^\]]*\]$", "", name).split("/")[-1]
            by_fn[name] = by_fn.get(name, 0) + int(m.group(1).replace(",", ""))
    return total, by_fn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("small", type=Path)
    ap.add_argument("large", type=Path)
    ap.add_argument("--requests", type=int, required=True, help="how many more requests the large run made")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--label", default="")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    ta, fa = functions(args.small)
    tb, fb = functions(args.large)
    per = {k: (fb.get(k, 0) - fa.get(k, 0)) / args.requests for k in set(fa) | set(fb)}
    top = sorted(per.items(), key=lambda kv: -kv[1])[:args.top]
    total = (tb - ta) / args.requests
    lines = [f"## {args.label} instructions per request: {total:,.0f}", "",
             f"Ir {ta:,} ({args.small.name}) and {tb:,} ({args.large.name}), {args.requests:,} requests apart.", "",
             "| # | Ir/request | share | function (self cost) |", "|---:|---:|---:|---|"]
    for i, (name, ir) in enumerate(top, 1):
        lines.append(f"| {i} | {ir:,.0f} | {ir / total:.1%} | `{name[:110]}` |")
    print("\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps({"label": args.label, "per_request": round(total, 1), "ir_small": ta,
                                         "ir_large": tb, "requests": args.requests,
                                         "top": [{"function": n, "ir_per_request": round(v, 1)} for n, v in top]},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
