"""The ``minifpn`` command. Run ``minifpn --help`` for the list of jobs.

Every option is checked before any work starts: a bad value ends the command with one line in
argparse's style (``minifpn train: error: --lr must be a positive finite number, got -0.05``)
and exit status 2, before a folder is made or a weight is drawn."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
import tempfile
import time

from . import table1
from .models.detector import DetectorConfig
from .models.resnet import FREEZE_AT

DEFAULTS = DetectorConfig()
DEMO_ITERATIONS = 2600  # of DEMO_BATCH_SIZE scenes: about 4 minutes on 2 cores (docs/results.md)
DEMO_BATCH_SIZE = 6  # the AP50 of 8 scenes per step from 11 % fewer images (docs/results.md)
DEMO_MILESTONES = (0.85, 0.95)  # lr x0.1 later than train's default: naming digits is still improving
DEMO_TIME_LIMIT = 600  # a guard, in seconds, not a budget: over 2x what the demo's steps take on 2 cores
REFERENCE_ITERATIONS = 1600  # the shipped reference pair's budget (minifpn/weights/reference.json)
EVAL_SCENES = 300  # test scenes evaluated after training, and by `minifpn evaluate`
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's status for a command stopped by Ctrl-C


# ---- option types: each turns the text of one option into a value, or says what it expected ----

def positive_int(text: str) -> int:
    """A count (iterations, batch size, channels, ...): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """A seed or a number of warm-up steps: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan  # every check below refuses NaN, and so names the text as given


def positive_float(text: str) -> float:
    """A learning rate: a finite number > 0."""
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def seconds(text: str) -> float:
    """A time limit: seconds >= 0, where 0 means no limit."""
    value = _number(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0 (0: no limit), got {text}")
    return value


def fraction(text: str) -> float:
    """A share, such as the positives among sampled anchors: in (0, 1]."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return value


def milestones_list(text: str) -> tuple:
    """Fractions of the run at which the learning rate drops x0.1: increasing, each in (0, 1]."""
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 < v <= 1 for v in values) or list(values) != sorted(set(values)):
        raise argparse.ArgumentTypeError(
            "must be increasing fractions of the run in (0, 1], separated by commas "
            f"(e.g. 0.75,0.9), got {text}")
    return values


def iou(text: str) -> float:
    """The IoU at or above which an anchor is an object: in (0, 1]."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be an IoU in (0, 1], got {text}")
    return value


def negative_iou(text: str) -> float:
    """The IoU below which an anchor is background: in [0, 1), since IoU 0 is never below it."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be an IoU in [0, 1), got {text}")
    return value


def _per_stage(text: str, letter: str) -> tuple:
    """"X2,X3,X4,X5" -> (X2, X3, X4, X5), four positive integers, one per ResNet stage."""
    try:
        values = tuple(int(p) for p in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be 4 positive integers separated by commas "
                                         f"({','.join(f'{letter}{k}' for k in range(2, 6))}), got {text}")
    return values


def widths_list(text: str) -> tuple:
    """ResNet stage widths "W2,W3,W4,W5" -> (W2, W3, W4, W5), four positive integers."""
    return _per_stage(text, "W")


def blocks_list(text: str) -> tuple:
    """BasicBlocks per ResNet stage "B2,B3,B4,B5" -> (B2, B3, B4, B5), four positive integers."""
    return _per_stage(text, "B")


def freeze_at_value(text: str) -> int:
    """How much of the backbone is frozen, as detectron2's FREEZE_AT: an integer 0..5."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 5:
        raise argparse.ArgumentTypeError(
            f"must be an integer from 0 (nothing frozen) to 5 (the whole backbone), got {text}; "
            f"2 freezes the stem and C2's stage, as the paper's codebases do")
    return value


def norm_name(text: str) -> str:
    """The backbone's batch norm: "bn" (batch statistics) or "frozen_bn" (fixed)."""
    if text not in ("bn", "frozen_bn"):
        raise argparse.ArgumentTypeError(
            f"must be bn (batch statistics) or frozen_bn (statistics and affine fixed), got {text}")
    return text


def setting_name(text: str) -> str:
    """A Table 1 setting, by name (fpn) or letter (c) -> its name."""
    try:
        return table1.resolve(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be one of {table1.CHOICES}, got {text}") from None


def settings_list(text: str) -> list:
    """Table 1 settings "a,b,c" -> their names, in the order given."""
    parts = [p.strip() for p in text.split(",")]
    unknown = [p for p in parts if table1.LETTERS.get(p, p) not in table1.SETTINGS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"must be Table 1 settings separated by commas ({table1.CHOICES}), got {text}: "
            f"unknown {', '.join(repr(p) for p in unknown)}")
    return [table1.resolve(p) for p in parts]


def seeds_list(text: str) -> list:
    """Seeds "0,1,2" -> [0, 1, 2]: distinct integers >= 0, in the order given."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts) or len(set(map(int, parts))) != len(parts):
        raise argparse.ArgumentTypeError(f"must be distinct integers >= 0 separated by commas, got {text}")
    return [int(p) for p in parts]


class _Parser(argparse.ArgumentParser):
    """argparse, with every error on one line: ``minifpn train: error: --lr must be ...``."""

    def error(self, message):
        # argparse words a type error "argument --lr: must be ..."; ours read "--lr must be ..."
        message = re.sub(r"^argument (-[-\w]+)(?:/-[-\w]+)*: (?=must )", r"\1 ", message)
        self.exit(2, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in --help; options whose default is None say in their help what it means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _unwritable(folder: str) -> str | None:
    """Why run outputs cannot go to ``folder`` (made if missing), or None if they can. Nothing
    is created: the check looks at the nearest folder that exists and writes a temporary file."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    try:  # os.access can say yes where a write fails (read-only mounts, some ACLs)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        return f"{probe} is not writable ({e.strerror})"
    return None


def _run_dir(args) -> str:
    """Where a training job writes: RUNS/NAME (train: RUNS/SETTING, pretrain: RUNS/pretrain_seedS
    without --name)."""
    default = {"train": getattr(args, "setting", ""), "pretrain": f"pretrain_seed{getattr(args, 'seed', 0)}"}
    name = args.name or default.get(args.job, "")
    return os.path.join(args.runs, name)


def validate(args, error) -> None:
    """The checks that need more than one option or the machine; ``error`` is the job's
    parser.error. Runs after parsing and before any work."""
    _validate_options(args, error)
    _validate_paths(args, error)


def _validate_detector_options(args, error) -> None:
    """train's --detector and the options that only its two_stage detector takes."""
    if args.detector != "two_stage":
        for flag in ("pooling", "rois_per_image"):
            if getattr(args, flag) is not None:
                error(f"--{flag.replace('_', '-')} applies only with --detector two_stage")
        return
    from .models.two_stage import RPN_SETTINGS
    if args.setting not in RPN_SETTINGS:
        error(f"--detector two_stage pools its RoIs from P2..P5: --setting must be one of "
              f"{', '.join(RPN_SETTINGS)}, got {args.setting}")


# option names that are also plain words of a message
_NOT_FLAGS = {"job", "setting", "seed", "seeds", "norm", "lr", "detector", "resume", "argv", "name", "out",
              "runs", "backend", "quiet"}


def _validate_configs(args, error) -> None:
    """Build the job's configurations, which check their own values (DetectorConfig, TrainConfig,
    TwoStageConfig), and report a refusal in the options' words: "negative_iou" as
    "--negative-iou"."""
    if not hasattr(args, "positive_iou"):
        return
    try:
        _detector_config(args)
        _train_config(args)
    except ValueError as e:
        message = re.sub(r"^\w+: ", "", str(e))  # "DetectorConfig: " says which config; a flag says more
        error(re.sub(r"\b[a-z]+(?:_[a-z]+)*\b",  # a word or snake_case name
                     lambda m: f"--{m.group(0).replace('_', '-')}" if m.group(0) in vars(args)
                     and m.group(0) not in _NOT_FLAGS else m.group(0), message))


PARALLEL_JOBS = ("train", "demo", "ablation", "reference")  # the jobs that take --workers
WORKERS_ENV = "MINIFPN_WORKERS"  # the default of --workers where it is set (the tests set 1)


def _default_workers(args) -> int:
    """--workers when not given: MINIFPN_WORKERS, else ``parallel.default_workers`` (said in one
    line), at most the global batch; 1 for the two-stage detector."""
    from . import parallel
    if os.environ.get(WORKERS_ENV, "").isdigit():
        return int(os.environ[WORKERS_ENV])
    if getattr(args, "detector", "one_stage") != "one_stage":
        return 1
    chosen, line = parallel.default_workers()
    chosen = min(chosen, args.batch_size)
    print(line if chosen > 1 or "not installed" in line else "--workers 1: one process", file=sys.stderr)
    return chosen


def _validate_workers(args, error) -> None:
    """--workers: the ranks mpiexec started, given, or ``_default_workers``; at least 1, at most
    the global batch, more than 1 only with mpi4py and the one-stage detector."""
    from . import parallel
    if parallel.mpi_size_from_env() > 1:  # a rank (of --workers, or of a user's own mpiexec)
        args.workers = parallel.mpi_size_from_env()
        return
    if args.workers is None and getattr(args, "jobs", 1) > 1:
        chosen = 1  # reference --jobs N: the two settings in N processes of one rank each
    else:
        chosen = _default_workers(args) if args.workers is None else args.workers
    if chosen > 1 and getattr(args, "jobs", 1) > 1:  # reference: processes or ranks, not both
        error(f"--workers {chosen} and --jobs {args.jobs}: give one of them (--jobs 1 trains the two "
              f"settings one after the other, each over the ranks)")
    if chosen < 1:
        error(f"--workers must be at least 1, got {chosen}")
    if chosen > args.batch_size:
        error(f"--workers {chosen} is more than the global batch (--batch-size {args.batch_size}): "
              f"each worker needs at least one scene")
    if chosen > 1 and not parallel.mpi_available():
        error(f"--workers {chosen} needs mpi4py and mpich: pip install -e \".[parallel]\"")
    if chosen > 1 and getattr(args, "detector", "one_stage") != "one_stage":
        error("--workers above 1 trains the one-stage detector only; use --workers 1 with two_stage")
    args.workers = chosen


def _validate_options(args, error) -> None:
    """Options that must agree with each other, and a backend that must be installed; then the
    configurations' own checks (after the CLI's, which can name the options more precisely)."""
    if args.job in PARALLEL_JOBS:
        _validate_workers(args, error)
    given = {token.split("=", 1)[0] for token in getattr(args, "argv", [])}
    if getattr(args, "seeds", None) and "--seed" in given:
        error("--seed and --seeds: give one of them")
    if getattr(args, "allow_changes", False) and not args.resume:
        error("--allow-changes only applies with --resume")
    if args.job == "train":
        _validate_detector_options(args, error)
    if hasattr(args, "pretrained"):
        _validate_backbone_options(args, error)
    if args.backend != "numpy":
        from .backend import BackendError, get_backend
        try:
            get_backend(args.backend)
        except BackendError as e:
            error(f"--backend {args.backend} cannot be used: {e}")
    _validate_configs(args, error)


def _validate_backbone_options(args, error) -> None:
    """--pretrained needs a shipped backbone of the run's architecture and seed(s); freezing and
    frozen batch norm need --pretrained (without it they would fix random initial weights)."""
    if not args.pretrained:
        if args.freeze_at:
            error(f"--freeze-at {args.freeze_at} freezes {FREEZE_AT[args.freeze_at]} at their random "
                  f"initial weights: add --pretrained to start from the pre-trained backbone, or use "
                  f"--freeze-at 0")
        if args.norm == "frozen_bn":
            error("--norm frozen_bn fixes batch norm at its initial statistics (mean 0, variance 1), "
                  "which a backbone trained from scratch never had: add --pretrained, or use --norm bn")
        return
    from .weights import find_backbone
    fields = {"in_channels": DEFAULTS.in_channels, "widths": getattr(args, "widths", DEFAULTS.widths),
              "blocks": getattr(args, "blocks", DEFAULTS.blocks), "stem_kernel": DEFAULTS.stem_kernel}
    for seed in getattr(args, "seeds", None) or [args.seed]:
        try:
            find_backbone(fields, seed)
        except ValueError as e:
            error("--pretrained" + str(e)[len("pretrained"):])


def _validate_paths(args, error) -> None:
    """The checkpoint to read, the folder to write to, the run to resume."""
    if args.job in ("evaluate", "probe"):
        _validate_checkpoint_path(args, error)
    if hasattr(args, "runs"):
        run_dir = _run_dir(args)
        reason = _unwritable(run_dir)
        if reason:
            error(f"--runs {args.runs}: cannot write run outputs to {run_dir}: {reason}")
        if getattr(args, "resume", False) and not os.path.exists(os.path.join(run_dir, "checkpoint.npz")):
            error(f"--resume: no checkpoint at {os.path.join(run_dir, 'checkpoint.npz')} to resume; "
                  f"check --runs and --name")


def _validate_checkpoint_path(args, error) -> None:
    """evaluate's checkpoint; probe's checkpoint, reference pair or `minifpn reference` folder."""
    if args.job == "probe" and args.out and _unwritable(args.out):
        error(f"--out {args.out}: cannot write the probe's files: {_unwritable(args.out)}")
    if args.job == "probe" and args.checkpoint == REFERENCE:
        from .weights import FOLDER, INFO_FILE
        if not os.path.exists(os.path.join(FOLDER, INFO_FILE)):
            error(f"no reference weights in {FOLDER}; run `minifpn reference` or give a checkpoint.npz")
    elif args.job == "probe" and os.path.isdir(args.checkpoint):
        from .weights import INFO_FILE
        if not os.path.exists(os.path.join(args.checkpoint, INFO_FILE)):
            error(f"{args.checkpoint} is a folder without {INFO_FILE}; expected a checkpoint.npz file or "
                  f"a folder written by `minifpn reference --out FOLDER`")
    elif args.job == "evaluate" and (args.checkpoint is None) == (args.reference is None):
        error("give a checkpoint or --reference NAME (the shipped fpn or bottom_up), one of them")
    elif args.checkpoint is not None:
        if not os.path.exists(args.checkpoint):
            error(f"checkpoint {args.checkpoint} does not exist")
        if os.path.isdir(args.checkpoint):
            error(f"checkpoint {args.checkpoint} is a folder; expected a checkpoint.npz file")


# ---- commands that rebuild a run: resume after Ctrl-C, or run all steps ---------------------

_FLAGS = ("--resume", "--quiet", "--allow-changes", "--json")  # options that take no value


def _command(argv: list, drop=(), add=()) -> str:
    """``minifpn`` + ``argv`` without the options in ``drop`` (and their values), + ``add``."""
    tokens, skip = [], False
    for token in argv:
        flag = token.split("=", 1)[0]
        if skip:
            skip = False
        elif flag in drop:
            skip = "=" not in token and flag not in _FLAGS  # its value is the next token
        else:
            tokens.append(token)
    return shlex.join(["minifpn", *tokens, *add])


def _resume_command(args) -> str:
    """The ``minifpn train --resume ...`` line that continues the run ``args`` started."""
    if args.job == "pretrain":
        return _command(args.argv, drop=("--resume",), add=("--resume",))
    if args.job == "train":
        given = {token.split("=", 1)[0] for token in args.argv}
        name = [] if "--name" in given else ["--name", args.name or args.setting]
        rest = shlex.split(_command(args.argv[1:], drop=("--resume",)))[1:]
        return shlex.join(["minifpn", "train", "--resume", *name, *rest])
    # demo and ablation have no --resume: spell their run as the `train` options that differ
    runs, name = ((os.path.join(args.runs, args.name), args.setting) if args.job == "ablation"
                  else (args.runs, args.name))
    train_defaults = vars(build_parser().parse_args(["train"]))
    options = []
    for dest, value in vars(args).items():
        if dest in ("runs", "name", "resume", "job", "run", "argv") or dest not in train_defaults:
            continue
        if value == train_defaults[dest] or value is False:
            continue
        flag = "--" + dest.replace("_", "-")
        if value is True:
            options.append(flag)
        else:
            options += [flag, ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)]
    return shlex.join(["minifpn", "train", "--resume", "--runs", runs, "--name", name, *options])


def stopped_early_message(args, steps_done: int) -> str:
    """What a run stopped by --time-limit means, and how to train all its steps."""
    total = args.iterations
    if args.job == "train":
        how = _command(args.argv, drop=("--time-limit", "--resume"), add=("--resume", "--time-limit", "0"))
        expect = f"a full run of {total} steps"
    else:
        how = _command(args.argv, drop=("--time-limit",), add=("--time-limit", "0"))
        expect = "docs/results.md reports" if args.job == "demo" else f"a full run of {total} steps"
    return (f"stopped by the time limit at step {steps_done} of {total}; expect a lower AP than "
            f"{expect}; run `{how}` (or a larger limit) to train all {total} steps")


def cmd_gradcheck(args) -> int:
    from .gradcheck import format_table, standard_checks

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
    """The detector's config from the options: a TwoStageConfig for ``--detector two_stage``
    (the same options then shape its backbone, FPN and RPN; --num-classes counts Fast R-CNN's
    classes), else a DetectorConfig."""
    config, second_stage = DetectorConfig, {}
    if getattr(args, "detector", "one_stage") == "two_stage":
        from .models.two_stage import TwoStageConfig as config
        second_stage = {k: getattr(args, k) for k in ("pooling", "rois_per_image")
                        if getattr(args, k, None) is not None}
    return config(setting=args.setting, channels=args.channels,
                  num_classes=args.num_classes, widths=args.widths, blocks=args.blocks, seed=args.seed,
                  pretrained=args.pretrained, freeze_at=args.freeze_at, norm=args.norm,
                  anchors_per_image=args.anchors_per_image,
                  positive_fraction=args.positive_fraction,
                  positive_iou=args.positive_iou, negative_iou=args.negative_iou, **second_stage)


def _train_config(args):
    from .train import TrainConfig
    return TrainConfig(iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
                       warmup=args.warmup, milestones=tuple(args.milestones), seed=args.seed,
                       checkpoint_every=args.checkpoint_every,
                       scenes={"distractors": args.distractors} if args.distractors else {},
                       scale_jitter=getattr(args, "scale_jitter", None) or ())


def _train_and_report(args, run_dir: str) -> dict:
    """Train (or resume), evaluate on the test split, print the AP/AR table and write
    metrics.json and the figures into ``run_dir``."""
    from .train import DETECTORS, train_and_evaluate

    detector_class, _ = DETECTORS[getattr(args, "detector", "one_stage")]
    detector = detector_class(_detector_config(args)).to(args.backend)
    summary, history, detections, truths = train_and_evaluate(
        detector, _train_config(args), run_dir, args.eval_scenes, resume=getattr(args, "resume", False),
        progress=not args.quiet, time_limit=args.time_limit or None,
        allow_changes=getattr(args, "allow_changes", False))
    _print_summary(summary)
    from .parallel import world
    if world().rank == 0:  # one run, one set of outputs
        _write_figures(detector, history, detections, truths, run_dir, _train_config(args))
    print(f"\nwrote {run_dir}/: metrics.json, checkpoint.npz, loss_curve.png, detections.png, pyramid.png")
    return summary


def _print_summary(summary: dict) -> None:
    """A finished run's steps, time and AP/AR table, as ``train_and_evaluate`` summarised it."""
    from .detection.metrics import format_metrics
    two_stage = " (two_stage)" if summary.get("detector") == "two_stage" else ""
    print(f"\n{summary['setting']}{two_stage}: {summary['iterations']} iterations "
          f"({summary['images_seen']} images) "
          f"in {summary['train_seconds']:.0f} s; test split, {summary['test_scenes']} scenes:")
    print(format_metrics(summary["metrics"]))


def _report_early_stop(args, summary: dict) -> None:
    """The last words of a run the time limit cut short: which step, what it costs, what to run."""
    if summary["stopped_by_time_limit"]:
        print("\n" + stopped_early_message(args, summary["iterations"]))


def _write_figures(detector, history, detections, truths, run_dir, train_config):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .backend import to_device
    from .data import DigitScenes
    from .viz import plot_detections, plot_loss_curve, plot_pyramid

    plot_loss_curve(history).savefig(os.path.join(run_dir, "loss_curve.png"), dpi=100)
    # the test scenes train_and_evaluate scored: the run's seed and scene options
    scenes = DigitScenes("test", n=len(detections), seed=train_config.seed,
                         config=train_config.scene_config())
    shown = min(12, len(detections))
    images = [scenes[i][0] for i in range(shown)]
    plot_detections(images, detections[:shown], truths[:shown]).savefig(
        os.path.join(run_dir, "detections.png"), dpi=100)
    if hasattr(detector, "fpn"):
        i = _scene_of_several_sizes(truths)
        with detector.evaluating():
            maps = detector.fpn.traced(detector.backbone(to_device(scenes[i][0][None], detector.backend)))
        plot_pyramid(maps, title=f"pyramid maps of test scene {i}", image=scenes[i][0],
                     boxes=truths[i]["boxes"]).savefig(os.path.join(run_dir, "pyramid.png"), dpi=90)
    plt.close("all")


def _scene_of_several_sizes(truths) -> int:
    """The first scored scene with the most object sizes (small, medium, large) among its digits."""
    from .data import size_bucket
    kinds = [len(set(size_bucket(t["boxes"]).tolist())) if len(t["boxes"]) else 0 for t in truths]
    return kinds.index(max(kinds))


def cmd_demo(args) -> int:
    guard = f"a guard stops it after {args.time_limit:g} s" if args.time_limit else "no time limit"
    print(f"Training the FPN detector on multi-scale digit scenes for {args.iterations} steps "
          f"of {args.batch_size} scenes ({guard}), then evaluating on the test split.\n")
    summary = _train_and_report(args, _run_dir(args))
    print(f"\nAP50 {summary['metrics']['AP50']:.3f} in {summary['total_seconds']:.0f} s in all.")
    _report_early_stop(args, summary)
    return 0


def cmd_train(args) -> int:
    _report_early_stop(args, _train_and_report(args, _run_dir(args)))
    return 0


def cmd_evaluate(args) -> int:
    from .data import SceneConfig
    from .detection.metrics import evaluate, format_metrics, without_labels
    from .train import CheckpointError, detector_kind, evaluate_detector

    detector, ckpt = _evaluated_detector(args)
    if args.detector is not None and detector_kind(detector) != args.detector:
        raise CheckpointError(f"checkpoint {args.checkpoint} holds a {detector_kind(detector)} "
                              f"detector, not the {args.detector} one --detector asks for")
    try:
        evaluated = _evaluated_pyramid(args, detector)
    except ValueError as e:  # not setting (a): one line, exit 1
        print(f"minifpn evaluate: --image-pyramid {re.sub(r'^image pyramid: ', '', str(e))}", file=sys.stderr)
        return 1
    # the split of the run's own seed, drawn as its training scenes were (distractors included)
    trained = ckpt["meta"].get("train_config", {})
    evaluated = _TimedPredict(evaluated)  # inference time alone: not drawing or scoring the scenes
    metrics, detections, truths = evaluate_detector(
        evaluated, args.split, args.scenes, seed=trained.get("seed", 0),
        scene_config=SceneConfig(**trained.get("scenes", {})))
    scored = ""
    if args.class_agnostic:  # found, whatever digit it was called
        metrics, scored = evaluate(without_labels(detections), without_labels(truths), 1), \
            ", class-agnostic"
    two_stage = " (two_stage)" if detector_kind(detector) == "two_stage" else ""
    source = args.checkpoint or f"reference {args.reference}"
    scored += "" if args.image_pyramid is None else f", image pyramid at scales {_scales_text(args)}"
    print(f"{source}: setting {detector.config.setting}{two_stage}, trained "
          f"{ckpt['meta']['iteration']} iterations; {args.split} split, {args.scenes} scenes{scored}:")
    print(format_metrics(metrics))
    print(f"time per image: {1000 * evaluated.seconds / args.scenes:.1f} ms ({_scales_text(args)})")
    if args.json:
        print(json.dumps(metrics))
    return 0


def _evaluated_pyramid(args, detector):
    """What evaluate scores: with --image-pyramid, the detector as a featurized image pyramid over
    those scales (``ImagePyramid``; ValueError for a detector of another setting than (a) c4);
    without it, the detector itself."""
    if args.image_pyramid is None:
        return detector
    from .detection.image_pyramid import ImagePyramid
    return ImagePyramid(detector, args.image_pyramid)


class _TimedPredict:
    """``detector`` (or an ``ImagePyramid``) whose ``predict`` calls add their wall time to
    ``seconds``; ``config`` and ``backend`` are its own, so ``evaluate_detector`` reads it alike."""

    def __init__(self, detector):
        self.detector, self.seconds = detector, 0.0
        self.config, self.backend = detector.config, detector.backend

    def predict(self, images, *args, **kwargs) -> list:
        start = time.perf_counter()
        found = self.detector.predict(images, *args, **kwargs)  # host arrays: the device is done
        self.seconds += time.perf_counter() - start
        return found


def _scales_text(args) -> str:
    """--image-pyramid's scales as printed: "0.5, 1, 2"; without it, "single scale"."""
    if args.image_pyramid is None:
        return "single scale"
    return ", ".join(f"{s:g}" for s in args.image_pyramid)


REFERENCE = "reference"  # `minifpn probe reference`: the shipped pair, minifpn.weights


def _evaluated_detector(args):
    """evaluate's detector and a checkpoint-like record ({"meta": iteration, train_config}): from
    the checkpoint given, or the shipped reference detector ``--reference NAME``."""
    if args.checkpoint is not None:
        return _detector_from_checkpoint(args.checkpoint, args.backend)
    from .weights import load_reference, reference_info
    info = reference_info()
    meta = {"iteration": info["iterations"], "train_config": info["train_config"]}
    return load_reference(args.reference, args.backend), {"meta": meta}


def _detector_from_checkpoint(path, backend):
    """``detector_from_checkpoint``, refusing a pre-training checkpoint: it holds no detector."""
    from .train import CheckpointError, detector_from_checkpoint, detector_kind

    detector, ckpt = detector_from_checkpoint(path, backend)
    if detector_kind(detector) == "classifier":
        raise CheckpointError(f"checkpoint {path} holds a digit classifier (minifpn pretrain), not a "
                              f"detector; its val accuracy is recorded in minifpn/weights/backbones.json")
    return detector, ckpt


def cmd_probe(args) -> int:
    from .analysis import L2, STEPS, format_probe_table, probe_levels

    if args.checkpoint == REFERENCE or os.path.isdir(args.checkpoint):  # a pair made by `minifpn reference`
        from .weights import FOLDER, NAMES, load_reference, reference_info
        folder = FOLDER if args.checkpoint == REFERENCE else args.checkpoint
        detectors = [load_reference(name, args.backend, folder) for name in NAMES]
        seed = reference_info(folder)["seed"]
    else:
        detector, ckpt = _detector_from_checkpoint(args.checkpoint, args.backend)
        # the run's own split; None (a checkpoint without it): the detector's seed, the same in `train`
        detectors, seed = [detector], ckpt["meta"].get("train_config", {}).get("seed")
    start = time.perf_counter()
    results = [probe_levels(d, scenes=args.scenes, seeds=args.seeds, scene_seed=seed) for d in detectors]
    print(f"Linear probe of digit identity on each level ({args.checkpoint}): features pooled in each "
          f"digit's box,\nsoftmax regression ({STEPS} gradient-descent steps, L2 {L2:g}) fitted on the "
          f"{results[0].fit_digits} digits of {args.scenes} val scenes,\nscored on the digits of "
          f"{args.scenes} test scenes (scene seed {results[0].scene_seed}; count in each heading); "
          f"accuracy in %, mean ± std over {args.seeds} bootstrap resamples:\n")
    print(format_probe_table(results))
    seconds = time.perf_counter() - start
    print(f"\nin {seconds:.0f} s")
    if args.out:
        _write_probe(args, results, seconds)
    return 0


def _write_probe(args, results, seconds) -> None:
    """OUT/probe.json (every accuracy, the command, the run time) and OUT/probe.png (by size)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .analysis import plot_probe

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe.json"), "w") as f:
        json.dump({"command": _command(args.argv), "seconds": round(seconds, 1),
                   "results": [r.to_dict() for r in results]}, f, indent=1)
    plot_probe(results).savefig(os.path.join(args.out, "probe.png"), dpi=90)
    plt.close("all")
    print(f"wrote {args.out}/: probe.json, probe.png")


def cmd_ablation(args) -> int:
    from .train import TrainingInterrupted

    def report(summary):
        _print_summary(summary)
        _report_early_stop(args, summary)

    out_dir, options = os.path.join(args.runs, args.name), {
        "backend": args.backend, "progress": not args.quiet, "time_limit": args.time_limit or None,
        "report": report}
    try:
        if args.seeds:  # RUNS/NAME/seed<S>/SETTING, then RUNS/NAME/table1_seeds.{json,md}
            table1.run_over_seeds(args.settings, _detector_config(args), _train_config(args), out_dir,
                                  args.eval_scenes, args.seeds, **options)
        else:
            table1.run_ablation(args.settings, _detector_config(args), _train_config(args), out_dir,
                                args.eval_scenes, **options)
    except TrainingInterrupted as e:  # the resume command names the setting cut short: RUNS/NAME/SETTING
        args.setting = os.path.basename(os.path.dirname(e.path))
        if args.seeds:  # ... or RUNS/NAME/seed<S>/SETTING
            seed_dir = os.path.basename(os.path.dirname(os.path.dirname(e.path)))
            args.name, args.seed = os.path.join(args.name, seed_dir), int(seed_dir[len("seed"):])
        raise
    return 0


def cmd_reference(args) -> int:
    from .train import TrainingInterrupted
    from .weights import make_reference

    reason = _unwritable(args.out)
    if reason:
        print(f"minifpn reference: error: --out {args.out}: {reason}", file=sys.stderr)
        return 2
    print(f"Training the reference pair, fpn (c) and bottom_up (d), {args.iterations} steps of "
          f"{args.batch_size} scenes each from seed {args.seed}; weights and metrics go to {args.out}/\n")
    try:
        make_reference(args.seed, args.iterations, args.batch_size, os.path.join(args.runs, args.name),
                       args.eval_scenes, args.out, command=_command(args.argv), progress=not args.quiet,
                       jobs=args.jobs, backbone={"pretrained": args.pretrained,
                                                 "freeze_at": args.freeze_at, "norm": args.norm})
    except TrainingInterrupted as e:  # no resume for this job: the files are written only at the end
        print(f"minifpn reference: interrupted at step {e.iteration}; {args.out} was not changed",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"\nwrote {args.out}/: fpn.npz, bottom_up.npz, reference.json")
    return 0


def cmd_pretrain(args) -> int:
    from .models.classifier import ClassifierConfig
    from .pretrain import pretrain, pretrain_config
    from .weights import save_backbone

    reason = _unwritable(args.out)
    if reason:
        print(f"minifpn pretrain: error: --out {args.out}: {reason}", file=sys.stderr)
        return 2
    config = ClassifierConfig(widths=args.widths, blocks=args.blocks, seed=args.seed)
    train_config = pretrain_config(args.iterations, args.batch_size, args.lr, args.seed, args.warmup)
    print(f"Pre-training the backbone as a digit classifier: {args.iterations} steps of "
          f"{args.batch_size} images of the train digits of seed {args.seed}, then its accuracy on "
          f"{args.val_digits} val digits.\n")
    classifier, record = pretrain(config, train_config, _run_dir(args), args.val_digits,
                                  progress=not args.quiet, resume=args.resume, backend=args.backend)
    record["command"] = _command(args.argv)
    path = save_backbone(classifier.to("numpy"), args.out, record)
    a = record["val_accuracy"]
    print(f"\nval accuracy {100 * a['all']:.1f} % ({a['count']['all']} digits): small "
          + ", ".join(f"{b} {100 * a[b]:.1f} %" if a[b] is not None else f"{b} n/a"
                      for b in ("small", "medium", "large")).removeprefix("small ")
          + f"; trained in {record['train_seconds']:.0f} s")
    print(f"wrote {path} and {os.path.join(args.out, 'backbones.json')}")
    return 0


# ---- the parser ------------------------------------------------------------------------------

def _architecture_options(p) -> None:
    """--widths and --blocks: the bottom-up ResNet's shape."""
    p.add_argument("--widths", type=widths_list, default=",".join(map(str, DEFAULTS.widths)),
                   metavar="W2,W3,W4,W5", help="ResNet stage widths of C2..C5, comma-separated")
    p.add_argument("--blocks", type=blocks_list, default=",".join(map(str, DEFAULTS.blocks)),
                   metavar="B2,B3,B4,B5", help="BasicBlocks per ResNet stage, comma-separated")


def _backbone_options(p) -> None:
    """--pretrained, --freeze-at and --norm: the backbone trained from scratch (the defaults), or
    fine-tuned from the pre-trained one as the paper does (--pretrained --freeze-at 2 --norm frozen_bn)."""
    p.add_argument("--pretrained", action="store_true",
                   help="start the backbone from the shipped digit classifier pre-trained on this seed's "
                        "train digits (minifpn pretrain; minifpn/weights/backbones.json)")
    p.add_argument("--freeze-at", type=freeze_at_value, default=DEFAULTS.freeze_at, metavar="N",
                   help="freeze the bottom of the backbone, as detectron2: 0 nothing, 1 the stem, 2 the stem "
                        "and C2's stage (the paper's), ..., 5 the whole backbone; needs --pretrained")
    p.add_argument("--norm", type=norm_name, default=DEFAULTS.norm, metavar="{bn,frozen_bn}",
                   help="the backbone's batch norm: bn (batch statistics) or frozen_bn (the pre-trained "
                        "statistics and affine, fixed: the paper's); frozen_bn needs --pretrained")


def _backend_option(p) -> None:
    from .backend import BACKENDS
    p.add_argument("--backend", default="numpy", choices=list(BACKENDS), help="array backend")


def _training_options(p, iterations, time_limit=0, name=None, milestones=None, batch_size=None):
    from . import train as train_module
    train = train_module.TrainConfig()
    milestones = train.milestones if milestones is None else milestones
    batch_size = train.batch_size if batch_size is None else batch_size
    base_lr, base_batch = train_module.BASE_LR, train_module.BASE_BATCH
    p.add_argument("--setting", type=setting_name, default=DEFAULTS.setting,
                   help="Table 1 setting, by name or letter: "
                        + ", ".join(f"{s.name} ({s.letter})" for s in table1.SETTINGS.values()))
    p.add_argument("--iterations", type=positive_int, default=iterations, help="training steps")
    p.add_argument("--batch-size", type=positive_int, default=batch_size, help="scenes per step")
    p.add_argument("--lr", type=positive_float, default=train.lr,
                   help="peak learning rate of SGD" + ("" if train.lr is not None else
                        f" (default: the linear scaling rule, {base_lr:g} x batch size / {base_batch})"))
    p.add_argument("--warmup", type=nonnegative_int, default=train.warmup, help="linear warm-up steps")
    p.add_argument("--milestones", type=milestones_list, default=",".join(map(str, milestones)),
                   metavar="F1,F2", help="fractions of the run at which the learning rate drops x0.1")
    p.add_argument("--channels", type=positive_int, default=DEFAULTS.channels,
                   help="d: channels of the pyramid and head")
    _architecture_options(p)
    _backbone_options(p)
    p.add_argument("--num-classes", type=positive_int, default=DEFAULTS.num_classes,
                   help="10: detect and name the digits; 1: the paper's RPN (object or not)")
    p.add_argument("--anchors-per-image", type=positive_int, default=DEFAULTS.anchors_per_image,
                   help="anchors sampled per image for the loss")
    p.add_argument("--positive-fraction", type=fraction, default=DEFAULTS.positive_fraction,
                   help="largest share of positives among the sampled anchors, in (0, 1]")
    p.add_argument("--positive-iou", type=iou, default=DEFAULTS.positive_iou,
                   help="an anchor is an object at IoU >= this with a box, in (0, 1] (paper: 0.7)")
    p.add_argument("--negative-iou", type=negative_iou, default=DEFAULTS.negative_iou,
                   help="an anchor is background below this IoU with every box, in [0, 1) and below "
                        "--positive-iou (paper: 0.3)")
    p.add_argument("--seed", type=nonnegative_int, default=train.seed,
                   help="seed for weights, scenes and sampling")
    p.add_argument("--eval-scenes", type=positive_int, default=EVAL_SCENES, help="test scenes to evaluate on")
    p.add_argument("--time-limit", type=seconds, default=time_limit, metavar="SECONDS",
                   help="stop training after this many seconds, with a checkpoint and a line that says "
                        "so; 0: no limit")
    p.add_argument("--checkpoint-every", type=positive_int, default=train.checkpoint_every,
                   help="steps between checkpoints")
    p.add_argument("--distractors", type=nonnegative_int, default=0,
                   help="clutter patches per scene, train and test (fragments of digits, scrambled digits, "
                        "strokes; no box, no label: docs/data.md); 0: none")
    p.add_argument("--runs", default="runs", help="folder for run outputs")
    p.add_argument("--name", default=name, help="run name: outputs go to RUNS/NAME/"
                   + ("" if name is not None else " (default: the setting's name)"))
    _backend_option(p)
    _workers_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _workers_option(p) -> None:
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="data-parallel training over N MPI ranks (synchronized SGD and batch norm; "
                        "the same run as one process; pip install -e \".[parallel]\") (default: the "
                        "physical cores where mpi4py is installed, else 1)")


def _demo_job(job) -> None:
    p = job("demo", help="train the FPN detector on digit scenes and report AP/AR (about 4 minutes)",
            description="Train the FPN detector (ResNet 16/32/64/128 + FPN d=64 + shared head) for "
                        f"{DEMO_ITERATIONS} steps of {DEMO_BATCH_SIZE} freshly drawn scenes of real "
                        "handwritten digits at "
                        "many scales, evaluate it on the test split, print AP/AR by object size, and "
                        "write runs/NAME/ with metrics.json, checkpoint.npz, a loss curve, test "
                        "detections and the pyramid maps of one scene. Runs in about 4 minutes on 2 CPU "
                        "cores. --time-limit is only a guard: if it stops the run early, the summary "
                        "says so; --time-limit 0 trains every step however long it takes.")
    _training_options(p, DEMO_ITERATIONS, DEMO_TIME_LIMIT, "demo", DEMO_MILESTONES, DEMO_BATCH_SIZE)
    p.set_defaults(run=cmd_demo)


def _train_job(job) -> None:
    p = job("train", help="train one detector setting (every option has a flag)",
            description="Train a detector of one Table 1 setting and evaluate it on the test split. "
                        "Checkpoints go to RUNS/NAME/checkpoint.npz every --checkpoint-every steps; "
                        "--resume continues that run exactly where it stopped.")
    from .train import DETECTORS, TrainConfig
    _training_options(p, TrainConfig().iterations)
    p.add_argument("--detector", default="one_stage", choices=list(DETECTORS),
                   help="one_stage: the shared head on the pyramid (Table 1); two_stage: that head as "
                        "the paper's RPN (K = 1) and Fast R-CNN on its proposals, RoIs pooled from "
                        "P2..P5 by Eq. (1) (Sec. 4.2)")
    from .models.two_stage import POOLINGS, TwoStageConfig
    p.add_argument("--pooling", default=None, choices=list(POOLINGS),
                   help=f"with --detector two_stage: pyramid pools each RoI from the level Eq. (1) "
                        f"gives it, p2 pools every RoI from P2, c4 from the backbone's C4, the "
                        f"paper's single-scale baseline (default: "
                        f"{TwoStageConfig.pooling})")
    p.add_argument("--rois-per-image", type=positive_int, default=None,
                   help=f"with --detector two_stage: RoIs sampled per image for Fast R-CNN's loss "
                        f"(default: {TwoStageConfig.rois_per_image})")
    p.add_argument("--scale-jitter", type=scales_list, default=None, metavar="SCALES",
                   help="train at image scales drawn per step from these (e.g. 0.5,1,2): each batch "
                        "resized by one of them, its boxes with it; the image pyramid's training-time "
                        "twin (default: the scenes as they are)")
    p.add_argument("--resume", action="store_true", help="continue RUNS/NAME/checkpoint.npz")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: accept a different --lr, --batch-size, --iterations, --warmup "
                        "(schedule); the change is recorded in the checkpoint's history")
    p.set_defaults(run=cmd_train)


def scales_list(text: str) -> tuple:
    """--image-pyramid and --scale-jitter: image scales, finite numbers > 0 separated by commas."""
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"must be image scales > 0 separated by commas (e.g. 0.5,1,2), got {text!r}")
    return values


def _evaluate_job(job) -> None:
    p = job("evaluate", help="evaluate a checkpoint: COCO-style AP/AR by object size",
            description="Load a checkpoint written by train or demo, rebuild its detector from the "
                        "configuration saved inside it, and print AP@[.5:.95], AP50, AP75 and AR, "
                        "overall and for small, medium and large digits.")
    p.add_argument("checkpoint", nargs="?", default=None, help="path to checkpoint.npz")
    from .weights import NAMES
    p.add_argument("--reference", choices=NAMES, default=None,
                   help="evaluate a shipped reference detector (minifpn/weights) instead of a checkpoint "
                        "(default: none, a checkpoint is given)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="scene split")
    p.add_argument("--scenes", type=positive_int, default=EVAL_SCENES, help="number of scenes")
    from .train import DETECTORS
    p.add_argument("--detector", default=None, choices=list(DETECTORS),
                   help="refuse a checkpoint that holds another detector (default: the detector the "
                        "checkpoint holds)")
    _backend_option(p)
    p.add_argument("--class-agnostic", action="store_true",
                   help="score the boxes with every digit's label ignored: how well the detector "
                        "finds digits, apart from naming them")
    p.add_argument("--image-pyramid", type=scales_list, default=None, metavar="SCALES",
                   help="evaluate a featurized image pyramid (the paper's Figure 1(a)): run the detector "
                        "on each scene resized by each scale (e.g. 0.5,1,2), map the boxes back and merge "
                        "them by NMS; only for a checkpoint of setting (a) c4 (default: one scale, the "
                        "scene as it is)")
    p.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    p.set_defaults(run=cmd_evaluate)


def _ablation_job(job) -> None:
    p = job("ablation", help="train the six Table 1 settings at one budget and compare",
            description="Train each Table 1 setting, "
                        + ", ".join(f"({s.letter}) {s.name}" for s in table1.SETTINGS.values())
                        + ", with the same number of steps, evaluate each, and write a markdown table "
                        "(AR@100, AR_s, AR_m, AR_l, AP) beside the paper's numbers to RUNS/NAME/table1.md "
                        "(minifpn.table1 runs it). As in the paper's Table 1 the default is an RPN "
                        "(--num-classes 1: every digit is 'an object'), with the paper's anchor "
                        "labelling (IoU >= 0.7 positive, < 0.3 negative, 256 anchors per image).")
    _training_options(p, table1.ITERATIONS, name="ablation")
    p.set_defaults(**table1.PAPER_RPN)  # the paper's RPN, in place of DetectorConfig's detector
    p.add_argument("--settings", type=settings_list, default=",".join(table1.LETTERS), metavar="a,b,c",
                   help="Table 1 settings to train, comma-separated: letters a-f or names")
    p.add_argument("--seeds", type=seeds_list, default=None, metavar="0,1,2",
                   help="run every setting once per seed (in place of --seed) into RUNS/NAME/seed<S>/ and "
                        "write RUNS/NAME/table1_seeds.{json,md}: mean ± std over the seeds, and which "
                        "differences exceed the spread (default: none, one run with --seed)")
    p.set_defaults(run=cmd_ablation)


def _reference_job(job) -> None:
    p = job("reference", help="train the shipped reference pair: FPN (c) and bottom-up pyramid (d)",
            description="Train setting (c) fpn and setting (d) bottom_up from one seed with the shipped "
                        f"pair's recipe and budget ({REFERENCE_ITERATIONS} steps, train's schedule), "
                        "evaluate each on the test split, and write their weights "
                        "(fpn.npz, bottom_up.npz) and reference.json (configs, seed, metrics, command, "
                        "run time, date) to --out, by default the package's minifpn/weights/ folder, "
                        "which the notebooks load with minifpn.weights.load_reference.")
    from .train import TrainConfig
    from .weights import FOLDER as WEIGHTS_FOLDER
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed for weights, scenes and sampling")
    p.add_argument("--iterations", type=positive_int, default=REFERENCE_ITERATIONS,
                   help="training steps, each")
    p.add_argument("--batch-size", type=positive_int, default=TrainConfig().batch_size,
                   help="scenes per step")
    p.add_argument("--eval-scenes", type=positive_int, default=EVAL_SCENES, help="test scenes to evaluate on")
    p.add_argument("--out", default=WEIGHTS_FOLDER, help="folder for the weights and reference.json")
    p.add_argument("--runs", default="runs", help="folder for the training checkpoints (RUNS/NAME/SETTING)")
    p.add_argument("--name", default="reference", help="run name")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="train the two settings in this many processes at once (same results)")
    _backbone_options(p)
    _workers_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_reference, backend="numpy")


def _pretrain_job(job) -> None:
    from .pretrain import PRETRAIN_BATCH_SIZE, PRETRAIN_ITERATIONS, PRETRAIN_LR, VAL_DIGITS
    from .weights import FOLDER as WEIGHTS_FOLDER
    p = job("pretrain", help="pre-train the backbone as a digit classifier (our ImageNet; a few minutes)",
            description="Train the detectors' ResNet, with global average pooling of C5 and a linear "
                        "layer, to name one digit per image (the scenes' sizes, places and texture), on "
                        "the train split's source digits of --seed only; measure its accuracy on the val "
                        "split's digits; write the backbone (and its classifier) to OUT/backbone_seedS.npz "
                        "and its recipe, command, run time and accuracy to OUT/backbones.json, where "
                        "`--pretrained` finds it. Checkpoints go to RUNS/NAME/checkpoint.npz.")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="the split pre-trained on (its train digits), the weights and the image order")
    p.add_argument("--iterations", type=positive_int, default=PRETRAIN_ITERATIONS, help="training steps")
    p.add_argument("--batch-size", type=positive_int, default=PRETRAIN_BATCH_SIZE, help="images per step")
    p.add_argument("--lr", type=positive_float, default=PRETRAIN_LR, help="peak learning rate of SGD")
    p.add_argument("--warmup", type=nonnegative_int, default=50, help="linear warm-up steps")
    _architecture_options(p)
    p.add_argument("--val-digits", type=positive_int, default=VAL_DIGITS,
                   help="val images (one digit each) to measure the accuracy on")
    p.add_argument("--out", default=WEIGHTS_FOLDER, help="folder for the backbone and backbones.json")
    p.add_argument("--runs", default="runs", help="folder for the training checkpoints")
    p.add_argument("--name", default=None, help="run name: checkpoints go to RUNS/NAME/ (default: "
                   "pretrain_seedS)")
    p.add_argument("--resume", action="store_true", help="continue RUNS/NAME/checkpoint.npz")
    _backend_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_pretrain)


def _gradcheck_job(job) -> None:
    p = job("gradcheck", help="gradient-check every op and layer and print a table",
            description="Check every hand-written backward pass (conv2d, max_pool2d, "
                        "upsample_nearest, batch_norm, relu, add, global_avg_pool2d, frozen_batch_norm, "
                        "resize_bilinear, and the layers built on them) "
                        "against central-difference numerical gradients in float64, and print "
                        "one line per check: op, shape, max relative error, pass/fail. "
                        "Exits with status 1 if any check fails.")
    _backend_option(p)
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed for inputs and upstream gradients")
    p.set_defaults(run=cmd_gradcheck)


def _probe_job(job) -> None:
    p = job("probe", help="how well each pyramid level names the digit: a linear probe per level",
            description="Pool each level's features (C2..C5, and P2..P5 where there is a pyramid) inside "
                        "every labelled digit's box, fit a linear classifier of the digit (0-9) on the "
                        "val split's digits and score it on the test split's, and print the accuracy "
                        "per level, overall and by object size, as mean ± std over bootstrap resamples "
                        "(minifpn.analysis.probe_levels). CHECKPOINT_OR_NAME: a checkpoint.npz, "
                        f"'{REFERENCE}' for the shipped pair fpn (c) and bottom_up (d), or a folder "
                        "written by `minifpn reference --out FOLDER` for the pair in it.")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_NAME",
                   help=f"path to checkpoint.npz, '{REFERENCE}', or a `minifpn reference --out` folder")
    p.add_argument("--scenes", type=positive_int, default=150,
                   help="val scenes to fit on, and as many test scenes to score on")
    p.add_argument("--seeds", type=positive_int, default=3, help="probe seeds: bootstrap resamples")
    _backend_option(p)
    p.add_argument("--out", default=None, metavar="FOLDER",
                   help="also write FOLDER/probe.json and FOLDER/probe.png (default: print only)")
    p.set_defaults(run=cmd_probe)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="minifpn", allow_abbrev=False,  # whole option names, so a run's command can be rebuilt
        description="Feature Pyramid Networks from scratch in NumPy: every backward by hand.")
    jobs = parser.add_subparsers(dest="job", metavar="JOB")
    jobs.required = True
    parser.jobs = {}

    def job(name, **kwargs):
        p = jobs.add_parser(name, allow_abbrev=False,
                            formatter_class=_HelpFormatter, **kwargs)
        parser.jobs[name] = p
        return p

    for add_job in (_demo_job, _train_job, _evaluate_job, _ablation_job, _reference_job,
                    _pretrain_job, _gradcheck_job, _probe_job):  # in the order of `minifpn --help`
        add_job(job)
    return parser


def main(argv=None) -> int:
    """The command line. Among several MPI ranks each rank runs it (``parallel.run_rank``: a
    rank that fails stops them all); with --workers N > 1 outside them, it starts N ranks."""
    from . import parallel
    if parallel.mpi_size_from_env() > 1:
        return parallel.run_rank(_main, argv)
    return _main(argv)


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    validate(args, parser.jobs[args.job].error)  # every check before any work
    from . import parallel
    if getattr(args, "workers", 1) > 1 and parallel.mpi_size_from_env() == 1:
        return parallel.launch(args.workers, argv)  # N ranks, each running this command
    if parallel.world().rank > 0:  # rank 0 prints the run's words; the others keep quiet
        sys.stdout = open(os.devnull, "w")
    if getattr(args, "backend", "numpy") == "cupy" and parallel.world().size > 1:
        parallel.use_device_of_rank(parallel.world())  # one GPU per rank, before the model is made
    from .backend import reuse_freed_memory
    from .train import CheckpointError, TrainingDiverged
    from .train import TrainingInterrupted as interrupted  # raised after the last step is checkpointed
    reuse_freed_memory()  # NumPy's many large temporaries: about 2x faster convs (performance.md)
    try:
        return args.run(args)
    except interrupted as e:
        print(f"minifpn {args.job}: interrupted at step {e.iteration} of {args.iterations}; checkpoint "
              f"saved; resume with: {_resume_command(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (TrainingDiverged, CheckpointError) as e:
        print(f"minifpn {args.job}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"minifpn {args.job}: interrupted (Ctrl-C) before it finished", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
