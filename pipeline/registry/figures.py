"""Small matplotlib figures for MLflow runs: a fit's loss curves, a job's fit times and outcomes.

Plain `matplotlib.figure.Figure`s with their own Agg canvas (no display, nothing left in pyplot's registry), drawn
one at a time per process (`png`): matplotlib is not thread-safe (pyplot's state, its mathtext parser), and a
worker with two batches in flight tracks two fits at once (a figure went missing that way). A figure that cannot
be drawn is skipped, never a failed fit or job.
"""

from __future__ import annotations

import io
import threading

_DRAWING = threading.Lock()


def png(draw) -> bytes:
    """The figure `draw()` makes, as PNG bytes, drawn and saved while no other thread of this process draws."""
    with _DRAWING:
        buffer = io.BytesIO()
        draw().savefig(buffer, format="png")
        return buffer.getvalue()


def _figure(**kwargs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(dpi=100, **kwargs)
    FigureCanvasAgg(figure)  # its own Agg canvas: drawn and saved without pyplot or a display
    return figure


def loss_figure(history: list[dict]):
    """Prediction MSE per step (raw and a 25-step moving mean) and the orthogonality loss; recalibration
    steps marked."""
    steps = range(len(history))
    mse = [h["mse"] for h in history]
    window = 25
    mean = [sum(mse[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in steps]
    figure = _figure(figsize=(6, 4))
    top, bottom = figure.subplots(2, 1, sharex=True)
    top.plot(steps, mse, color="#bbb", linewidth=0.7, label="mse")
    top.plot(steps, mean, color="#1f77b4", label=f"mse, {window}-step mean")
    top.set(ylabel="prediction MSE", yscale="log")
    bottom.plot(steps, [h["ortho"] for h in history], color="#d62728")
    bottom.set(ylabel="orthogonality", xlabel="step")
    for ax in (top, bottom):
        for step, h in enumerate(history):
            if "mask_stats" in h:
                ax.axvline(step, color="grey", linestyle=":", linewidth=0.8)
        ax.grid(alpha=0.3)
    top.legend(fontsize=7)
    top.set_title("loss (dotted: mask recalibrations)", fontsize=9)
    figure.tight_layout()
    return figure


def job_figure(rows: list[dict], run_id: str):
    """Fit time of each item fitted by this run (slowest first) and how many items ended how."""
    fitted = sorted((r["total_s"] or 0 for r in rows if r["status"] == "ok" and r.get("run_id") == run_id),
                    reverse=True)
    statuses = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "skipped")}
    from matplotlib.ticker import MaxNLocator

    figure = _figure(figsize=(8, 3.2))
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]})
    left.bar(range(1, len(fitted) + 1), fitted, color="#1f77b4")
    left.set(xlabel="fits of this run (slowest first)", ylabel="fit time (s)")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))  # fit 1, 2, 3: no 0.5
    left.grid(axis="y", alpha=0.3)
    if not fitted:  # a job whose fits all failed: say so, rather than axes of made-up ticks
        left.text(0.5, 0.5, "no fit completed in this run", ha="center", va="center", transform=left.transAxes)
        left.set_xticks([]), left.set_yticks([])
    right.bar(list(statuses), list(statuses.values()), color=["#2ca02c", "#d62728", "#999"])
    right.set(ylabel="inputs")
    right.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of inputs are whole
    right.tick_params(axis="x", labelsize=8)
    figure.suptitle(f"job {run_id}", fontsize=9)
    figure.tight_layout()
    return figure
