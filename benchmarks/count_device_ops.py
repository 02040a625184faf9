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
import tempfile
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import strict_cupy  # noqa: E402

from minifpn.backend import use_cupy_module  # noqa: E402
from minifpn.models.detector import Detector, DetectorConfig  # noqa: E402
from minifpn.train import TrainConfig, _Run, weight_norms  # noqa: E402


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


def _phase_counter(counts: collections.Counter, phase: str, fn):
    """Wrap ``fn`` so that the operations it makes are tallied under ``phase``."""
    def wrapped(*args, **kwargs):
        before = strict_cupy.launch_count()
        try:
            return fn(*args, **kwargs)
        finally:
            counts[phase] += strict_cupy.launch_count() - before
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--by-function", action="store_true", help="tally operations by function")
    parser.add_argument("--top", type=int, default=15, help="functions to list with --by-function")
    args = parser.parse_args()
    use_cupy_module(strict_cupy)
    tally = where_counter() if args.by_function else None
    det = Detector(DetectorConfig()).to("cupy")
    with tempfile.TemporaryDirectory() as run_dir:
        run = _Run(det, TrainConfig(batch_size=8, iterations=100), run_dir, log=lambda _: None)
        run.norm = weight_norms(det)[0]  # as `train` sets it before the first step
        phases = collections.Counter()
        det.loss = _phase_counter(phases, "forward + loss", det.loss)
        det.backward = _phase_counter(phases, "backward", det.backward)
        for name in ("zero_grad", "step"):
            setattr(run.optimizer, name, _phase_counter(phases, "zero_grad + SGD",
                                                        getattr(run.optimizer, name)))
        for step in range(args.steps):
            if tally is not None:
                tally.clear()
            phases.clear()
            strict_cupy.reset_launch_count()
            strict_cupy.reset_sync_count()
            run.step(step)  # what `train` runs per step: loss, backward, SGD and the checks
            total = strict_cupy.launch_count()
            phases["checks and bookkeeping"] = total - sum(phases.values())
            print(f"step {step}: " + ", ".join(f"{k} {v}" for k, v in phases.items())
                  + f"; {total} operations, {strict_cupy.sync_count()} synchronisations")
    if tally is not None:
        for name, n in tally.most_common(args.top):
            print(f"{n:6d}  {name}")


if __name__ == "__main__":
    main()
