"""Peak memory of a training step of the demo detector, and of a ResNet-18 FPN on 512x512 images.

    python benchmarks/bench_memory.py [--size 512] [--batch 2]

Peak memory is what NumPy allocates during the measured call (tracemalloc sees NumPy's
buffers), above what was allocated before it: activations kept for the backward, im2col
columns, gradients. Weights allocated beforehand are not counted; their size is printed beside.
"""
from __future__ import annotations

import argparse
import tracemalloc

import numpy as np
from common import setup_threads, table

from minifpn.data import DigitScenes
from minifpn.models import FPN, resnet18
from minifpn.models.detector import Detector, DetectorConfig
from minifpn.optim import SGD


def peak_mb(fn) -> float:
    """Peak traced allocation in MB during ``fn()``, above the allocations before it."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return (peak - before) / 2 ** 20


def weights_mb(*modules) -> float:
    return sum(p.data.nbytes for m in modules for p in m.parameters()) / 2 ** 20


def demo_step() -> list:
    det = Detector(DetectorConfig())
    opt = SGD(det.named_parameters(), lr=0.001)
    images, boxes, labels = DigitScenes("train", n=8).batch(range(8))
    rng = np.random.default_rng(0)

    def step():
        det.loss(images, boxes, labels, rng)
        opt.zero_grad()
        det.backward()
        opt.step()
    step()  # the first step allocates the momentum buffer; measure a later one
    return ["demo detector, one training step (batch 8 of 1x128x128)", f"{peak_mb(step):.0f}",
            f"{weights_mb(det):.1f}"]


def resnet18_fpn(size: int, batch: int) -> list:
    backbone, fpn = resnet18(in_channels=3), FPN([64, 128, 256, 512], 256)
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)

    def forward_backward():
        outputs = fpn(backbone(x))
        backbone.backward(fpn.backward([np.ones_like(o) for o in outputs]))
    forward_backward()
    return [f"ResNet-18 + FPN (d = 256), forward + backward, batch {batch} of 3x{size}x{size}",
            f"{peak_mb(forward_backward):.0f}", f"{weights_mb(backbone, fpn):.1f}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    setup_threads(2)
    rows = [demo_step(), resnet18_fpn(args.size, args.batch)]
    print(table(rows, ["", "peak MB", "weights MB"]))


if __name__ == "__main__":
    main()
