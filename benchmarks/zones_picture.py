"""`python -m benchmarks.zones_picture [--out docs/img/zones-spillover.png]`: the README's spill-over picture.

Drawn from the rule itself (proxy.zones.zone_shares), not from a run: a version with four endpoints in each
of three zones, a proxy replica in zone a, and zone a's healthy endpoints dropping from four to none. Each
bar is where that replica sends its traffic; the line is the load on one of zone a's healthy endpoints
relative to a fair share of everything, which stays at 1 while the zone spills (the point of the rule).
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

from proxy.zones import zone_shares

ZONES = ("a", "b", "c")
PER_ZONE = 4
COLOURS = {"a": "#4e79a7", "b": "#f28e2b", "c": "#59a14f"}
OUT = Path(__file__).resolve().parents[1] / "docs" / "img" / "zones-spillover.png"


def steps() -> list[tuple[int, dict[str, Fraction]]]:
    total = dict.fromkeys(ZONES, PER_ZONE)
    return [(h, zone_shares("a", {**total, "a": h}, total)) for h in range(PER_ZONE, -1, -1)]


def relative_load(h: int, shares: dict[str, Fraction]) -> float | None:
    """Load on one healthy endpoint of zone a when every replica applies the rule (replicas in b and c stay
    local: their zones are whole), over the fair load (all traffic / all healthy endpoints)."""
    if h == 0:
        return None
    per_zone_traffic = Fraction(1, len(ZONES))
    on_one = per_zone_traffic * shares.get("a", Fraction(0)) / h
    fair = Fraction(1, h + PER_ZONE * (len(ZONES) - 1))
    return float(on_one / fair)


def draw(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = steps()
    labels = [f"{h} of {PER_ZONE}" for h, _ in data]
    fig, (ax, low) = plt.subplots(2, 1, figsize=(8, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    bottom = [0.0] * len(data)
    for z in ZONES:
        vals = [float(s.get(z, 0)) * 100 for _, s in data]
        label = f"zone {z}" + (" (the proxy's)" if z == "a" else "")
        ax.bar(labels, vals, bottom=bottom, color=COLOURS[z], label=label, width=0.6)
        for i, v in enumerate(vals):
            if v >= 6:
                ax.text(i, bottom[i] + v / 2, f"{v:.0f}%", ha="center", va="center", color="white", fontsize=9)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_ylabel("share of the replica's\ntraffic (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 1.13), ncol=3, fontsize=8, frameon=False)
    loads = [relative_load(h, s) for h, s in data]
    xs = [i for i, v in enumerate(loads) if v is not None]
    low.plot(xs, [loads[i] for i in xs], "o-", color=COLOURS["a"])
    low.set_ylim(0, 2)
    low.set_yticks([0, 1, 2])
    low.set_ylabel("load on a zone-a\nendpoint / fair")
    low.set_xlabel("healthy endpoints of the chosen version in zone a (zones b and c: 4 of 4)")
    low.text(len(data) - 1, 1, "none left:\nall elsewhere", ha="center", va="center", fontsize=8)
    fig.suptitle("Zone-aware routing: a proxy in zone a as its zone weakens", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    for h, s in steps():
        print(f"zone a {h} of {PER_ZONE} healthy: " + ", ".join(f"{z} {s.get(z, 0)}" for z in ZONES))
    draw(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
