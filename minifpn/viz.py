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


def plot_pyramid(traced: dict, mode: str = "mean", sample: int = 0, title: str | None = None,
                 cmap: str = "viridis"):
    """Draw ``fpn.maps`` or ``fpn.grads``: rows are levels (finest at the top), columns the
    stages of the pathway (C_k, lateral_k, topdown_k, M_k, P_k); extra levels (P6, P7) get
    a row of their own. Each panel is labelled with its shape. Returns the figure."""
    import matplotlib.pyplot as plt

    traced = {name: value for name, value in traced.items() if value is not None}
    levels = sorted({int(re.fullmatch(r"[A-Za-z]+(\d+)", name)[1]) for name in traced})
    fig, axes = plt.subplots(len(levels), len(STAGES), figsize=(2.3 * len(STAGES), 2.1 * len(levels)),
                             squeeze=False)
    for row, k in enumerate(levels):
        for col, stage in enumerate(STAGES):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(STAGE_TITLES[stage], fontsize=9)
            if col == 0:
                ax.set_ylabel(f"level {k}", fontsize=9)
            name = f"{stage}{k}"
            if name not in traced or traced[name] is None:
                ax.set_frame_on(False)
                continue
            image = channel_summary(traced[name], mode, sample)
            ax.imshow(image, cmap=cmap, interpolation="nearest")
            shape = tuple(to_numpy(traced[name]).shape[1:])
            ax.text(0.02, 0.02, f"{name} {shape}", transform=ax.transAxes, fontsize=7,
                    color="white", bbox=dict(facecolor="black", alpha=0.5, pad=1, lw=0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


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


def plot_detections(images, detections, truths=None, columns: int = 4, min_score: float = 0.3):
    """A grid of scenes: true boxes in green (if given), predictions above ``min_score`` in red
    with their digit and score."""
    import matplotlib.pyplot as plt

    n = len(detections)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        if i >= n:
            ax.set_axis_off()
            continue
        true_boxes = truths[i]["boxes"] if truths is not None else ()
        show_image_with_boxes(ax, images[i], true_boxes, color="lime")
        d = detections[i]
        scores = to_numpy(d["scores"])
        keep = scores >= min_score
        show_image_with_boxes(ax, None, to_numpy(d["boxes"])[keep], to_numpy(d["labels"])[keep],
                              color="red", scores=scores[keep], draw_image=False)
    fig.tight_layout()
    return fig
