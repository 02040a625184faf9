"""Pictures of the pyramid: every traced map (or gradient) of an FPN, one row per level.

Host-only code: arrays are moved with ``to_numpy`` before they reach matplotlib.
"""
from __future__ import annotations

import re

import numpy as np

from .backend import to_numpy

STAGES = ["C", "lateral", "topdown", "M", "P"]
STAGE_TITLES = {"C": "C_k (bottom-up)", "lateral": "lateral 1x1(C_k)",
                "topdown": "upsample(M_k+1)", "M": "M_k (merged)", "P": "P_k (3x3 output)"}


def channel_summary(a, mode: str = "mean", sample: int = 0):
    """One (H, W) host image of a (N, C, H, W) map: the mean over channels ("mean"), the mean
    of absolute values ("absmean", good for gradients), or the channel of largest energy ("max")."""
    a = to_numpy(a)[sample].astype(np.float64)
    if mode == "mean":
        return a.mean(axis=0)
    if mode == "absmean":
        return np.abs(a).mean(axis=0)
    if mode == "max":
        return a[np.argmax((a ** 2).sum(axis=(1, 2)))]
    raise ValueError(f"channel_summary: mode must be 'mean', 'absmean' or 'max', got {mode!r}")


STATISTICS = {"mean": "mean over channels", "absmean": "mean |value| over channels",
              "max": "the channel of largest energy"}


def plot_pyramid(traced: dict, mode: str = "absmean", sample: int = 0, title: str | None = None,
                 cmap: str = "viridis", image=None, boxes=(), fig=None, colorbar: bool = True):
    """Draw ``fpn.maps`` or ``fpn.grads``: rows are levels (finest at the top), columns the
    stages of the pathway (C_k, lateral_k, topdown_k, M_k, P_k); extra levels (P6, P7) get
    a row of their own. Each panel is one (H, W) ``channel_summary`` (``mode``) of a (N, C, H, W)
    map, labelled with its name and (C, H, W) shape.

    Every panel of a row shares one colour scale (0 to the row's largest value for "absmean"),
    shown by a colourbar to the right of the row, so the stages of a level compare by colour;
    the title names the statistic. ``image`` (H, W) or (C, H, W), the input of sample ``sample``,
    is drawn in a first column beside the maps, with ``boxes`` (B, 4) as (x1, y1, x2, y2) in
    green. ``fig``: a matplotlib Figure or SubFigure to draw into (e.g. one of
    ``plt.figure().subfigures(1, 2)`` for two pyramids side by side); None makes a figure.
    ``fig.axes`` lists the level x stage panels row by row, then the input panel; colourbars
    are insets of each row's last panel. Returns the figure."""
    import matplotlib.pyplot as plt

    if mode not in STATISTICS:
        raise ValueError(f"plot_pyramid: mode must be one of {', '.join(map(repr, STATISTICS))}, "
                         f"got {mode!r}")
    traced = {name: value for name, value in traced.items() if value is not None}
    levels = sorted({int(re.fullmatch(r"[A-Za-z]+(\d+)", name)[1]) for name in traced})
    first = 0 if image is None else 1  # the input takes the first column
    made = fig is None
    if made:
        fig = plt.figure(figsize=(2.3 * (len(STAGES) + 2 * first) + 0.6 * colorbar, 2.1 * len(levels)))
    grid = fig.add_gridspec(len(levels), len(STAGES) + first, width_ratios=[2] * first + [1] * len(STAGES))
    for row, k in enumerate(levels):
        _pyramid_row(fig, grid, row, k, traced, mode, sample, cmap, first, colorbar)
    if image is not None:
        ax = fig.add_subplot(grid[:, 0])
        show_image_with_boxes(ax, image, boxes, color="lime")
        ax.set_title("input", fontsize=9)
    statistic = f"each panel: {STATISTICS[mode]}; one colour scale per row"
    fig.suptitle(f"{title}\n{statistic}" if title else statistic, fontsize=10)
    if made:
        fig.subplots_adjust(left=0.04, right=0.93 if colorbar else 0.98, top=0.9, bottom=0.02,
                            wspace=0.35 if colorbar else 0.1, hspace=0.15)
    return fig


def _pyramid_row(fig, grid, row, k, traced, mode, sample, cmap, first, colorbar):
    """One level of ``plot_pyramid``: its panels on a shared colour scale, and the colourbar."""
    names = [f"{stage}{k}" for stage in STAGES]
    summaries = {name: channel_summary(traced[name], mode, sample) for name in names if name in traced}
    values = np.concatenate([a.ravel() for a in summaries.values()])
    vmin = 0.0 if mode == "absmean" else float(values.min())
    vmax = float(values.max())
    if vmax <= vmin:  # a constant row (all zero: no gradient reaches the level) still gets a scale
        vmax = vmin + 1.0
    drawn = None
    for col, (stage, name) in enumerate(zip(STAGES, names)):
        ax = fig.add_subplot(grid[row, first + col])
        ax.set_xticks([])
        ax.set_yticks([])
        if row == 0:
            ax.set_title(STAGE_TITLES[stage], fontsize=9)
        if col == 0:
            ax.set_ylabel(f"level {k}", fontsize=9)
        if name not in summaries:
            ax.set_frame_on(False)
            continue
        drawn = ax.imshow(summaries[name], cmap=cmap, interpolation="nearest", vmin=vmin, vmax=vmax)
        last = ax
        shape = tuple(to_numpy(traced[name]).shape[1:])
        zero = " = 0" if not summaries[name].any() else ""  # e.g. a level no gradient reaches
        ax.text(0.02, 0.02, f"{name} {shape}{zero}", transform=ax.transAxes, fontsize=7,
                color="white", bbox=dict(facecolor="black", alpha=0.5, pad=1, lw=0))
    if colorbar and drawn is not None:
        cax = last.inset_axes([1.05, 0.0, 0.07, 1.0])  # a child of the panel: not in fig.axes
        fig.colorbar(drawn, cax=cax).ax.tick_params(labelsize=7)


def show_image_with_boxes(ax, image, boxes=(), labels=(), color="lime", scores=None,
                          draw_image=True):
    """Draw a (C, H, W) or (H, W) image with boxes (x1, y1, x2, y2) and their labels
    (and scores); ``draw_image=False`` adds boxes to what is already drawn."""
    import matplotlib.patches as patches

    if draw_image:
        image = to_numpy(image)
        if image.ndim == 3:
            image = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        ax.imshow(image, cmap="gray", interpolation="nearest")
    # to the host first: np.asarray on a CuPy array is refused (and would copy it implicitly)
    boxes = to_numpy(boxes).reshape(-1, 4) if len(boxes) else np.zeros((0, 4))
    labels = to_numpy(labels).reshape(-1) if len(labels) else ()
    scores = None if scores is None else to_numpy(scores).reshape(-1)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        # box edges are pixel edges; imshow puts pixel c's centre at c, so its edges at c -+ 0.5
        ax.add_patch(patches.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False,
                                       color=color, lw=1))
        text = str(labels[i]) if len(labels) else ""
        if scores is not None:
            text += f" {float(scores[i]):.2f}"
        if text:
            ax.annotate(text, (x1 - 0.5, y1 - 0.5), xytext=(0, 1), textcoords="offset points",
                        color=color, fontsize=7, va="bottom")
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def plot_loss_curve(history: dict, title: str = "training loss"):
    """Total, classification and box loss against iteration, with a running mean."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    it = np.asarray(history["iteration"])
    for key, style in (("loss", "-"), ("cls", "--"), ("box", ":")):
        if key not in history:  # a classifier's history has no box loss
            continue
        values = np.asarray(history[key], np.float64)
        window = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(it[window - 1:], smooth, style, label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return fig


# where a label may go, relative to its box (x1, y1, x2, y2) on an image whose y axis points down:
# (x of the anchor, y of the anchor, horizontal alignment, vertical alignment); "bottom" puts the
# text above the anchor on the screen. Tried in this order: above the box, below it, then inside.
_LABEL_PLACES = (("x1", "y1", "left", "bottom"), ("x1", "y2", "left", "top"),
                 ("x2", "y1", "right", "bottom"), ("x2", "y2", "right", "top"),
                 ("x1", "y1", "left", "top"), ("x2", "y2", "right", "bottom"))
TRUTH_COLOR, PREDICTION_COLOR = "lime", "red"
_LABEL_PAD = 0.8  # points of coloured backing around a label's text


def _place_label(ax, renderer, box, text, color, taken):
    """Put ``text`` at the first place around ``box`` (pixel edges) that stays inside the panel and
    overlaps no extent in ``taken``; returns the Text, or None (nothing drawn) if no place is free."""
    x1, y1, x2, y2 = (float(v) - 0.5 for v in box)  # imshow puts pixel c's centre at c
    corners = {"x1": x1, "x2": x2, "y1": y1, "y2": y2}
    panel = ax.get_window_extent(renderer)
    backing = _LABEL_PAD * ax.figure.dpi / 72  # the coloured box around the text, in pixels
    for x, y, ha, va in _LABEL_PLACES:
        # nudged 2 points off the anchor, so the coloured backing clears the box line or the edge
        offset = (2 if ha == "left" else -2, 2 if va == "bottom" else -2)
        label = ax.annotate(text, (corners[x], corners[y]), xytext=offset, textcoords="offset points",
                            ha=ha, va=va, fontsize=7, color="black" if color == TRUTH_COLOR else "white",
                            bbox=dict(facecolor=color, edgecolor="none", pad=_LABEL_PAD, alpha=0.85))
        extent = label.get_window_extent(renderer).padded(backing)
        inside = (panel.x0 <= extent.x0 and extent.x1 <= panel.x1 and panel.y0 <= extent.y0
                  and extent.y1 <= panel.y1)
        if inside and not any(extent.overlaps(other) for other in taken):
            taken.append(extent)
            return label
        label.remove()
    return None


def plot_detections(images, detections, truths=None, columns: int = 4, min_score: float = 0.3):
    """A grid of scenes: each true box in green with the name of its digit (if ``truths`` is
    given), each prediction scoring at least ``min_score`` in red with its digit and score.

    images: (N, C, H, W) (or N arrays (C, H, W)); detections: N dicts with "boxes" (D, 4) as
    (x1, y1, x2, y2), "scores" (D,), "labels" (D,); truths: N dicts with "boxes" (G, 4), "labels"
    (G,). A legend above the grid says what the colours mean and gives the score threshold. Every
    label sits inside its panel and overlaps no other label: true digits are placed first, then
    predictions by decreasing score, above, below or inside their box; a label with no free place
    is left out (its box is still drawn) and the panel's title counts it. Host-only: every array
    is moved with ``to_numpy``.
    """
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    n = len(detections)
    rows = -(-n // columns)
    legend_inches = 0.45
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows + legend_inches),
                             squeeze=False)
    # a fixed layout (no tight_layout afterwards), so the label extents measured below stay true
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, wspace=0.04, hspace=0.1,
                        top=1 - legend_inches / fig.get_figheight())
    renderer = fig.canvas.get_renderer()
    for i, ax in enumerate(axes.ravel()):
        if i >= n:
            ax.set_axis_off()
            continue
        show_image_with_boxes(ax, images[i])
        ax.set_xlim(ax.get_xlim())  # fixed now: labels must not widen the view
        ax.set_ylim(ax.get_ylim())
        drawn = []  # (box, text, colour), in the order their labels are placed
        if truths is not None:
            for box, digit in zip(to_numpy(truths[i]["boxes"]).reshape(-1, 4),
                                  to_numpy(truths[i]["labels"]).reshape(-1)):
                drawn.append((box, f"{int(digit)}", TRUTH_COLOR))
        d = detections[i]
        scores = to_numpy(d["scores"]).reshape(-1)
        boxes, labels = to_numpy(d["boxes"]).reshape(-1, 4), to_numpy(d["labels"]).reshape(-1)
        for j in np.argsort(-scores, kind="stable"):
            if scores[j] >= min_score:
                drawn.append((boxes[j], f"{int(labels[j])} {float(scores[j]):.2f}", PREDICTION_COLOR))
        taken, hidden = [], 0
        for box, text, color in drawn:
            x1, y1, x2, y2 = (float(v) for v in box)
            ax.add_patch(patches.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False,
                                           color=color, lw=1.2 if color == TRUTH_COLOR else 1.0))
            hidden += _place_label(ax, renderer, box, text, color, taken) is None
        title = f"scene {i}" + (f" ({hidden} label{'s' * (hidden > 1)} left out: no room)" if hidden else "")
        ax.set_title(title, fontsize=8)
    handles = [patches.Patch(facecolor="none", edgecolor=TRUTH_COLOR, lw=1.5,
                             label="true box, labelled with its digit"),
               patches.Patch(facecolor="none", edgecolor=PREDICTION_COLOR, lw=1.5,
                             label=f"prediction: digit and score, shown if score >= {min_score:g}")]
    fig.legend(handles=handles, loc="upper center", ncol=2, fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    return fig
