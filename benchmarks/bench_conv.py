"""Speed of minifpn's conv2d against torch.nn.functional.conv2d, in one process, same threads.

    python benchmarks/bench_conv.py [--threads 2] [--batch 8]

Prints, for each FPN-typical shape (float32), our time and PyTorch's for the forward and for
forward+backward, their ratio (ours / torch: 1.0 is parity, higher is slower) and our GFLOP/s.
Absolute times on shared machines are noisy; the ratios are what to read.
"""
from __future__ import annotations

import argparse

import numpy as np
from common import blas_report, rng_array, setup_threads, table, timeit

from minifpn import functional as F

# (label, C, OC, kernel, size): the bottom-up 3x3 convs, the 1x1 laterals, the 3x3 outputs
SHAPES = (
    [(f"3x3 {c}->{c} @{s}", c, c, 3, s) for c, s in ((64, 32), (128, 16), (256, 8), (512, 4))]
    + [(f"1x1 {c}->256 @{s}", c, 256, 1, s) for c, s in ((64, 32), (128, 16), (256, 8), (512, 4))]
    + [(f"3x3 256->256 @{s}", 256, 256, 3, s) for s in (32, 16, 8, 4)]
)


def bench_shape(C, OC, k, size, batch, torch, rng, repeats):
    pad = k // 2
    x, w, b = rng_array(rng, (batch, C, size, size)), rng_array(rng, (OC, C, k, k)), rng_array(rng, (OC,))
    dout = rng_array(rng, (batch, OC, size, size))
    flops = 2 * batch * OC * C * k * k * size * size  # multiply-adds of the forward, x2

    def ours_fwd():
        return F.conv2d(x, w, b, 1, pad)

    def ours_fwd_bwd():
        _, cache = F.conv2d(x, w, b, 1, pad)
        return F.conv2d_backward(dout, cache)

    row = {"ours_f": timeit(ours_fwd, repeats), "ours_fb": timeit(ours_fwd_bwd, repeats),
           "flops": flops}
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

        row["torch_f"] = timeit(torch_fwd, repeats)
        row["torch_fb"] = timeit(torch_fwd_bwd, repeats)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    _, torch = setup_threads(args.threads)
    print(blas_report(args.threads))
    print(f"torch: {torch.__version__ if torch else 'not installed (no ratios)'}; "
          f"float32, batch {args.batch}\n")
    rng = np.random.default_rng(0)
    rows, sums = [], {"ours_f": 0.0, "ours_fb": 0.0, "torch_f": 0.0, "torch_fb": 0.0}
    for label, C, OC, k, size in SHAPES:
        r = bench_shape(C, OC, k, size, args.batch, torch, rng, args.repeats)
        for key in sums:
            sums[key] += r.get(key, float("nan"))
        rows.append([label, f"{r['ours_f'] * 1e3:.2f}", f"{r.get('torch_f', float('nan')) * 1e3:.2f}",
                     f"{r['ours_f'] / r.get('torch_f', float('nan')):.2f}",
                     f"{r['ours_fb'] * 1e3:.2f}", f"{r.get('torch_fb', float('nan')) * 1e3:.2f}",
                     f"{r['ours_fb'] / r.get('torch_fb', float('nan')):.2f}",
                     f"{r['flops'] / r['ours_f'] / 1e9:.1f}", f"{3 * r['flops'] / r['ours_fb'] / 1e9:.1f}"])
    rows.append(["sum", f"{sums['ours_f'] * 1e3:.2f}", f"{sums['torch_f'] * 1e3:.2f}",
                 f"{sums['ours_f'] / sums['torch_f']:.2f}", f"{sums['ours_fb'] * 1e3:.2f}",
                 f"{sums['torch_fb'] * 1e3:.2f}", f"{sums['ours_fb'] / sums['torch_fb']:.2f}", "", ""])
    print(table(rows, ["conv2d (float32)", "fwd ms", "torch ms", "ratio", "fwd+bwd ms",
                       "torch ms", "ratio", "fwd GFLOP/s", "f+b GFLOP/s"]))
    print("\nratio = ours / torch (1.00 is parity); f+b GFLOP/s counts 3x the forward's FLOPs.")


if __name__ == "__main__":
    main()
