"""Pictures of the pyramid: every traced map (or gradient) of an FPN, one row per level; one
location of the pyramid explored (``explore_location``); detections and loss curves.

Host-only code: arrays are moved with ``to_numpy`` before they reach matplotlib or NumPy (the
forward and backward that ``explore_location`` runs stay on the detector's backend).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import numpy as np

from . import functional as F
from .backend import get_array_module, to_device, to_numpy
from .detection.boxes import box_iou

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
                 cmap: str = "viridis", image=None, boxes=(), fig=None, colorbar: bool = True,
                 width: float = 11.0):
    """Draw ``fpn.maps`` or ``fpn.grads``: rows are levels (finest at the top), columns the
    stages of the pathway (C_k, lateral_k, topdown_k, M_k, P_k); extra levels (P6, P7) get
    a row of their own. Each panel is one (H, W) ``channel_summary`` (``mode``) of a (N, C, H, W)
    map, labelled with its name and (C, H, W) shape.

    Every panel of a row shares one colour scale (0 to the row's largest value for "absmean"),
    shown by a colourbar to the right of the row, so the stages of a level compare by colour;
    the title names the statistic. ``image`` (H, W) or (C, H, W), the input of sample ``sample``,
    is drawn in a first column beside the maps, with ``boxes`` (B, 4) as (x1, y1, x2, y2) in
    green; the boxes are also drawn on every map of level k, in its cells: box / 2 ** k (the
    level's stride), so a cell can be matched to its digit. ``fig``: a matplotlib Figure or
    SubFigure to draw into; None makes a figure ``width`` inches wide (11: what a notebook column
    shows without shrinking it; one pyramid per figure, the panels about 1.5 in). ``fig.axes``
    lists the level x stage panels row by row, then the input panel; colourbars are insets of
    each row's last panel. Returns the figure."""
    import matplotlib.pyplot as plt

    if mode not in STATISTICS:
        raise ValueError(f"plot_pyramid: mode must be one of {', '.join(map(repr, STATISTICS))}, "
                         f"got {mode!r}")
    traced = {name: value for name, value in traced.items() if value is not None}
    levels = sorted({int(re.fullmatch(r"[A-Za-z]+(\d+)", name)[1]) for name in traced})
    first = 0 if image is None else 1  # the input takes the first column
    boxes = _host_boxes(boxes)
    made = fig is None
    if made:
        unit = (width - 0.7 * colorbar) / (len(STAGES) + 2 * first)  # inches per panel
        fig = plt.figure(figsize=(width, unit * len(levels) + 0.8))
    grid = fig.add_gridspec(len(levels), len(STAGES) + first, width_ratios=[2] * first + [1] * len(STAGES))
    for row, k in enumerate(levels):
        _pyramid_row(fig, grid, row, k, traced, mode, sample, cmap, first, colorbar, boxes)
    if image is not None:
        ax = fig.add_subplot(grid[:, 0])
        show_image_with_boxes(ax, image, boxes, color="lime")
        ax.set_title("input", fontsize=9)
    statistic = f"each panel: {STATISTICS[mode]}; one colour scale per row"
    fig.suptitle(f"{title}\n{statistic}" if title else statistic, fontsize=10)
    if made:
        fig.subplots_adjust(left=0.03, right=0.92 if colorbar else 0.98,
                            top=1 - 0.75 / fig.get_figheight(), bottom=0.01,
                            wspace=0.35 if colorbar else 0.1, hspace=0.12)
    return fig


def _pyramid_row(fig, grid, row, k, traced, mode, sample, cmap, first, colorbar, boxes):
    """One level of ``plot_pyramid``: its panels on a shared colour scale, the boxes in the
    level's cells (boxes / 2 ** k), and the colourbar."""
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
        _draw_cells_of_boxes(ax, boxes, 2 ** k)
        last = ax
        shape = tuple(to_numpy(traced[name]).shape[1:])
        zero = " = 0" if not summaries[name].any() else ""  # e.g. a level no gradient reaches
        ax.text(0.02, 0.02, f"{name} {shape}{zero}", transform=ax.transAxes, fontsize=7,
                color="white", bbox=dict(facecolor="black", alpha=0.5, pad=1, lw=0))
    if colorbar and drawn is not None:
        cax = last.inset_axes([1.05, 0.0, 0.07, 1.0])  # a child of the panel: not in fig.axes
        fig.colorbar(drawn, cax=cax).ax.tick_params(labelsize=7)


def _draw_cells_of_boxes(ax, boxes, stride, color="lime"):
    """Draw host ``boxes`` (B, 4), image pixels (x1, y1, x2, y2), on a map of ``stride`` already
    drawn in ``ax``: box / stride in map cells (cell j covers pixels [j * stride, (j + 1) * stride)),
    without changing the view."""
    import matplotlib.patches as patches

    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    for x1, y1, x2, y2 in boxes / stride:  # imshow puts cell c's centre at c, its edges at c -+ 0.5
        ax.add_patch(patches.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, color=color,
                                       lw=0.8))
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)


def _host_boxes(boxes) -> np.ndarray:
    """Boxes (x1, y1, x2, y2) of any backend, or none, as a host (B, 4) array. To the host first:
    np.asarray on a CuPy array is refused (and would copy it implicitly)."""
    return to_numpy(boxes).reshape(-1, 4) if len(boxes) else np.zeros((0, 4))


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
    boxes = _host_boxes(boxes)
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


# ---- one location of the pyramid, explored: its gradient, its anchors, the head's scores ----------

@dataclass
class LocationTrace:
    """What ``trace_location`` measures for one detector at cell (row, col) of P_level; host arrays.

    stride: 2 ** level; centre: (x, y), the cell's centre in image pixels, ((col + 0.5) * stride,
    (row + 0.5) * stride); channel: the channel of P_level that holds the one-hot gradient;
    grad_norms: {map name: ||d map||_2} for every traced map of the pathway (C_k, lateral_k,
    topdown_k, M_k, P_k), 0.0 where no gradient arrives; grads: {map name: (C, H, W) gradient},
    only the maps it reaches. rows: (A,) the rows of the cell's A anchors among the detector's T
    anchors (``DetectorOutput.logits[0, rows]``); anchors: (A, 4) (x1, y1, x2, y2); ious: (A,) the
    IoU of each with its nearest digit (the box it overlaps most); nearest: (A,) that box's index in
    ``boxes`` (-1: it overlaps none); logits: (A, K + 1), the head's output at those rows; probs:
    (A, K + 1), their softmax (column 0: background, column k: class k - 1)."""

    name: str
    level: int
    row: int
    col: int
    stride: int
    centre: tuple
    channel: int
    grad_norms: dict
    grads: dict
    rows: np.ndarray
    anchors: np.ndarray
    ious: np.ndarray
    nearest: np.ndarray
    logits: np.ndarray
    probs: np.ndarray


@dataclass
class Exploration:
    """What ``explore_location`` returns: the cell (level, row, col), one ``LocationTrace`` per
    detector (``traces``, by name, in the order given) and the matplotlib ``figure``."""

    level: int
    row: int
    col: int
    traces: dict
    figure: object


@contextlib.contextmanager
def _tracing(fpn):
    """``fpn.trace`` on inside the block (maps and gradients kept by name), as it was afterwards."""
    was, fpn.trace = fpn.trace, True
    try:
        yield fpn
    finally:
        fpn.trace = was


def _fpn_of(detector, level: int):
    """The detector's FPN, checked to output P_level; a ValueError otherwise."""
    fpn = getattr(detector, "fpn", None)
    if fpn is None:
        raise ValueError("explore_location: the detector has no FPN (setting c4 or c5): no pyramid to trace")
    if level not in fpn.output_levels:
        raise ValueError(f"explore_location: level must be one of {fpn.output_levels}, got {level!r}")
    return fpn


def _check_cell(sizes, i: int, level: int, row: int, col: int) -> None:
    """A ValueError for a cell (row, col) that is not on P_level, of size ``sizes[i]``."""
    height, width = sizes[i]
    if not (0 <= row < height and 0 <= col < width):
        raise ValueError(f"explore_location: P{level} is {height} x {width}; cell ({row}, {col}) "
                         f"is not on it")


def _one_hot_backward(fpn, maps, i, row, col, channel):
    """Send dP = 1 at (channel, row, col) of ``maps[i]`` (0 elsewhere, None on the other maps)
    through ``fpn.backward`` (the trace on): returns the channel and {name: host (C, H, W) grad}."""
    p = maps[i]
    if channel is None:  # the channel most active there
        channel = int(to_numpy(p[0, :, row, col]).argmax())
    d_p = [None] * len(maps)
    d_p[i] = get_array_module(p).zeros_like(p)
    d_p[i][0, channel, row, col] = 1.0
    fpn.backward(d_p)
    return channel, {name: to_numpy(g)[0] for name, g in fpn.grads.items()}


def _nearest_digit(anchors, boxes):
    """(ious (A,), nearest (A,)): each anchor's largest IoU with a box and that box's index (-1: none)."""
    if len(boxes) == 0:
        return np.zeros(len(anchors)), np.full(len(anchors), -1)
    iou = box_iou(anchors, boxes)  # (A, G)
    ious, nearest = iou.max(axis=1), iou.argmax(axis=1)
    return ious, np.where(ious > 0, nearest, -1)


def trace_location(detector, image, boxes, level: int, row: int, col: int, channel=None,
                   name: str = "") -> LocationTrace:
    """One detector with an FPN (any variant) at cell (row, col) of P_level, on ``image`` (C, H, W)
    with digit ``boxes`` (G, 4): a forward in eval mode with the FPN's trace on; a one-hot gradient
    on P_level at that cell (``channel``; None: the channel most active there) traced down every
    map by ``FPN.backward``; the cell's anchors, their IoU with the nearest digit, and the head's
    outputs at their rows. Overwrites the layers' caches (as ``predict`` does) and leaves the FPN's
    parameter gradients zeroed. Returns a ``LocationTrace`` (host arrays)."""
    boxes = _host_boxes(boxes)
    fpn = _fpn_of(detector, level)
    i = fpn.output_levels.index(level)
    with detector.evaluating(), _tracing(fpn):
        out = detector.forward(to_device(image, detector.backend)[None])
        _check_cell(out.sizes, i, level, row, col)
        channel, grads = _one_hot_backward(fpn, out.features, i, row, col, channel)
        names = list(fpn.maps)
    fpn.zero_grad()
    norms = {m: float(np.sqrt((grads[m].astype(np.float64) ** 2).sum())) if m in grads else 0.0
             for m in names}
    per_cell = detector.num_anchors  # A anchors per cell, rows in (map, y, x, anchor) order
    local = (row * out.sizes[i][1] + col) * per_cell
    start = sum(len(a) for a in out.anchors[:i]) + local
    anchors = np.asarray(out.anchors[i][local:local + per_cell], np.float64)
    logits = out.logits[0, start:start + per_cell]  # (A, K + 1), on the detector's backend
    ious, nearest = _nearest_digit(anchors, boxes)
    stride = 2 ** level
    return LocationTrace(name, level, row, col, stride, ((col + 0.5) * stride, (row + 0.5) * stride), channel,
                         norms, grads, np.arange(start, start + per_cell), anchors, ious, nearest,
                         to_numpy(logits), to_numpy(F.softmax(logits, axis=-1)))


def explore_location(detectors: dict, image, boxes, level: int, row: int, col: int, labels=(),
                     channel=None) -> Exploration:
    """Explore one location of the pyramid in several detectors side by side (e.g. the reference
    pair, {"fpn": ..., "bottom_up": ...}): for cell (row, col) of P_level (level 2..6; the cell
    covers pixels [col * 2 ** level, (col + 1) * 2 ** level) across), on ``image`` (C, H, W) with
    digit ``boxes`` (G, 4) (x1, y1, x2, y2) and their ``labels`` (G,):

    * ``trace_location`` for each detector: the one-hot gradient on P_level traced down every map
      of the pathway, the gradient norm of each map, the cell's anchors with their IoU to the
      nearest digit, and the head's logits and softmax scores for them;
    * one figure, 11 in wide: the input with the cell, its anchors and the digits; per detector a
      grid of log10 ||d map||_2 (rows: levels, columns: C_k, lateral_k, topdown_k, M_k, P_k; one
      colour scale for all); per detector mean |dC_k| over channels for k = 2..5, with the boxes
      in each level's cells; and a table of the anchors (box, IoU, nearest digit, each detector's
      best class and score, and its background score).

    Returns an ``Exploration`` holding the numbers (``traces``) and the ``figure``."""
    traces = {name: trace_location(det, image, boxes, level, row, col, channel, name)
              for name, det in detectors.items()}
    labels = to_numpy(labels).reshape(-1) if len(labels) else ()
    figure = _exploration_figure(traces, image, _host_boxes(boxes), labels)
    return Exploration(level, row, col, traces, figure)


ANCHOR_COLORS = ("orange", "deepskyblue", "magenta", "yellow", "red", "white")  # the cell's anchors, in order


def _exploration_figure(traces: dict, image, boxes, labels):
    """The figure of ``explore_location``: host ``boxes`` (G, 4) and ``labels`` (G,) or ()."""
    import matplotlib.pyplot as plt

    names, first = list(traces), next(iter(traces.values()))
    fig = plt.figure(figsize=(11, 8.6), layout="constrained")
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=[3.9, 2.0, 1.1])
    axes = top.subplots(1, 1 + len(names), gridspec_kw=dict(width_ratios=[1.15] + [1] * len(names)))
    _draw_location(axes[0], image, boxes, labels, first)
    logs = [np.log10(v) for t in traces.values() for v in t.grad_norms.values() if v > 0]
    scale = (min(logs), max(logs)) if logs else (-1.0, 1.0)
    for ax, name in zip(axes[1:], names):
        _draw_norm_grid(ax, traces[name], scale)
    strip = middle.subplots(1, 4 * len(names))
    for j, name in enumerate(names):
        _draw_backbone_gradients(strip[4 * j:4 * j + 4], traces[name], boxes)
    middle.suptitle("the gradient that reaches the backbone: mean |dC_k| over channels, each panel its own "
                    "colour scale;\ngreen: the digits' boxes in each level's cells; +: the explored location",
                    fontsize=9)
    _draw_anchor_table(bottom.subplots(), traces, labels)
    fig.suptitle(f"P{first.level} cell ({first.row}, {first.col}): stride {first.stride}, centre "
                 f"({first.centre[0]:g}, {first.centre[1]:g}) px; a one-hot gradient on the channel most "
                 f"active there (each detector its own)", fontsize=10)
    return fig


def _draw_location(ax, image, boxes, labels, trace):
    """The input, the digits (green), the explored cell (red square) and its anchors (colours)."""
    import matplotlib.patches as patches

    show_image_with_boxes(ax, image, boxes, labels)
    height, width = to_numpy(image).shape[-2:]
    s = trace.stride
    ax.add_patch(patches.Rectangle((trace.col * s - 0.5, trace.row * s - 0.5), s, s, fill=False,
                                   color="red", lw=1.5))
    for a, (x1, y1, x2, y2) in enumerate(trace.anchors):
        ax.add_patch(patches.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, ls="--", lw=1,
                                       color=ANCHOR_COLORS[a % len(ANCHOR_COLORS)]))
    ax.plot(*trace.centre, "+", color="red", ms=10)
    ax.set_xlim(-0.5, width - 0.5)  # anchors may leave the image: keep the view on it
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_title(f"input: red, the P{trace.level} cell; dashed, its anchors a0..a{len(trace.anchors) - 1}",
                 fontsize=8)


def _norm_table(trace):
    """(levels, (L, 5) array of ||d map||_2, NaN where the map does not exist) of a trace."""
    levels = sorted({int(re.fullmatch(r"[A-Za-z]+(\d+)", m)[1]) for m in trace.grad_norms})
    table = np.full((len(levels), len(STAGES)), np.nan)
    for r, k in enumerate(levels):
        for c, stage in enumerate(STAGES):
            table[r, c] = trace.grad_norms.get(f"{stage}{k}", np.nan)
    return levels, table


def _draw_norm_grid(ax, trace, scale):
    """log10 ||d map||_2 as a (levels x stages) grid, each cell with its value ("-": no such map,
    "0": no gradient reaches it); ``scale`` (low, high) in log10, shared by the detectors."""
    levels, table = _norm_table(trace)
    shown = np.log10(np.where(table > 0, table, np.nan))
    ax.imshow(np.ma.masked_invalid(shown), cmap="viridis", vmin=scale[0], vmax=scale[1])
    ax.set_facecolor("0.85")
    for (r, c), v in np.ndenumerate(table):
        text = "-" if np.isnan(v) else "0" if v == 0 else f"{v:.2g}"
        ax.text(c, r, text, ha="center", va="center", fontsize=8,
                color="white" if v > 0 and shown[r, c] < (scale[0] + scale[1]) / 2 else "black")
    ax.set_xticks(range(len(STAGES)), ["C", "lat", "top", "M", "P"], fontsize=8)
    ax.set_yticks(range(len(levels)), [f"level {k}" for k in levels], fontsize=8)
    ax.set_title(f"{trace.name}: ||d map||_2 from P{trace.level}\n(one log colour scale for all)",
                 fontsize=9)


def _draw_backbone_gradients(axes, trace, boxes):
    """Mean |dC_k| over channels for k = 2..5 in four panels, the digits' boxes in the level's
    cells and the explored location marked ("= 0": no gradient reaches C_k)."""
    for ax, k in zip(axes, range(2, 6)):
        grad = trace.grads.get(f"C{k}")
        ax.set_xticks([])
        ax.set_yticks([])
        if grad is None:
            ax.set_box_aspect(1)
            ax.text(0.5, 0.5, f"no gradient\nreaches C{k}", ha="center", va="center", fontsize=8,
                    transform=ax.transAxes)
            ax.set_title(f"{trace.name} dC{k} = 0", fontsize=8)
            continue
        ax.imshow(np.abs(grad).mean(axis=0), cmap="magma", interpolation="nearest")
        _draw_cells_of_boxes(ax, boxes, 2 ** k)
        ax.plot(trace.centre[0] / 2 ** k - 0.5, trace.centre[1] / 2 ** k - 0.5, "+", color="cyan", ms=8)
        ax.set_title(f"{trace.name} dC{k}", fontsize=8)


def _anchor_rows_text(trace, labels):
    """One line per anchor of the cell: its box, its IoU and the nearest digit."""
    lines = []
    for a, (box, iou, j) in enumerate(zip(trace.anchors, trace.ious, trace.nearest)):
        digit = "-" if j < 0 else (str(labels[j]) if len(labels) else f"box {j}")
        corners = ", ".join(f"{v:6.1f}" for v in box)
        lines.append(f"a{a}  ({corners})  {iou:4.2f}  {digit:>7s}")
    return lines


def _draw_anchor_table(ax, traces, labels):
    """The cell's anchors, one line each in its colour: box, IoU with the nearest digit, and per
    detector its best class (K = 10: the digit) with its softmax score, and the background's."""
    first = next(iter(traces.values()))
    ax.set_axis_off()
    header = f"{'':4s}{'anchor (x1, y1, x2, y2)':^34s}{'IoU':>6s}{'nearest':>9s}" + "".join(
        f" | {name + ': best class, score, background':<34s}" for name in traces)
    ax.text(0.0, 1.0, header, family="monospace", fontsize=8, va="top", transform=ax.transAxes)
    for a, line in enumerate(_anchor_rows_text(first, labels)):
        for t in traces.values():
            best = int(t.probs[a, 1:].argmax())
            line += f" | {best:>10d} {t.probs[a, best + 1]:9.3f} {t.probs[a, 0]:11.3f}{'':<2s}"
        ax.text(0.0, 0.78 - 0.22 * a, line, family="monospace", fontsize=8, va="top",
                transform=ax.transAxes, color=ANCHOR_COLORS[a % len(ANCHOR_COLORS)],
                bbox=dict(facecolor="0.2", lw=0, pad=1))
