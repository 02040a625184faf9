"""Speed of minifpn's FPN against torchvision's FeaturePyramidNetwork on the same C2..C5.

    python benchmarks/bench_fpn.py [--threads 2] [--batch 8] [--size 128]

C2..C5 as a ResNet-18 gives them on a size x size image (64/128/256/512 channels at strides
4/8/16/32), d = 256, P6 by LastLevelMaxPool, float32, same weights, same process, same threads.
"""
from __future__ import annotations

import argparse
from collections import OrderedDict

import numpy as np
from common import blas_report, rng_array, setup_threads, table, timeit

from minifpn.interop import fpn_from_torchvision
from minifpn.models import FPN

WIDTHS = [64, 128, 256, 512]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    _, torch = setup_threads(args.threads)
    print(blas_report(args.threads))
    rng = np.random.default_rng(0)
    sizes = [args.size // s for s in (4, 8, 16, 32)]
    features = [rng_array(rng, (args.batch, c, s, s)) for c, s in zip(WIDTHS, sizes)]
    ours = FPN(WIDTHS, 256)
    outputs = ours(features)
    douts = [rng_array(rng, o.shape) for o in outputs]

    def ours_fwd():
        return ours(features)

    def ours_fwd_bwd():
        ours(features)
        return ours.backward(douts)

    rows = [["minifpn FPN", f"{timeit(ours_fwd, args.repeats) * 1e3:.1f}",
             f"{timeit(ours_fwd_bwd, args.repeats) * 1e3:.1f}"]]
    if torch is None:
        print("torch is not installed: no ratio")
        print(table(rows, ["", "fwd ms", "fwd+bwd ms"]))
        return
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
    theirs = FeaturePyramidNetwork(WIDTHS, 256, extra_blocks=LastLevelMaxPool())
    ours.load_state_dict(fpn_from_torchvision(theirs.state_dict()))
    t_features = OrderedDict((f"c{i}", torch.tensor(c, requires_grad=True))
                             for i, c in enumerate(features))
    t_douts = [torch.tensor(d) for d in douts]

    def torch_fwd():
        with torch.no_grad():
            return theirs(t_features)

    def torch_fwd_bwd():
        out = theirs(t_features)
        torch.autograd.backward(list(out.values()), t_douts)

    t_f, t_fb = timeit(torch_fwd, args.repeats), timeit(torch_fwd_bwd, args.repeats)
    rows.append(["torchvision FPN", f"{t_f * 1e3:.1f}", f"{t_fb * 1e3:.1f}"])
    o_f, o_fb = float(rows[0][1]) / 1e3, float(rows[0][2]) / 1e3
    rows.append(["ratio (ours / torch)", f"{o_f / t_f:.2f}", f"{o_fb / t_fb:.2f}"])
    print(f"C2..C5 of a {args.size}x{args.size} image: {[tuple(c.shape) for c in features]}, "
          f"d = 256, float32\n")
    print(table(rows, ["", "fwd ms", "fwd+bwd ms"]))


if __name__ == "__main__":
    main()
