"""Speed of minifpn's conv2d against torch.nn.functional.conv2d, in one process, same threads.

    python benchmarks/bench_conv.py [--threads 2] [--batch 8] [--samples 5]

Prints, for each FPN-typical shape (float32), our time and PyTorch's for the forward and for
forward+backward, their ratio (ours / torch: 1.0 is parity, higher is slower) and our GFLOP/s.
Absolute times on shared machines are noisy; the ratios are what to read.
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
from common import blas_report, interleaved, ratio_cell, rng_array, setup_threads, table

from minifpn import functional as F

# (label, C, OC, kernel, size): the bottom-up 3x3 convs, the 1x1 laterals, the 3x3 outputs
SHAPES = (
    [(f"3x3 {c}->{c} @{s}", c, c, 3, s) for c, s in ((64, 32), (128, 16), (256, 8), (512, 4))]
    + [(f"1x1 {c}->256 @{s}", c, 256, 1, s) for c, s in ((64, 32), (128, 16), (256, 8), (512, 4))]
    + [(f"3x3 256->256 @{s}", 256, 256, 3, s) for s in (32, 16, 8, 4)]
)


def bench_shape(C, OC, k, size, batch, torch, rng, samples):
    pad = k // 2
    x, w, b = rng_array(rng, (batch, C, size, size)), rng_array(rng, (OC, C, k, k)), rng_array(rng, (OC,))
    dout = rng_array(rng, (batch, OC, size, size))
    flops = 2 * batch * OC * C * k * k * size * size  # multiply-adds of the forward, x2

    def ours_fwd():
        return F.conv2d(x, w, b, 1, pad)

    def ours_fwd_bwd():
        _, cache = F.conv2d(x, w, b, 1, pad)
        return F.conv2d_backward(dout, cache)

    fns = {"ours_f": ours_fwd, "ours_fb": ours_fwd_bwd}
    if torch is not None:
        tx = torch.tensor(x, requires_grad=True)
        tw = torch.tensor(w, requires_grad=True)
        tb = torch.tensor(b, requires_grad=True)
        tdout = torch.tensor(dout)

        def torch_fwd():
            with torch.no_grad():
                return torch.nn.functional.conv2d(tx, tw, tb, 1, pad)

        def torch_fwd_bwd():
            out = torch.nn.functional.conv2d(tx, tw, tb, 1, pad)
            out.backward(tdout)

        fns.update({"torch_f": torch_fwd, "torch_fb": torch_fwd_bwd})
    return interleaved(fns, samples), flops


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--samples", type=int, default=5, help="interleaved samples per shape")
    args = parser.parse_args()
    _, torch = setup_threads(args.threads)
    print(blas_report(args.threads))
    print(f"torch: {torch.__version__ if torch else 'not installed (no ratios)'}; "
          f"float32, batch {args.batch}\n")
    rng = np.random.default_rng(0)
    keys = ("ours_f", "ours_fb", "torch_f", "torch_fb") if torch is not None else ("ours_f", "ours_fb")
    rows, sums = [], {k: [0.0] * args.samples for k in keys}  # per sample, summed over the shapes
    nan = float("nan")
    for label, C, OC, k, size in SHAPES:
        times, flops = bench_shape(C, OC, k, size, args.batch, torch, rng, args.samples)
        for key in keys:
            sums[key] = [a + b for a, b in zip(sums[key], times[key])]
        med = {key: statistics.median(times[key]) for key in keys}
        rows.append([label, f"{med['ours_f'] * 1e3:.2f}", f"{med.get('torch_f', nan) * 1e3:.2f}",
                     ratio_cell(times, "f"), f"{med['ours_fb'] * 1e3:.2f}",
                     f"{med.get('torch_fb', nan) * 1e3:.2f}", ratio_cell(times, "fb"),
                     f"{flops / med['ours_f'] / 1e9:.1f}", f"{3 * flops / med['ours_fb'] / 1e9:.1f}"])
    med = {key: statistics.median(sums[key]) for key in keys}
    rows.append(["sum", f"{med['ours_f'] * 1e3:.2f}", f"{med.get('torch_f', nan) * 1e3:.2f}",
                 ratio_cell(sums, "f"), f"{med['ours_fb'] * 1e3:.2f}",
                 f"{med.get('torch_fb', nan) * 1e3:.2f}", ratio_cell(sums, "fb"), "", ""])
    print(table(rows, ["conv2d (float32)", "fwd ms", "torch ms", "ratio (spread)", "fwd+bwd ms",
                       "torch ms", "ratio (spread)", "fwd GFLOP/s", "f+b GFLOP/s"]))
    print(f"\nratio = ours / torch (1.00 is parity): the median of {args.samples} interleaved "
          "samples, and in brackets the lowest and highest; the sum's ratio is per sample over "
          "all shapes. f+b GFLOP/s counts 3x the forward's FLOPs.")



if __name__ == "__main__":
    main()
