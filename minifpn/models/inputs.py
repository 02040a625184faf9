"""What a detector accepts: images padded to multiples of C5's stride, checked for shape and
values, and boxes and labels checked before any anchor is matched. Host-side checks; the one
device read is the finite check of the images."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module, to_numpy

TOP_STRIDE = 32  # the stride of C5: image sides must be multiples of it


def pad_images(images, multiple: int = TOP_STRIDE):
    """Pad (N, C, H, W) images with zeros at the bottom and right so H and W are multiples of
    ``multiple``. Boxes (x1, y1, x2, y2) stay valid, since the top-left corner does not move."""
    xp = get_array_module(images)
    N, C, H, W = images.shape
    H2, W2 = -(-H // multiple) * multiple, -(-W // multiple) * multiple
    out = xp.zeros((N, C, H2, W2), dtype=images.dtype)
    out[:, :, :H, :W] = images
    return out


def halved_sizes(size: int) -> tuple[int, int]:
    """The sizes a side of ``size`` may have one level up: halved with floor or with ceil (a
    ResNet stage halves ceil-wise; a pooled map may floor)."""
    return size // 2, (size + 1) // 2


def check_images(images, in_channels: int, values: bool = True, who: str = "Detector"):
    """Shape (N, in_channels, H, W) with H, W multiples of 32; with ``values``, also no NaN
    or infinity (one device-to-host sync; the count and place only on failure). ``who`` begins
    each error message."""
    c = in_channels
    if getattr(images, "ndim", None) != 4 or images.shape[1] != c:
        raise ValueError(f"{who}: expected images of shape (N, {c}, H, W), "
                         f"got {getattr(images, 'shape', type(images).__name__)}")
    H, W = images.shape[2:]
    if H % TOP_STRIDE or W % TOP_STRIDE:
        raise ValueError(f"{who}: image sides must be multiples of {TOP_STRIDE} (the stride "
                         f"of C5), got {H}x{W}; pad them with minifpn.models.detector."
                         f"pad_images(images), which adds zeros at the bottom and right")
    if values and not bool(get_array_module(images).isfinite(images).all()):
        bad = ~np.isfinite(to_numpy(images))
        n, channel, row, column = (int(i) for i in np.argwhere(bad)[0])
        what, where = "pixels", f"image {n}, row {row}, column {column}"
        if c > 1:
            what, where = "pixel values", f"image {n}, channel {channel}, row {row}, column {column}"
        raise ValueError(f"{who}: images contain NaN or infinite values ({int(bad.sum())} of "
                         f"{bad.size} {what}, first at {where})")

def check_targets(boxes, labels, N: int, H: int, W: int, num_classes: int):
    """Boxes (x1, y1, x2, y2) inside the H x W image with positive area, one integer label in
    [0, num_classes) per box, for each of the N images."""
    if len(boxes) != N or len(labels) != N:
        raise ValueError(f"Detector.loss: expected boxes and labels for each of the {N} "
                         f"images, got {len(boxes)} and {len(labels)}")
    for n in range(N):
        b = to_numpy(boxes[n]).astype(np.float64).reshape(-1, 4)
        lab = to_numpy(labels[n]).reshape(-1)
        if lab.size and lab.dtype.kind not in "iu":  # an empty list is float64: allowed
            raise ValueError(f"Detector.loss: labels of image {n} must be integers (class "
                             f"indices), got dtype {lab.dtype} {lab.tolist()}; float labels "
                             f"are refused even when whole (1.0): use an int array")
        if len(b) != len(lab):
            raise ValueError(f"Detector.loss: image {n} has {len(b)} boxes but "
                             f"{len(lab)} labels")
        if not np.isfinite(b).all():
            raise ValueError(f"Detector.loss: image {n} has a non-finite box")
        outside = (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > W) | (b[:, 3] > H)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise ValueError(f"Detector.loss: box {i} of image {n}, {b[i].tolist()}, lies "
                             f"outside the {W}x{H} image; boxes are (x1, y1, x2, y2) with "
                             f"0 <= x1 < x2 <= {W} and 0 <= y1 < y2 <= {H}")
        empty = (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
        if empty.any():
            i = int(np.flatnonzero(empty)[0])
            raise ValueError(f"Detector.loss: box {i} of image {n}, {b[i].tolist()}, has zero "
                             f"area; expected x1 < x2 and y1 < y2")
        if len(lab) and (lab.min() < 0 or lab.max() >= num_classes):
            raise ValueError(f"Detector.loss: labels of image {n} must lie in "
                             f"[0, {num_classes}), got {lab.tolist()}")


def check_batch(images, boxes, labels, in_channels: int, num_classes: int, any_label: bool = False):
    """A training batch: images (N, in_channels, H, W) with N >= 1, and boxes and labels as
    ``check_targets`` wants them -> host copies (boxes, labels). ``any_label``: the paper's RPN,
    every digit is "an object", so the labels become zeros before the check."""
    check_images(images, in_channels, values=False)
    if images.shape[0] == 0:
        raise ValueError("Detector.loss: the batch is empty (N = 0 images); a loss needs at "
                         "least one image")
    N, _, H, W = images.shape
    boxes, labels = [to_numpy(b) for b in boxes], [to_numpy(lab) for lab in labels]
    if any_label:
        labels = [np.zeros(len(b.reshape(-1, 4)), np.int64) for b in boxes]
    check_targets(boxes, labels, N, H, W, num_classes)
    return boxes, labels
