"""Device operations (kernel launches) and device-to-host synchronisations per training step of
the demo detector, counted on the strict CuPy stand-in (tests/strict_cupy): no GPU needed.

    python benchmarks/count_device_ops.py [--steps 3] [--by-function]

Counts, not times: every elementwise op, reduction, copy, gather, GEMM and in-place write is one
operation; views are none (see strict_cupy.launch_count). On a GPU each one is a kernel launch of
a few microseconds, so a step of thousands of small operations is launch-bound.
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import traceback

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import strict_cupy  # noqa: E402

from minifpn.backend import to_device, use_cupy_module  # noqa: E402
from minifpn.data import DigitScenes  # noqa: E402
from minifpn.models.detector import Detector, DetectorConfig  # noqa: E402
from minifpn.optim import SGD  # noqa: E402


def where_counter():
    """Wrap the stand-in's counter to tally operations by the minifpn function that made them."""
    tally = collections.Counter()
    count = strict_cupy._launch

    def counting(result=None, *sources):
        before = strict_cupy.launch_count()
        count(result, *sources)
        if strict_cupy.launch_count() > before:
            frames = [f for f in traceback.extract_stack()[:-1] if "/minifpn/" in f.filename]
            tally[f"{frames[-1].filename.split('/minifpn/')[1]}:{frames[-1].name}" if frames else "?"] += 1
    strict_cupy._launch = counting
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--by-function", action="store_true", help="tally operations by function")
    args = parser.parse_args()
    use_cupy_module(strict_cupy)
    tally = where_counter() if args.by_function else None
    det = Detector(DetectorConfig()).to("cupy")
    optimizer = SGD(det.named_parameters(), 0.01)
    scenes = DigitScenes("train", n=8 * args.steps)
    rng = np.random.default_rng(0)
    for step in range(args.steps):
        images, boxes, labels = scenes.batch(range(8 * step, 8 * step + 8))
        if tally is not None:
            tally.clear()
        strict_cupy.reset_launch_count()
        strict_cupy.reset_sync_count()
        det.loss(to_device(images, "cupy"), boxes, labels, rng)
        forward = strict_cupy.launch_count()
        optimizer.zero_grad()
        det.backward()
        backward = strict_cupy.launch_count() - forward
        optimizer.step()
        total = strict_cupy.launch_count()
        print(f"step {step}: forward + loss {forward}, backward {backward}, "
              f"zero_grad + SGD {total - forward - backward}; {total} operations, "
              f"{strict_cupy.sync_count()} synchronisations")
    if tally is not None:
        for name, n in tally.most_common(15):
            print(f"{n:6d}  {name}")


if __name__ == "__main__":
    main()
