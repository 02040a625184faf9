"""Speed of minifpn's FPN against torchvision's FeaturePyramidNetwork on the same C2..C5.

    python benchmarks/bench_fpn.py [--threads 2] [--batch 8] [--size 128] [--samples 5]

C2..C5 as a ResNet-18 gives them on a size x size image (64/128/256/512 channels at strides
4/8/16/32), d = 256, P6 by LastLevelMaxPool, float32, same weights, same process, same threads.
"""
from __future__ import annotations

import argparse
import statistics
from collections import OrderedDict

import numpy as np
from common import blas_report, interleaved, ratio_summary, rng_array, setup_threads, table

from minifpn.interop import fpn_from_torchvision
from minifpn.models import FPN

WIDTHS = [64, 128, 256, 512]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=5, help="interleaved samples")
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

    fns = {"ours_f": ours_fwd, "ours_fb": ours_fwd_bwd}
    if torch is None:
        times = interleaved(fns, args.samples)
        print("torch is not installed: no ratio")
        print(table([["minifpn FPN", f"{statistics.median(times['ours_f']) * 1e3:.1f}",
                      f"{statistics.median(times['ours_fb']) * 1e3:.1f}"]], ["", "fwd ms", "fwd+bwd ms"]))
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

    fns.update({"torch_f": torch_fwd, "torch_fb": torch_fwd_bwd})
    times = interleaved(fns, args.samples)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    rows = [["minifpn FPN", f"{med['ours_f']:.1f}", f"{med['ours_fb']:.1f}"],
            ["torchvision FPN", f"{med['torch_f']:.1f}", f"{med['torch_fb']:.1f}"]]
    ratios = [ratio_summary(times[f"ours_{w}"], times[f"torch_{w}"]) for w in ("f", "fb")]
    rows.append([f"ratio (ours / torch), median of {args.samples}"] + [f"{m:.2f}" for m, _ in ratios])
    rows.append(["spread of the ratio (min-max)"] + [s for _, s in ratios])
    print(f"C2..C5 of a {args.size}x{args.size} image: {[tuple(c.shape) for c in features]}, "
          f"d = 256, float32; the two take turns in each of {args.samples} samples\n")
    print(table(rows, ["", "fwd ms", "fwd+bwd ms"]))


if __name__ == "__main__":
    main()
