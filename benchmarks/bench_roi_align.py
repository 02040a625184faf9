"""Speed of minifpn's roi_align and RoIPooler against torchvision.ops.roi_align, in one process,
same threads, at the two-stage detector's shapes.

    python benchmarks/bench_roi_align.py [--threads 2] [--batch 8] [--rois-per-image 128] [--samples 5]

P2..P5 of a 128-px image (32, 16, 8, 4 cells square), 64 channels, float32; 128 RoIs per image
with sides of 3.5-73 px (the digits' range, log-uniform, aspect ratios 1:2 to 2:1), 7 x 7 bins,
aligned=True. Table 1: roi_align on each level with the RoIs Eq. (1) sends there (as the pooler
calls it), and on P2 with every RoI (``--pooling p2``), for sampling_ratio 2 (the pooler's) and -1
(adaptive). Table 2: the RoIPooler against the same steps in PyTorch (Eq. (1) by torchvision's
LevelMapper, then torchvision's roi_align per level, as MultiScaleRoIAlign does but aligned).
Absolute times on shared machines are noisy; the ratios are what to read.
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
from common import blas_report, interleaved, ratio_cell, rng_array, setup_threads, table

from minifpn import functional as F
from minifpn.detection import map_levels
from minifpn.models import RoIPooler

LEVELS = (2, 3, 4, 5)
CANONICAL = 32  # the pooler's canonical_size (P4's anchor size)


def make_rois(rng, batch: int, per_image: int, image: int) -> np.ndarray:
    """(batch * per_image, 5) float32 rows (n, x1, y1, x2, y2), sorted by image as the detector's."""
    side = np.exp(rng.uniform(np.log(3.5), np.log(73.0), (batch * per_image, 1)))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), (batch * per_image, 1)))
    wh = np.concatenate([side * np.sqrt(aspect), side / np.sqrt(aspect)], 1)
    xy = rng.uniform(0, 1, (batch * per_image, 2)) * (image - wh)
    n = np.repeat(np.arange(batch), per_image)[:, None]
    return np.concatenate([n, xy, xy + wh], 1).astype(np.float32)


def bench_roi_align(fmap, boxes, scale, ratio, torch, rng, samples):
    out, _ = F.roi_align(fmap, boxes, 7, scale, ratio, True)
    dout = rng_array(rng, out.shape)

    def ours_fwd():
        return F.roi_align(fmap, boxes, 7, scale, ratio, True)

    def ours_fwd_bwd():
        _, cache = F.roi_align(fmap, boxes, 7, scale, ratio, True)
        return F.roi_align_backward(dout, cache)

    fns = {"ours_f": ours_fwd, "ours_fb": ours_fwd_bwd}
    if torch is not None:
        from torchvision.ops import roi_align
        tx, tboxes, tdout = torch.tensor(fmap, requires_grad=True), torch.tensor(boxes), torch.tensor(dout)

        def torch_fwd():
            with torch.no_grad():
                return roi_align(tx, tboxes, 7, scale, ratio, True)

        def torch_fwd_bwd():
            tx.grad = None
            roi_align(tx, tboxes, 7, scale, ratio, True).backward(tdout)

        fns.update({"torch_f": torch_fwd, "torch_fb": torch_fwd_bwd})
    return interleaved(fns, samples)


def bench_pooler(maps, rois, torch, rng, samples):
    pooler = RoIPooler(LEVELS, 7, 2, CANONICAL, 4, True)
    dpooled = rng_array(rng, pooler(maps, rois).shape)

    def ours_fwd():
        return pooler(maps, rois)

    def ours_fwd_bwd():
        pooler(maps, rois)
        return pooler.backward(dpooled)

    fns = {"ours_f": ours_fwd, "ours_fb": ours_fwd_bwd}
    if torch is not None:
        from torchvision.ops import roi_align
        from torchvision.ops.poolers import LevelMapper
        mapper = LevelMapper(LEVELS[0], LEVELS[-1], canonical_scale=CANONICAL, canonical_level=4)
        tmaps = [torch.tensor(m, requires_grad=True) for m in maps]
        trois, tdpooled = torch.tensor(rois), torch.tensor(dpooled)

        def torch_pool():  # torchvision's _multiscale_roi_align, with aligned=True
            levels = mapper([trois[:, 1:]])
            result = trois.new_zeros((len(trois), maps[0].shape[1], 7, 7))
            for i, (k, tmap) in enumerate(zip(LEVELS, tmaps)):
                index = torch.where(levels == i)[0]
                result[index] = roi_align(tmap, trois[index], 7, 1.0 / 2 ** k, 2, True).to(result.dtype)
            return result

        def torch_fwd():
            with torch.no_grad():
                return torch_pool()

        def torch_fwd_bwd():
            for t in tmaps:
                t.grad = None
            torch_pool().backward(tdpooled)

        fns.update({"torch_f": torch_fwd, "torch_fb": torch_fwd_bwd})
    return interleaved(fns, samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rois-per-image", type=int, default=128)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--samples", type=int, default=5, help="interleaved samples per row")
    args = parser.parse_args()
    _, torch = setup_threads(args.threads)
    print(blas_report(args.threads))
    rng = np.random.default_rng(0)
    image = 128
    maps = [rng_array(rng, (args.batch, args.channels, image // 2 ** k, image // 2 ** k)) for k in LEVELS]
    rois = make_rois(rng, args.batch, args.rois_per_image, image)
    assigned = map_levels(rois[:, 1:], LEVELS[0], LEVELS[-1], CANONICAL, 4)
    print(f"torch: {torch.__version__ if torch else 'not installed (no ratios)'}; float32, "
          f"{args.batch} images, {args.channels} channels, {len(rois)} RoIs (per level P2..P5: "
          f"{', '.join(str(int((assigned == k).sum())) for k in LEVELS)}), 7 x 7, aligned\n")
    keys = ("ours_f", "ours_fb", "torch_f", "torch_fb") if torch is not None else ("ours_f", "ours_fb")
    rows = []
    for ratio in (2, -1):
        sums = {k: [0.0] * args.samples for k in keys}  # per sample, over the four levels
        for k, fmap in zip(LEVELS, maps):
            times = bench_roi_align(fmap, rois[assigned == k], 1.0 / 2 ** k, ratio, torch, rng,
                                    args.samples)
            sums = {key: [a + b for a, b in zip(sums[key], times[key])] for key in keys}
            rows.append(_row(f"P{k}, its {int((assigned == k).sum())} RoIs, ratio {ratio}", times, keys))
        rows.append(_row(f"P2..P5 summed, ratio {ratio}", sums, keys))
        times = bench_roi_align(maps[0], rois, 0.25, ratio, torch, rng, args.samples)
        rows.append(_row(f"P2, all {len(rois)} RoIs, ratio {ratio}", times, keys))
    header = ["roi_align (float32)", "fwd ms", "torch ms", "ratio (spread)", "fwd+bwd ms", "torch ms",
              "ratio (spread)"]
    print(table(rows, header))
    times = bench_pooler(maps, rois, torch, rng, args.samples)
    print()
    print(table([_row("RoIPooler P2..P5, ratio 2", times, keys)], ["pooler"] + header[1:]))
    print(f"\nratio = ours / torch (1.00 is parity, higher is slower): the median of {args.samples} "
          "interleaved samples, and in brackets the lowest and highest; a summed row's ratio is per "
          "sample over its levels.")


def _row(label, times, keys):
    nan = float("nan")
    med = {key: statistics.median(times[key]) for key in keys}
    return [label, f"{med['ours_f'] * 1e3:.2f}", f"{med.get('torch_f', nan) * 1e3:.2f}",
            ratio_cell(times, "f"), f"{med['ours_fb'] * 1e3:.2f}", f"{med.get('torch_fb', nan) * 1e3:.2f}",
            ratio_cell(times, "fb")]



if __name__ == "__main__":
    main()
