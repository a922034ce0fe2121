"""Draw docs/fanout.png from the fan-out benchmark's results.

.venv/bin/pip install -e '.[bench]'     # matplotlib
python bench/plot_fanout.py [bench/results/fanout.json] [docs/fanout.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RELAY, RAW, NAIVE = "#1f77b4", "#999999", "#d62728"


def load(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def label(scenario: dict[str, Any]) -> str:
    s = scenario["scenario"]
    if s["sessions"] == 1:
        return f"1 session\n× {s['per_session']:,} subs\n{s['rate']:g} tok/s"
    return f"{s['sessions']:,} sessions\n× {s['per_session']} subs\n{s['rate']:g} tok/s each"


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    scenarios = result["scenarios"]
    names = [label(s) for s in scenarios]
    x = list(range(len(scenarios)))
    width = 0.38
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    fig.suptitle(
        "Fan-out through one relay process (2 shared cores, loopback) — medians of "
        f"{result['settings']['runs']} runs",
        fontsize=13,
    )

    ax = axes[0][0]
    relay = [s["relay"]["server_cpu_us_per_frame"] for s in scenarios]
    raw = [s["raw_broadcast"]["server_cpu_us_per_frame"] for s in scenarios]
    ax.bar([i - width / 2 for i in x], relay, width, color=RELAY, label="relay")
    ax.bar([i + width / 2 for i in x], raw, width, color=RAW, label="raw websockets.broadcast, no Redis")
    for i, (a, scenario) in enumerate(zip(relay, scenarios, strict=True)):
        # The median of the per-run ratios, as docs/BENCHMARKS.md reports it.
        ratio = scenario["relay_cpu_per_frame_vs_raw"]
        ax.annotate(f"{ratio:.2f}×", (i - width / 2, a), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, names)
    ax.set_ylabel("server CPU-µs per delivered frame")
    ax.set_title("Cost per delivered frame (lower is better; ratio = relay ÷ raw)")
    ax.legend(loc="upper left", fontsize=9)

    ax = axes[0][1]
    third = 0.27
    series = (
        ([s["relay"]["token_deliveries_per_second"] for s in scenarios], RELAY, "relay: token deliveries/s"),
        (
            [s["relay"]["frames_per_second"] for s in scenarios],
            "#aec7e8",
            "relay: frames/s (merged when behind)",
        ),
        ([s["raw_broadcast"]["frames_per_second"] for s in scenarios], RAW, "raw broadcast: frames/s"),
    )
    for n, (values, color, name) in enumerate(series):
        ax.bar([i + (n - 1) * third for i in x], values, third, color=color, label=name)
    ax.set_yscale("log")
    ax.set_ylim(top=max(max(values) for values, _, _ in series) * 6)
    ax.set_xticks(x, names)
    ax.set_ylabel("per second (log)")
    ax.set_title("Delivered at each scenario's token rate")
    ax.legend(loc="upper left", fontsize=9)

    ax = axes[1][0]
    for key, style in (("latency_ms_p50", "o-"), ("latency_ms_p99", "s--")):
        ax.plot(x, [s["relay"][key] for s in scenarios], style, color=RELAY, label=f"relay {key[-3:]}")
        ax.plot(x, [s["raw_broadcast"][key] for s in scenarios], style, color=RAW, label=f"raw {key[-3:]}")
    ax.axhline(25, color="black", linewidth=0.8, linestyle=":", label="target p99 (1,000 subscribers)")
    ax.set_yscale("log")
    ax.set_xticks(x, names)
    ax.set_ylabel("append → receipt, ms (log)")
    ax.set_title("Latency of the oldest token in each frame")
    ax.legend(loc="upper left", fontsize=9, ncol=2)

    ax = axes[1][1]
    sweeps = result.get("sustained", {})
    for kind, color in (("relay", RELAY), ("naive", NAIVE)):
        for sweep in sweeps.get(kind, []):
            steps = sweep["steps"]
            offered = [step["rate"] * sweep["subscribers"] for step in steps]
            got = [step["token_deliveries_per_second"] for step in steps]
            marker = "o" if kind == "relay" else "^"
            name = f"{kind}, {sweep['subscribers']:,} subscribers"
            alpha = 1.0 if sweep["subscribers"] == 1000 else 0.45
            ax.plot(offered, got, marker + "-", color=color, alpha=alpha)
            ax.scatter(
                [o for o, s in zip(offered, steps, strict=True) if not s["sustained"]],
                [g for g, s in zip(got, steps, strict=True) if not s["sustained"]],
                s=90,
                facecolors="none",
                edgecolors="black",
            )
            ax.plot([], [], marker + "-", color=color, alpha=alpha, label=name)
    ax.plot([], [], "o", markerfacecolor="none", markeredgecolor="black", label="not sustained")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered token deliveries/s (tokens/s × subscribers)")
    ax.set_ylabel("received token deliveries/s")
    ax.set_title("Sustained throughput: shared reader vs XREAD per subscriber")
    ax.legend(loc="upper left", fontsize=9)

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print("wrote", out)


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "results" / "fanout.json"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "docs" / "fanout.png"
    plot(load(source), out)


if __name__ == "__main__":
    main()
