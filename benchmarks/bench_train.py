"""Training speed of the demo detector: images per second and peak memory, with the same
network built in PyTorch (same weights) as the ratio baseline.

    python benchmarks/bench_train.py [--threads 2] [--batch 8] [--steps 5] [--samples 5] [--freeze-at 2]
    python benchmarks/bench_train.py --workers 2      (ours on 2 MPI ranks, PyTorch at --threads)

Ours: one full training step (forward, anchor matching and sampling, loss, backward, SGD).
PyTorch: forward and backward of the same backbone + FPN + shared head, with the head's
outputs given random gradients (the loss bookkeeping is not part of the baseline), then SGD.
Each sample times --steps steps of ours, then as many of PyTorch's (the two take turns); the
table gives the medians and the spread of the per-sample ratio. Peak memory is NumPy's
allocations during one of our steps, from tracemalloc.

With --freeze-at N (N >= 1) both detectors are fine-tuned as the paper's codebases do: ours with
the shipped pre-trained backbone, ``freeze_at=N`` and frozen batch norm; the twin with the same
parts' parameters set to ``requires_grad=False`` and every batch norm in eval mode (the same
function as frozen batch norm). Ours from scratch (freeze_at 0, live batch norm) takes turns
with them, so the table also gives what freezing saves: ours frozen / ours from scratch.

With --workers N (N > 1) the script re-runs itself as N MPI ranks (the ``parallel`` extra), each
with one BLAS thread, and ours is the data-parallel step of ``minifpn train --workers N``: each
rank's part of the batch, synchronized batch norm, the loss parts and the flat gradient summed
over the ranks, the same SGD step. Rank 0 also times the PyTorch twin at --threads threads, in
turn with ours, while the other ranks sleep (they poll a non-blocking barrier, so that they leave
the cores to PyTorch: a blocking MPI wait spins). Peak memory is then rank 0's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import tracemalloc

import numpy as np
from common import blas_report, interleaved, ratio_summary, setup_threads, table

from minifpn.data import DigitScenes
from minifpn.models.detector import Detector, DetectorConfig
from minifpn.optim import SGD
from minifpn.parallel import ONE_THREAD, mpi_size_from_env, mpiexec, split, synchronize_batch_norm, world


def torch_twin(det, torch):
    """The same detector in PyTorch modules with our parameter names, loaded with our weights
    (the FPN's; the backbone's and the head's keep torch's initialisation: speed does not depend
    on the values), frozen as ``det.backbone.freeze_at`` and ``norm`` say."""
    nn = torch.nn
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    from minifpn.interop import fpn_to_torchvision

    class Block(nn.Module):
        def __init__(self, b):
            super().__init__()

            def conv(c):
                return nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                                 bias=False)

            self.conv1, self.bn1 = conv(b.conv1), nn.BatchNorm2d(b.conv1.out_channels)
            self.conv2, self.bn2 = conv(b.conv2), nn.BatchNorm2d(b.conv2.out_channels)
            self.downsample = None
            if b.downsample is not None:
                self.downsample = nn.Sequential(conv(b.downsample[0]), nn.BatchNorm2d(b.conv1.out_channels))

        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            h = self.bn2(self.conv2(h))
            return torch.relu(h + (x if self.downsample is None else self.downsample(x)))

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            bb = det.backbone
            self.conv1 = nn.Conv2d(bb.in_channels, bb.widths[0], bb.conv1.kernel_size, 2, bb.conv1.padding,
                                   bias=False)
            self.bn1 = nn.BatchNorm2d(bb.widths[0])
            self.layers = nn.ModuleList([nn.Sequential(*[Block(b) for b in stage]) for stage in bb.stages])
            self.fpn = FeaturePyramidNetwork(list(bb.widths), det.config.channels,
                                             extra_blocks=LastLevelMaxPool())
            h = det.head
            self.conv = nn.Conv2d(h.conv.in_channels, h.conv.out_channels, 3, padding=1)
            self.cls = nn.Conv2d(h.conv.out_channels, h.cls_logits.out_channels, 1)
            self.box = nn.Conv2d(h.conv.out_channels, h.bbox_pred.out_channels, 1)

        def forward(self, x):
            x = torch.nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
            cs = {}
            for i, layer in enumerate(self.layers):
                x = layer(x)
                cs[str(i)] = x
            outs = []
            for p in self.fpn(cs).values():
                h = torch.relu(self.conv(p))
                outs += [self.cls(h), self.box(h)]
            return outs

    twin = Twin()
    twin.fpn.load_state_dict(fpn_to_torchvision(det.fpn.state_dict()))
    bb = det.backbone
    frozen = [twin.conv1, twin.bn1, *twin.layers][:bb.freeze_at + 1] if bb.freeze_at else []
    for module in frozen:
        for p in module.parameters():
            p.requires_grad = False
    if bb.norm == "frozen_bn":  # eval-mode batch norm with fixed affine: frozen batch norm's function
        for module in [twin.bn1, *twin.layers]:
            for m in module.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
                    for p in m.parameters():
                        p.requires_grad = False
    return twin


def training_steps(det, batches, comm=None):
    """(a function that runs one training step of ``det`` on each of ``batches[1:]``, the peak
    NumPy memory of one step); batches[0] warms up. SGD over the trainable parameters only.
    With ``comm`` of several ranks: the data-parallel step (``minifpn.train``), this rank's part."""
    if comm is not None and comm.size > 1:
        synchronize_batch_norm(det, comm)
    opt = SGD(det.named_trainable_parameters(), lr=0.001)
    rng = np.random.default_rng(0)

    def step(batch):
        images, boxes, labels = batch
        if comm is None or comm.size == 1:
            det.loss(images, boxes, labels, rng)
        else:
            start, stop = split(len(images), comm.size, comm.rank)
            _, parts = det.loss(images[start:stop], boxes, labels, rng, shard=(start, stop))
            comm.allreduce_(np.array(list(parts.values())))  # the global loss, as train records it
        opt.zero_grad()
        det.backward()
        if comm is not None:
            comm.allreduce_(opt.grad)
        opt.step()

    step(batches[0])  # warm-up
    tracemalloc.start()
    step(batches[0])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    def steps():
        for b in batches[1:]:
            step(b)
    return steps, peak


def polite_barrier(comm) -> None:
    """Wait for every rank without spinning a core (MPI's blocking barrier busy-polls)."""
    request = comm.comm.Ibarrier()
    while not request.Test():
        time.sleep(0.001)


def main_workers(args) -> None:
    """--workers N: ours on N ranks against the PyTorch twin at --threads on rank 0 (see above)."""
    if mpi_size_from_env() == 1:  # re-run this script as N ranks, each with one BLAS thread
        command = [mpiexec(), "-n", str(args.workers), sys.executable, *sys.argv]
        sys.exit(os.spawnve(os.P_WAIT, command[0], command, {**os.environ, **ONE_THREAD}))
    from threadpoolctl import threadpool_limits
    comm = world()
    _, torch = setup_threads(args.threads)  # PyTorch's threads (rank 0 alone runs it)
    limiter = threadpool_limits(limits=1, user_api="blas")  # noqa: F841 (NumPy: one thread a rank)
    det = Detector(DetectorConfig())
    scenes = DigitScenes("train", n=10 ** 6)
    batches = [scenes.batch(range(i * args.batch, (i + 1) * args.batch)) for i in range(args.steps + 1)]
    ours_steps, peak = training_steps(det, batches, comm)

    def ours():
        polite_barrier(comm)
        ours_steps()
    fns = {"ours": ours}
    if torch is not None and comm.rank == 0:
        twin_steps = torch_steps_of(torch_twin(det, torch), torch, batches)
        fns["torch"] = lambda: (twin_steps(), polite_barrier(comm))
    elif torch is not None:
        fns["torch"] = lambda: polite_barrier(comm)  # the others sleep while PyTorch runs
    times = interleaved(fns, samples=args.samples, min_time=0.0)
    if comm.rank == 0:
        print(blas_report(args.threads))
        report(args, times, peak, det, f"from scratch, {comm.size} ranks of 1 thread",
               f"from scratch, {args.threads} threads")


def torch_steps_of(twin, torch, batches):
    """A function that runs one forward + backward (random head gradients) + SGD step of the
    PyTorch ``twin`` on each of ``batches[1:]``."""
    t_opt = torch.optim.SGD(twin.parameters(), lr=0.001, momentum=0.9)
    images = [torch.tensor(b[0]) for b in batches]
    grads = [torch.randn(o.shape) for o in twin(images[0])]

    def t_step(x):
        t_opt.zero_grad()
        torch.autograd.backward(twin(x), grads)
        t_opt.step()

    def torch_steps():
        for x in images[1:]:
            t_step(x)
    return torch_steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1,
                        help="ours as this many MPI ranks of one thread each (needs the parallel extra)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="steps per sample")
    parser.add_argument("--samples", type=int, default=5, help="interleaved samples (ours, torch)")
    parser.add_argument("--freeze-at", type=int, default=0, choices=range(6),
                        help="fine-tune from the pre-trained backbone with this freeze_at and frozen "
                             "batch norm (0: from scratch, as the demo)")
    args = parser.parse_args()
    if args.workers < 1 or args.workers > args.batch:
        parser.error(f"--workers must be between 1 and --batch ({args.batch}), got {args.workers}")
    if args.workers > 1:
        if args.freeze_at:
            parser.error("--workers and --freeze-at: time one of them at a time")
        return main_workers(args)
    _, torch = setup_threads(args.threads)
    print(blas_report(args.threads))
    frozen = {"pretrained": True, "freeze_at": args.freeze_at, "norm": "frozen_bn"} if args.freeze_at else {}
    det = Detector(DetectorConfig(**frozen))
    scenes = DigitScenes("train", n=10 ** 6)
    batches = [scenes.batch(range(i * args.batch, (i + 1) * args.batch)) for i in range(args.steps + 1)]
    ours_steps, peak = training_steps(det, batches)
    fns = {"ours": ours_steps}
    if args.freeze_at:
        fns["ours, from scratch"], _ = training_steps(Detector(DetectorConfig()), batches)
    if torch is not None:
        fns["torch"] = torch_steps_of(torch_twin(det, torch), torch, batches)
    times = interleaved(fns, samples=args.samples, min_time=0.0)
    what = f"freeze_at {args.freeze_at}, frozen BN" if args.freeze_at else "from scratch"
    report(args, times, peak, det, what, what)


def report(args, times, peak, det, what, what_torch) -> None:
    """Print the table of medians and ratios of ``times`` (from ``interleaved``)."""
    ours = statistics.median(times["ours"]) / args.steps
    rows = [[f"minifpn (full training step, {what})", f"{ours * 1e3:.0f}", f"{args.batch / ours:.1f}",
             f"{peak / 2 ** 20:.0f}"]]
    if args.freeze_at:
        scratch = statistics.median(times["ours, from scratch"]) / args.steps
        rows.append(["minifpn (full training step, from scratch)", f"{scratch * 1e3:.0f}",
                     f"{args.batch / scratch:.1f}", ""])
        median, spread = ratio_summary(times["ours"], times["ours, from scratch"])
        rows.append([f"ratio (frozen / from scratch), median of {args.samples}", f"{median:.2f}",
                     f"spread {spread}", ""])
    if "torch" in times:
        theirs = statistics.median(times["torch"]) / args.steps
        rows.append([f"PyTorch twin (fwd + bwd + SGD, {what_torch})", f"{theirs * 1e3:.0f}",
                     f"{args.batch / theirs:.1f}", ""])
        median, spread = ratio_summary(times["ours"], times["torch"])
        rows.append([f"ratio (ours / torch), median of {args.samples}", f"{median:.2f}",
                     f"spread {spread}", ""])
    cfg = det.config
    print(f"demo detector: ResNet {cfg.widths}, FPN d={cfg.channels}, head shared over P2..P6, "
          f"batch {args.batch} of 1x128x128 scenes\n")
    print(table(rows, ["", "ms / step", "images / s", "peak MB"]))


if __name__ == "__main__":
    main()
