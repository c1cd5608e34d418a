"""The demo's figure as a person sees it: no text of it overlaps another (issue #37: its legend once covered the left
panel's title and the model names under the latency bars overprinted each other)."""

from __future__ import annotations

import itertools

import pytest

from nnunetv2_recokd.evaluation.figures import draw_demo_figure

# the demo's four models with their long names (README's demo table), and a fifth to push the layout
MODELS = ["teacher (full width)", "student alone, 2 labelled cases", "student + 12 teacher-labelled scans",
          "student + teacher-labelled scans + ReCo-KD", "student, width 1/8, all labels"]


def _rows(n: int) -> list[dict]:
    return [{"model": MODELS[i], "seeds": [0, 1], "dice": {"organ": 0.9 - 0.05 * i, "lesion": 0.7 - 0.05 * i},
             "dice_sd": {"organ": 0.01, "lesion": 0.02}, "latency_ms": 520.0 / (i + 1), "params": 5.6e6 / (i + 1),
             "device": "cpu (2 cores)"} for i in range(n)]


def _text_boxes(fig) -> dict[str, list]:
    """Rendered boxes (display pixels) of every text a reader must read, by group."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax_dice, ax_lat = fig.axes
    legend = fig.legends[0]
    boxes = {"legend": [legend.get_window_extent(renderer)],
             "titles": [ax.title.get_window_extent(renderer) for ax in (ax_dice, ax_lat)],
             "dice ticks": [t.get_window_extent(renderer) for t in ax_dice.get_xticklabels() if t.get_text()],
             "model names": [t.get_window_extent(renderer) for t in ax_lat.get_yticklabels() if t.get_text()],
             "axis labels": [ax.xaxis.label.get_window_extent(renderer) for ax in (ax_dice, ax_lat)
                             if ax.xaxis.label.get_text()]
             + [ax.yaxis.label.get_window_extent(renderer) for ax in (ax_dice, ax_lat) if ax.yaxis.label.get_text()],
             "bar labels": [t.get_window_extent(renderer) for t in ax_lat.texts]}
    return boxes


@pytest.mark.parametrize("n_models", [2, 4, 5])
def test_no_text_of_the_demo_figure_overlaps_another(n_models):
    import matplotlib.pyplot as plt

    fig = draw_demo_figure(_rows(n_models), ["organ", "lesion"])
    try:
        boxes = _text_boxes(fig)
        assert len(boxes["model names"]) == n_models and len(boxes["titles"]) == 2
        flat = [(group, i, box) for group, items in boxes.items() for i, box in enumerate(items)]
        overlaps = [f"{g1}[{i1}] and {g2}[{i2}]" for (g1, i1, b1), (g2, i2, b2) in itertools.combinations(flat, 2)
                    if b1.overlaps(b2)]
        assert overlaps == []
        figure_box = fig.bbox
        for group, i, box in flat:  # nothing cut off at the figure's edge
            assert box.x0 >= figure_box.x0 - 1 and box.x1 <= figure_box.x1 + 1, (group, i)
            assert box.y0 >= figure_box.y0 - 1 and box.y1 <= figure_box.y1 + 1, (group, i)
    finally:
        plt.close(fig)


def test_the_check_finds_an_overlap():
    """The layout check itself: a legend drawn over the left panel's title is found."""
    import matplotlib.pyplot as plt

    fig = draw_demo_figure(_rows(4), ["organ", "lesion"])
    try:
        fig.legends[0].remove()
        fig.axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, 1.08), ncol=4, fontsize=8)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legend = fig.axes[0].get_legend().get_window_extent(renderer)
        assert legend.overlaps(fig.axes[0].title.get_window_extent(renderer))
    finally:
        plt.close(fig)
