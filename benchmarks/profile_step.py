"""Where a training step of the demo detector goes: CPU time per functional op.

    python benchmarks/profile_step.py [--threads 1] [--steps 10]

Every op of minifpn.functional that the detector calls is wrapped with a timer (process time, so
another job on the machine inflates it less than wall time; run with --threads 1, where process
time is the work itself, not BLAS threads waiting). The rest of the step, "other", is the loss's
bookkeeping (anchor matching, sampling, targets), the head's reshapes and Python.
"""
from __future__ import annotations

import argparse
import collections
import time

import numpy as np
from common import setup_threads, table

import minifpn.functional as F
from minifpn.data import DigitScenes
from minifpn.models.detector import Detector, DetectorConfig
from minifpn.optim import SGD

OPS = ("conv2d", "conv2d_backward", "batch_norm", "batch_norm_backward", "relu", "relu_backward",
       "max_pool2d", "max_pool2d_backward", "upsample_nearest", "upsample_nearest_backward", "add",
       "softmax_cross_entropy", "softmax_cross_entropy_backward", "smooth_l1", "smooth_l1_backward")


def timed(spent: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.process_time() - start
    return wrapper


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    setup_threads(args.threads)
    spent = collections.defaultdict(float)
    for name in OPS:  # the layers call F.<op>, so wrapping the package's names times every call
        setattr(F, name, timed(spent, name, getattr(F, name)))
    det = Detector(DetectorConfig())
    opt = SGD(det.named_parameters(), lr=0.001)
    scenes = DigitScenes("train", n=8 * (args.steps + 1))
    batches = [scenes.batch(range(8 * i, 8 * i + 8)) for i in range(args.steps + 1)]
    rng = np.random.default_rng(0)

    def step(batch):
        det.loss(*batch, rng)
        opt.zero_grad()
        det.backward()
        opt.step()
    step(batches[0])
    spent.clear()
    start = time.process_time()
    for batch in batches[1:]:
        step(batch)
    total = (time.process_time() - start) / args.steps
    per_step = {k: v / args.steps for k, v in spent.items()}
    rows = [[k, f"{v * 1e3:.1f}", f"{100 * v / total:.0f} %"]
            for k, v in sorted(per_step.items(), key=lambda kv: -kv[1]) if v * 1e3 >= 0.05]
    rows.append(["other (bookkeeping, Python, SGD)", f"{(total - sum(per_step.values())) * 1e3:.1f}",
                 f"{100 * (1 - sum(per_step.values()) / total):.0f} %"])
    rows.append(["whole step", f"{total * 1e3:.1f}", "100 %"])
    print(f"demo detector, batch 8, {args.threads} BLAS thread(s), {args.steps} steps; "
          "process time per step\n")
    print(table(rows, ["op", "ms / step", "share"]))


if __name__ == "__main__":
    main()
