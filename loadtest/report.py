"""Statistics over a load run, as ``vllm bench serve`` reports them, plus goodput under an SLO."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from loadtest.generator import RequestRecord

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), ``None`` for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 1.0
    tpot_s: float = 0.1


def summarize(records: Sequence[RequestRecord], seconds: float, slo: SLO | None = None) -> dict:
    """Throughput, latency percentiles (ms), goodput and errors of one run."""
    slo = slo or SLO()
    ok = [r for r in records if r.error is None and r.e2e is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    good = [r for r in ok if r.ttft is not None and r.ttft <= slo.ttft_s and (r.tpot is None or r.tpot <= slo.tpot_s)]
    series = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "itl": [x for r in ok for x in r.itl],
        "e2e": [r.e2e for r in ok],
    }
    summary: dict = {
        "requests": len(records),
        "completed": len(ok),
        "seconds": round(seconds, 3),
        "request_throughput": round(len(ok) / seconds, 3) if seconds > 0 else None,
        "output_tokens_per_s": round(out_tokens / seconds, 1) if seconds > 0 else None,
        "goodput_rps": round(len(good) / seconds, 3) if seconds > 0 else None,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "errors": dict(Counter(r.error for r in records if r.error is not None)),
        "mixes": dict(Counter(r.mix for r in records)),
    }
    for name, values in series.items():
        for q in PERCENTILES:
            p = percentile(values, q)
            summary[f"{name}_p{q}_ms"] = None if p is None else round(1000 * p, 3)
    return summary


COLUMNS = ("rate", "request_throughput", "output_tokens_per_s", "goodput_rps", "ttft_p50_ms", "ttft_p90_ms",
           "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms")  # fmt: skip


def to_markdown(runs: Sequence[dict], title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(COLUMNS) + " | errors |", "|" + "---|" * (len(COLUMNS) + 1)]
    for run in runs:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(run["errors"].items())) or "-"
        lines.append("| " + " | ".join(str(run.get(c, "")) for c in COLUMNS) + f" | {errors} |")
    return "\n".join(lines) + "\n"


def plot_sweep(results: dict[str, list[dict]], out) -> None:
    """TTFT and ITL p50 / p99 against request rate, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for system, runs in results.items():
        rates = [r["rate"] for r in runs]
        for ax, metric in zip(axes, ("ttft", "itl", "e2e"), strict=True):
            for q, style in ((50, "-o"), (99, "--x")):
                ax.plot(rates, [r[f"{metric}_p{q}_ms"] for r in runs], style, label=f"{system} p{q}")
    for ax, metric in zip(axes, ("TTFT", "inter-token latency", "end-to-end latency"), strict=True):
        ax.set(xlabel="offered load (requests/s)", ylabel="ms", title=metric, yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
