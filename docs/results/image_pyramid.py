"""The featurized image pyramid (the paper's Figure 1(a)) against FPN: accuracy, inference time and
peak memory per image, over seeds 0, 1, 2 (the protocol is in docs/results.md, "Featurized image
pyramid against FPN (Figure 1(a))").

Four designs, three trained ones (the pyramid trained at one scale is the single-scale run):

* "c4": Table 1's setting (a), the head on C4, tested on the scenes as they are;
* "c4_pyramid": the same checkpoints, tested at scales 0.5, 1, 2 (``ImagePyramid``);
* "c4_jitter_pyramid": setting (a) trained with scale jitter over 0.5, 1, 2, tested at those scales;
* "fpn": Table 1's setting (c), tested at one scale.

Every run trains with the quick Table 1 recipe (docs/results/learning_curve.py's "live": 250 steps of
8 scenes, widths 8..64, d = 32, Table 1's RPN labels). Run from the repository root:

    OPENBLAS_NUM_THREADS=1 python docs/results/image_pyramid.py
    OPENBLAS_NUM_THREADS=1 python docs/results/image_pyramid.py --recipe full   # the follow-up

It writes docs/results/image_pyramid.json (image_pyramid_full.json for the follow-up, decided after
the first had run) and prints the table of docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
from dataclasses import asdict, replace

from threadpoolctl import threadpool_limits

from minifpn.backend import reuse_freed_memory
from minifpn.cli import _detector_config as detector_config_of
from minifpn.cli import _train_config as train_config_of
from minifpn.cli import build_parser
from minifpn.data import DigitScenes
from minifpn.detection.image_pyramid import ImagePyramid
from minifpn.models.detector import Detector, DetectorConfig
from minifpn.train import TrainConfig, detector_from_checkpoint, evaluate_detector, train

SCALES = (0.5, 1.0, 2.0)  # fixed before any result (the example)
SEEDS = [0, 1, 2]
EVAL_SCENES = 300  # each seed's test split, as learning_curve.py scores
TIMED_SCENES = 30  # per seed, the designs interleaved scene by scene
MEMORY_SCENES = 3  # per seed; the largest peak
# design -> (the trained run it uses, tested as an image pyramid?)
DESIGNS = {"c4": ("c4", False), "c4_pyramid": ("c4", True), "c4_jitter_pyramid": ("c4_jitter", True),
           "fpn": ("fpn", False)}
TRAINED = {"c4": ("c4", ()), "c4_jitter": ("c4", SCALES), "fpn": ("fpn", ())}  # run -> setting, jitter
COLUMNS = ("AP", "AP50", "AP_small", "AP_medium", "AP_large", "AR@100", "AR_small", "AR_medium", "AR_large")


def live_recipe(setting: str, seed: int, jitter: tuple):
    """The "live" recipe of learning_curve.py, one checkpoint at the end, with ``jitter``'s scales."""
    detector = DetectorConfig(setting=setting, num_classes=1, positive_iou=0.7, negative_iou=0.3,
                              anchors_per_image=256, widths=(8, 16, 32, 64), channels=32, seed=seed)
    return detector, TrainConfig(iterations=250, batch_size=8, lr=0.05, warmup=20, checkpoint_every=250,
                                 seed=seed, scale_jitter=jitter)


def full_recipe(setting: str, seed: int, jitter: tuple):
    """Follow-up: `minifpn ablation --setting S --seed N`'s recipe (600 steps of 8, widths 16..128,
    d = 64), parsed by the CLI itself, one checkpoint at the end, with ``jitter``'s scales."""
    args = build_parser().parse_args(["ablation", "--setting", setting, "--seed", str(seed)])
    train_config = replace(train_config_of(args), scale_jitter=jitter)
    return detector_config_of(args), replace(train_config, checkpoint_every=train_config.iterations)


RECIPES = {"live": live_recipe, "full": full_recipe}
recipe = live_recipe  # the protocol's; main() sets the one asked for


def train_run(run: str, seed: int, root: str) -> dict:
    """Train one run (or reuse its finished checkpoint); {"checkpoint", "train_seconds", configs}."""
    setting, jitter = TRAINED[run]
    detector_config, train_config = recipe(setting, seed, jitter)
    run_dir = os.path.join(root, f"{run}_seed{seed}")
    path = os.path.join(run_dir, "checkpoint.npz")
    record_path = os.path.join(run_dir, "record.json")
    if os.path.exists(record_path):  # a finished run of an earlier call: the same checkpoint
        with open(record_path) as f:
            return json.load(f)
    tick = time.perf_counter()
    train(Detector(detector_config), train_config, run_dir, progress=False)
    record = {"checkpoint": path, "train_seconds": round(time.perf_counter() - tick, 1),
              "detector_config": detector_config.to_dict(), "train_config": asdict(train_config)}
    with open(record_path, "w") as f:
        json.dump(record, f)
    print(f"trained {run} seed {seed} in {record['train_seconds']:.0f} s", flush=True)
    return record


def models_of(records: dict, seed: int) -> dict:
    """design -> what it predicts with (a Detector or an ImagePyramid), for one seed."""
    detectors = {run: detector_from_checkpoint(records[run, seed]["checkpoint"])[0] for run in TRAINED}
    return {design: ImagePyramid(detectors[run], SCALES) if pyramid else detectors[run]
            for design, (run, pyramid) in DESIGNS.items()}


def timings(models: dict, seed: int, n: int) -> dict:
    """design -> n wall times (s) of predict on one test scene; the designs take turns on each
    scene, starting one later each time, so no design always runs first."""
    scenes = DigitScenes("test", n=n, seed=seed)
    names = list(models)
    times = {name: [] for name in names}
    for i in range(n):
        images, _, _ = scenes.batch([i])
        for k in range(len(names)):
            name = names[(i + k) % len(names)]
            tick = time.perf_counter()
            models[name].predict(images)
            times[name].append(time.perf_counter() - tick)
    return times


def memory(models: dict, seed: int, n: int) -> dict:
    """design -> the largest peak memory (MB) of predict over n test scenes, one at a time."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_memory import peak_mb  # the benchmarks' tracemalloc peak, measured as there

    scenes = DigitScenes("test", n=n, seed=seed)
    images = [scenes.batch([i])[0] for i in range(n)]  # drawn before, not traced
    return {name: max(peak_mb(lambda x=x: model.predict(x)) for x in images)
            for name, model in models.items()}


def measure_seed(records: dict, seed: int, eval_scenes: int, timed: int) -> dict:
    """Every design's metrics, timings and peak memory for one seed."""
    models = models_of(records, seed)
    out = {}
    for name, model in models.items():
        tick = time.perf_counter()
        metrics, _, _ = evaluate_detector(model, "test", eval_scenes, seed=seed)
        out[name] = {"metrics": metrics, "eval_seconds": round(time.perf_counter() - tick, 1)}
    for name, seconds in timings(models, seed, timed).items():
        out[name]["seconds_per_image"] = seconds
    for name, mb in memory(models, seed, MEMORY_SCENES).items():
        out[name]["peak_mb"] = mb
    return out


def aggregate(results: dict, seeds) -> dict:
    """design -> {metric: [mean, std over seeds]}, ms per image (median of every timing), peak MB."""
    table = {}
    for name in DESIGNS:
        runs = [results[str(s)][name] for s in seeds]
        row = {}
        for column in COLUMNS:
            values = [r["metrics"][column] for r in runs]
            row[column] = [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0]
        row["ms_per_image"] = 1000 * statistics.median([t for r in runs for t in r["seconds_per_image"]])
        row["peak_mb"] = max(r["peak_mb"] for r in runs)
        table[name] = row
    return table


def markdown(table: dict) -> str:
    """The table of docs/results.md: mean ± std in %, ms per image, peak MB per image."""
    lines = ["| design | " + " | ".join(COLUMNS) + " | ms / image | peak MB / image |",
             "| --- |" + " ---: |" * (len(COLUMNS) + 2)]
    for name, row in table.items():
        cells = [f"{100 * row[c][0]:.1f} ± {100 * row[c][1]:.1f}" for c in COLUMNS]
        cells += [f"{row['ms_per_image']:.1f}", f"{row['peak_mb']:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=list(RECIPES), default="live",
                        help="live: the protocol's budget; full: the follow-up (docs/results.md says why)")
    parser.add_argument("--runs", default=None, help="where the checkpoints go "
                        "(default: /tmp/image_pyramid_runs, or /tmp/image_pyramid_runs_full)")
    parser.add_argument("--out", default=None, help="default: docs/results/image_pyramid.json, "
                        "or docs/results/image_pyramid_full.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--eval-scenes", type=int, default=EVAL_SCENES)
    parser.add_argument("--timed-scenes", type=int, default=TIMED_SCENES)
    args = parser.parse_args()
    global recipe
    recipe = RECIPES[args.recipe]
    suffix = "" if args.recipe == "live" else f"_{args.recipe}"
    args.runs = args.runs or f"/tmp/image_pyramid_runs{suffix}"
    args.out = args.out or f"docs/results/image_pyramid{suffix}.json"
    reuse_freed_memory()
    threadpool_limits(limits=1)
    start = time.perf_counter()
    records = {(run, seed): train_run(run, seed, args.runs) for seed in args.seeds for run in TRAINED}
    train_done = time.perf_counter()
    results = {}
    for seed in args.seeds:
        results[str(seed)] = measure_seed(records, seed, args.eval_scenes, args.timed_scenes)
        print(f"measured seed {seed}", flush=True)
    table = aggregate(results, args.seeds)
    data = {"scales": list(SCALES), "seeds": args.seeds, "eval_scenes": args.eval_scenes,
            "timed_scenes_per_seed": args.timed_scenes, "memory_scenes_per_seed": MEMORY_SCENES,
            "designs": {k: {"run": r, "image_pyramid": p} for k, (r, p) in DESIGNS.items()},
            "train_seconds": {f"{run}/{seed}": rec["train_seconds"] for (run, seed), rec in records.items()},
            "train_configs": {run: records[run, args.seeds[0]]["train_config"] for run in TRAINED},
            "results": results, "table": table,
            "seconds": {"training": round(train_done - start, 1),
                        "measuring": round(time.perf_counter() - train_done, 1)}}
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    print(markdown(table))
    print(f"training {data['seconds']['training']:.0f} s, measuring {data['seconds']['measuring']:.0f} s; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
