"""The figures the commands write: the demo's figure.png and the report's report.png (matplotlib's Agg canvas,
imported only when a figure is drawn)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Union

from nnunetv2_recokd.evaluation.tables import class_columns, report_label


def demo_figure(rows: list[dict], classes: list[str], path: Path) -> None:
    """figure.png: Dice per class per model (bars with the spread over seeds) and latency per model with its
    parameters (draw_demo_figure, saved)."""
    import matplotlib.pyplot as plt

    fig = draw_demo_figure(rows, classes)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_demo_figure(rows: list[dict], classes: list[str]):
    """The demo's figure as a matplotlib Figure. Its text never overlaps (tests/test_figures.py checks the rendered
    boxes): the legend sits below both panels, the latency panel's bars are horizontal with the model names wrapped on
    the y axis."""
    import textwrap

    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    fig, (ax_dice, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.5 + 0.35 * len(rows)))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(classes))]
        errors = [r["dice_sd"][c] for c in classes] if len(r["seeds"]) > 1 else None
        bars = ax_dice.bar(xs, [r["dice"][c] for c in classes], width, yerr=errors, capsize=3, label=r["model"])
        ax_dice.bar_label(bars, fmt="%.2f", fontsize=7)
    ax_dice.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(classes))], classes)
    ax_dice.set(ylim=(0, 1.15), ylabel="Dice", title="Dice per class")
    names = ["\n".join(textwrap.wrap(r["model"], 22)) for r in rows]
    positions = list(range(len(rows)))[::-1]  # the first model on top, as in the legend
    bars = ax_lat.barh(positions, [r["latency_ms"] for r in rows], color=[f"C{i}" for i in range(len(rows))])
    ax_lat.set_yticks(positions, names, fontsize=8)
    ax_lat.bar_label(bars, labels=[f" {r['latency_ms']:.0f} ms, {r['params'] / 1e6:.2f} M params" for r in rows],
                     fontsize=8)
    ax_lat.set(xlabel="ms per patch", title=f"inference latency ({rows[0]['device']})")
    ax_lat.set_xlim(0, max(r["latency_ms"] for r in rows) * 1.7)
    handles, labels = ax_dice.get_legend_handles_labels()
    n_cols = min(len(rows), 3)
    legend_rows = math.ceil(len(rows) / n_cols)
    fig.legend(handles, labels, loc="lower center", ncol=n_cols, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * legend_rows + 0.02, 1, 1))
    return fig


def report_figure(rows: list[dict[str, Any]], path: Union[str, Path]) -> None:
    """report.png: Dice per class per model (grouped bars) and latency per model with parameters annotated
    (parameter bars instead when no latency was measured). Agg canvas: no display, global backend untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    validated = [r for r in rows if r["status"] == "validated"]
    classes = class_columns(validated) + ["mean"]
    width = 0.8 / max(1, len(validated))
    for i, row in enumerate(validated):
        values = [row["dice"].get(c) for c in classes[:-1]] + [row["mean_dice"]]
        xs = [k + (i - (len(validated) - 1) / 2) * width for k in range(len(classes))]
        left.bar(xs, [v if v is not None else math.nan for v in values], width, label=report_label(row))
    left.set_xticks(range(len(classes)), classes)
    left.set_ylim(0, 1)
    left.set_ylabel("validation Dice (nnU-Net summary.json)")
    left.set_title("Dice per class" if validated else "Dice per class (no model validated yet)")
    if validated:
        left.legend(fontsize=7)
    _plot_cost(right, rows)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)


def _plot_cost(ax, rows: list[dict[str, Any]]) -> None:
    """Latency bars (or parameter bars without latency), each annotated with the parameter count."""
    timed = any(r["latency_ms"] is not None for r in rows)
    values = [(r["latency_ms"] if timed else (r["params"] or 0) / 1e6) for r in rows]
    xs = range(len(rows))
    ax.bar(xs, [v if v is not None else 0 for v in values], color="tab:gray")
    for x, row, value in zip(xs, rows, values):
        params = f"{row['params'] / 1e6:.3f} M" if row["params"] is not None else "no ckpt"
        text = params if value is not None else f"n/a\n{params}"
        ax.annotate(text, (x, value or 0), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [r["trainer"].replace("nnUNetTrainer", "") or "nnUNetTrainer" for r in rows],
                  rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("latency per patch (ms)" if timed else "parameters (M)")
    ax.set_title("latency (parameters annotated)" if timed else "parameters (latency not measured)")
