"""The ``minifpn`` command. Run ``minifpn --help`` for the list of jobs."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .models.detector import DetectorConfig

DEFAULTS = DetectorConfig()
DEMO_ITERATIONS = 1600  # about 245 s on 2 cores; the schedule's decays land inside the run
DEMO_TIME_LIMIT = 255  # seconds of training at most, so that the demo ends within 5 minutes


def cmd_gradcheck(args) -> int:
    from .backend import get_backend
    from .gradcheck import format_table, standard_checks

    get_backend(args.backend)  # a clear error now if the backend cannot be used
    start = time.perf_counter()
    results = standard_checks(backend=args.backend, seed=args.seed)
    print(f"Gradient checks in float64 on {args.backend}: central differences (h = 1e-5) "
          f"against each hand-written backward,\nwith a random upstream gradient; "
          f"an entry passes below a max relative error of 1e-6.\n")
    print(format_table(results))
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)} of {len(results)} passed "
          f"in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


# ---- training, evaluation, the demo --------------------------------------------------------

def _detector_config(args):
    from .models.detector import DetectorConfig
    return DetectorConfig(setting=args.setting, channels=args.channels,
                          num_classes=args.num_classes,
                          widths=tuple(int(w) for w in args.widths.split(",")), seed=args.seed,
                          anchors_per_image=args.anchors_per_image,
                          positive_fraction=args.positive_fraction,
                          positive_iou=args.positive_iou, negative_iou=args.negative_iou)


def _train_config(args):
    from .train import TrainConfig
    return TrainConfig(iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
                       warmup=args.warmup, seed=args.seed, checkpoint_every=args.checkpoint_every)


def _train_and_report(args, run_dir: str, time_limit=None, artifacts: bool = True) -> dict:
    """Train (or resume), evaluate on the test split, print the AP/AR table and write
    metrics.json (and the figures) into ``run_dir``."""
    from .backend import get_backend
    from .detection.metrics import format_metrics
    from .models.detector import Detector
    from .train import evaluate_detector, train

    get_backend(args.backend)
    detector = Detector(_detector_config(args)).to(args.backend)
    tcfg = _train_config(args)
    start = time.perf_counter()
    history = train(detector, tcfg, run_dir, resume=getattr(args, "resume", False),
                    progress=not args.quiet, time_limit=time_limit)
    train_seconds = time.perf_counter() - start
    metrics, detections, truths = evaluate_detector(detector, "test", args.eval_scenes)
    total = time.perf_counter() - start
    images_seen = len(history["iteration"]) * tcfg.batch_size
    summary = {"setting": detector.config.setting, "metrics": metrics,
               "iterations": len(history["iteration"]), "images_seen": images_seen,
               "train_seconds": round(train_seconds, 1), "total_seconds": round(total, 1),
               "test_scenes": args.eval_scenes, "detector_config": detector.config.to_dict()}
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\n{detector.config.setting}: {summary['iterations']} iterations "
          f"({images_seen} images) in {train_seconds:.0f} s; test split, {args.eval_scenes} scenes:")
    print(format_metrics(metrics))
    if artifacts:
        _write_figures(detector, history, detections, truths, run_dir)
        print(f"\nwrote {run_dir}/: metrics.json, checkpoint.npz, loss_curve.png, "
              f"detections.png, pyramid.png")
    return summary


def _write_figures(detector, history, detections, truths, run_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .backend import to_device
    from .data import DigitScenes
    from .viz import plot_detections, plot_loss_curve, plot_pyramid

    plot_loss_curve(history).savefig(os.path.join(run_dir, "loss_curve.png"), dpi=100)
    scenes = DigitScenes("test", n=len(detections))
    shown = min(12, len(detections))
    images = [scenes[i][0] for i in range(shown)]
    plot_detections(images, detections[:shown], truths[:shown]).savefig(
        os.path.join(run_dir, "detections.png"), dpi=100)
    if hasattr(detector, "fpn"):
        detector.fpn.trace = True
        detector.eval()
        detector.features(to_device(images[0][None], detector.backend))
        plot_pyramid(detector.fpn.maps, title="pyramid maps of test scene 0").savefig(
            os.path.join(run_dir, "pyramid.png"), dpi=90)
        detector.fpn.trace = False
    plt.close("all")


def cmd_demo(args) -> int:
    run_dir = os.path.join(args.runs, args.name)
    print(f"Training the FPN detector on multi-scale digit scenes for up to {args.iterations} "
          f"iterations or {args.time_limit:.0f} s, then evaluating on the test split.\n")
    summary = _train_and_report(args, run_dir, time_limit=args.time_limit)
    print(f"\nAP50 {summary['metrics']['AP50']:.3f} in {summary['total_seconds']:.0f} s in all.")
    return 0


def cmd_train(args) -> int:
    run_dir = os.path.join(args.runs, args.name or args.setting)
    _train_and_report(args, run_dir, time_limit=args.time_limit)
    return 0


def cmd_evaluate(args) -> int:
    from .detection.metrics import format_metrics
    from .train import detector_from_checkpoint, evaluate_detector

    detector, ckpt = detector_from_checkpoint(args.checkpoint, args.backend)
    metrics, _, _ = evaluate_detector(detector, args.split, args.scenes)
    print(f"{args.checkpoint}: setting {detector.config.setting}, trained "
          f"{ckpt['meta']['iteration']} iterations; {args.split} split, {args.scenes} scenes:")
    print(format_metrics(metrics))
    if args.json:
        print(json.dumps(metrics))
    return 0


# Lin et al. 2017, Table 1 (RPN proposals on COCO minival), in %: AR^1k, AR^1k_s, AR^1k_m,
# AR^1k_l, i.e. recall with 1000 proposals per image, overall and by object size.
PAPER_TABLE1 = {
    "c4": (48.3, 32.0, 58.7, 62.2), "c5": (44.9, 25.3, 55.5, 64.2),
    "fpn": (56.3, 44.9, 63.4, 66.2), "bottom_up": (49.5, 30.5, 59.9, 68.0),
    "no_lateral": (46.1, 26.5, 57.4, 64.7), "p2_only": (51.3, 35.1, 59.7, 67.6),
}
PAPER_TABLE1_AR100 = {"c4": 36.1, "c5": 36.3, "fpn": 44.0, "bottom_up": 37.4,
                      "no_lateral": 34.5, "p2_only": 38.4}  # the paper's AR^100 column


def ablation_table(summaries: list) -> str:
    """Markdown table of the settings at one budget, beside the paper's Table 1. Ours keep at
    most 100 detections per 128-px scene of at most 5 digits; we set them beside the paper's
    AR^1k (1000 proposals per COCO image of about 7 objects), and show its AR^100 too."""
    from .models.detector import SETTINGS
    lines = ["| setting | AR@100 | AR_s | AR_m | AR_l | AP | AP50 | paper AR^100 | paper AR^1k | "
             "paper AR^1k_s | paper AR^1k_m | paper AR^1k_l |", "|" + "---|" * 12]
    for s in summaries:
        m = s["metrics"]
        paper = (PAPER_TABLE1_AR100[s["setting"]],) + PAPER_TABLE1[s["setting"]]
        cells = [SETTINGS[s["setting"]]] + [f"{100 * m[k]:.1f}" for k in
                                            ("AR@100", "AR_small", "AR_medium", "AR_large", "AP", "AP50")]
        lines.append("| " + " | ".join(cells + [f"{v:.1f}" for v in paper]) + " |")
    return "\n".join(lines)


def cmd_ablation(args) -> int:
    from .models.detector import TABLE1
    settings = [TABLE1.get(s.strip(), s.strip()) for s in args.settings.split(",")]
    summaries = []
    for setting in settings:
        args.setting = setting
        print(f"\n=== {setting} ===")
        summaries.append(_train_and_report(args, os.path.join(args.runs, args.name, setting),
                                           time_limit=args.time_limit, artifacts=False))
    table = ablation_table(summaries)
    with open(os.path.join(args.runs, args.name, "table1.json"), "w") as f:
        json.dump(summaries, f, indent=2)
    out = os.path.join(args.runs, args.name, "table1.md")
    with open(out, "w") as f:
        f.write(f"Table 1 at this scale: {args.iterations} iterations of batch {args.batch_size} "
                f"each, test split ({args.eval_scenes} scenes). Numbers in %.\n\n{table}\n")
    print("\n" + table + f"\n\nwrote {out}")
    return 0


# ---- the parser ------------------------------------------------------------------------------

def _training_options(p, iterations, time_limit=None, name=None, num_classes=10):
    p.add_argument("--setting", default="fpn",
                   help="Table 1 setting: fpn (c, default), c4 (a), c5 (b), bottom_up (d), "
                        "no_lateral (e), p2_only (f); the letters a-f work too")
    p.add_argument("--iterations", type=int, default=iterations, help="training steps")
    p.add_argument("--batch-size", type=int, default=8, help="scenes per step (default 8)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of SGD")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--channels", type=int, default=64, help="d: channels of the pyramid and head")
    p.add_argument("--widths", default="16,32,64,128", help="ResNet stage widths (C2..C5)")
    p.add_argument("--num-classes", type=int, default=num_classes,
                   help="10: detect and name the digits; 1: the paper's RPN (object or not)")
    p.add_argument("--anchors-per-image", type=int, default=DEFAULTS.anchors_per_image,
                   help="anchors sampled per image for the loss")
    p.add_argument("--positive-fraction", type=float, default=DEFAULTS.positive_fraction,
                   help="largest share of positives among the sampled anchors")
    p.add_argument("--positive-iou", type=float, default=DEFAULTS.positive_iou,
                   help="an anchor is an object at IoU >= this with a box (paper: 0.7)")
    p.add_argument("--negative-iou", type=float, default=DEFAULTS.negative_iou,
                   help="an anchor is background below this IoU with every box (paper: 0.3)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, scenes and sampling")
    p.add_argument("--eval-scenes", type=int, default=300, help="test scenes to evaluate on")
    p.add_argument("--time-limit", type=float, default=time_limit,
                   help="stop training after this many seconds (a checkpoint is written first)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--runs", default="runs", help="folder for run outputs")
    p.add_argument("--name", default=name, help="run name: outputs go to RUNS/NAME/")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minifpn",
        description="Feature Pyramid Networks from scratch in NumPy: every backward by hand.")
    jobs = parser.add_subparsers(dest="job", metavar="JOB")
    jobs.required = True

    p = jobs.add_parser(
        "demo", help="train the FPN detector on digit scenes and report AP/AR (about 5 minutes)",
        description="Train the FPN detector (ResNet 16/32/64/128 + FPN d=64 + shared head) on "
                    "freshly drawn scenes of real handwritten digits at many scales, evaluate it "
                    "on the test split, print AP/AR by object size, and write runs/NAME/ with "
                    "metrics.json, checkpoint.npz, a loss curve, test detections and the "
                    "pyramid maps of one scene. Runs in about 5 minutes on 2 CPU cores.")
    _training_options(p, DEMO_ITERATIONS, DEMO_TIME_LIMIT, "demo")
    p.set_defaults(run=cmd_demo)

    p = jobs.add_parser(
        "train", help="train one detector setting (every option has a flag)",
        description="Train a detector of one Table 1 setting and evaluate it on the test split. "
                    "Checkpoints go to RUNS/NAME/checkpoint.npz every --checkpoint-every steps; "
                    "--resume continues that run exactly where it stopped.")
    _training_options(p, 1000)
    p.add_argument("--resume", action="store_true", help="continue RUNS/NAME/checkpoint.npz")
    p.set_defaults(run=cmd_train)

    p = jobs.add_parser(
        "evaluate", help="evaluate a checkpoint: COCO-style AP/AR by object size",
        description="Load a checkpoint written by train or demo, rebuild its detector from the "
                    "configuration saved inside it, and print AP@[.5:.95], AP50, AP75 and AR, "
                    "overall and for small, medium and large digits.")
    p.add_argument("checkpoint", help="path to checkpoint.npz")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--scenes", type=int, default=300, help="number of scenes")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    p.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    p.set_defaults(run=cmd_evaluate)

    p = jobs.add_parser(
        "ablation", help="train the six Table 1 settings at one budget and compare",
        description="Train each Table 1 setting, (a) C4, (b) C5, (c) FPN, (d) bottom-up, (e) "
                    "no lateral, (f) P2 only, with the same number of steps, evaluate each, and "
                    "write a markdown table (AR@100, AR_s, AR_m, AR_l, AP) beside the paper's "
                    "numbers to RUNS/NAME/table1.md. As in the paper's Table 1 the default is an "
                    "RPN (--num-classes 1: every digit is 'an object'), with the paper's anchor "
                    "labelling (IoU >= 0.7 positive, < 0.3 negative).")
    _training_options(p, 600, None, "ablation", num_classes=1)
    p.set_defaults(positive_iou=0.7, negative_iou=0.3, anchors_per_image=256)  # the paper's
    p.add_argument("--settings", default="a,b,c,d,e,f", help="comma-separated settings")
    p.set_defaults(run=cmd_ablation)

    p = jobs.add_parser(
        "gradcheck", help="gradient-check every op and layer and print a table",
        description="Check every hand-written backward pass (conv2d, max_pool2d, "
                    "upsample_nearest, batch_norm, relu, add and the layers built on them) "
                    "against central-difference numerical gradients in float64, and print "
                    "one line per check: op, shape, max relative error, pass/fail. "
                    "Exits with status 1 if any check fails.")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"],
                   help="array backend to run on (default: numpy)")
    p.add_argument("--seed", type=int, default=0, help="seed for inputs and upstream gradients")
    p.set_defaults(run=cmd_gradcheck)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .backend import reuse_freed_memory
    from .train import CheckpointError, TrainingDiverged
    reuse_freed_memory()  # NumPy's many large temporaries: about 2x faster convs (performance.md)
    try:
        return args.run(args)
    except (TrainingDiverged, CheckpointError) as e:
        print(f"minifpn {args.job}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
