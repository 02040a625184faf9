"""Table 1's (c) FPN and (d) bottom-up pyramid against training steps: AR_s (and the rest of the
metrics) at every kept checkpoint of a run, over seeds 0, 1, 2, for two recipes:

* "full": `minifpn ablation`'s recipe (600 steps of 8 scenes, widths 16..128, d = 64), whose last
  checkpoint is the three-seed table of docs/results.md; a checkpoint every 100 steps;
* "live": notebook 07's live mini-ablation (250 steps, widths 8..64, d = 32, warm-up 20), a
  checkpoint every 50 steps.

Every checkpoint is one point of the same run (the learning-rate schedule is the run's own, not
that of a shorter run). Each is evaluated on 300 scenes of its seed's test split; the live recipe's
seed 0 is also scored on the first 100 of them, which is what notebook 07 evaluates.

Two follow-up recipes (decided after the first two had run; docs/results.md says why) swap the
two differences between them: "wide_live_schedule" is the full recipe's network on the live
recipe's 250 steps, "narrow_full_schedule" the live recipe's network on the full 600 steps.

Run from the repository root (the protocol is in docs/results.md, "Learning curves"):

    OPENBLAS_NUM_THREADS=1 python docs/results/learning_curve.py            # both recipes
    OPENBLAS_NUM_THREADS=1 python docs/results/learning_curve.py --recipe live
    OPENBLAS_NUM_THREADS=1 python docs/results/learning_curve.py --recipe wide_live_schedule
    OPENBLAS_NUM_THREADS=1 python docs/results/learning_curve.py --recipe narrow_full_schedule

It keeps every checkpoint under runs/learning_curve/ and writes docs/results/learning_curve.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict

from threadpoolctl import threadpool_limits

from minifpn.backend import reuse_freed_memory
from minifpn.cli import _detector_config as detector_config_of
from minifpn.cli import _train_config as train_config_of
from minifpn.cli import build_parser
from minifpn.detection.metrics import evaluate, without_labels
from minifpn.models.detector import Detector, DetectorConfig
from minifpn.train import TrainConfig, detector_from_checkpoint, evaluate_detector, train

SETTINGS = ["fpn", "bottom_up"]
SEEDS = [0, 1, 2]
EVAL_SCENES = 300
NOTEBOOK_SCENES = 100  # notebook 07 scores its live run on the first 100 test scenes of seed 0


def full_recipe(setting: str, seed: int):
    """`minifpn ablation --setting S --seed N --checkpoint-every 100`, parsed by the CLI itself."""
    args = build_parser().parse_args(["ablation", "--setting", setting, "--seed", str(seed),
                                      "--checkpoint-every", "100"])
    return detector_config_of(args), train_config_of(args)


def live_recipe(setting: str, seed: int):
    """Notebook 07's section 3, with a checkpoint every 50 of its 250 steps."""
    detector = DetectorConfig(setting=setting, num_classes=1, positive_iou=0.7, negative_iou=0.3,
                              anchors_per_image=256, widths=(8, 16, 32, 64), channels=32, seed=seed)
    return detector, TrainConfig(iterations=250, batch_size=8, lr=0.05, warmup=20,
                                 checkpoint_every=50, seed=seed)


def wide_live_schedule(setting: str, seed: int):
    """Follow-up: the full recipe's network on the live recipe's schedule (250 steps, warm-up 20)."""
    detector, _ = full_recipe(setting, seed)
    _, schedule = live_recipe(setting, seed)
    return detector, schedule


def narrow_full_schedule(setting: str, seed: int):
    """Follow-up: the live recipe's network on the full recipe's schedule (600 steps, warm-up 50)."""
    detector, _ = live_recipe(setting, seed)
    _, schedule = full_recipe(setting, seed)
    return detector, schedule


RECIPES = {"full": full_recipe, "live": live_recipe,
           "wide_live_schedule": wide_live_schedule, "narrow_full_schedule": narrow_full_schedule}


def run_one(recipe: str, setting: str, seed: int, root: str) -> dict:
    """Train one run, keep each checkpoint as step_NNNN.npz, evaluate each; {step: metrics}."""
    detector_config, train_config = RECIPES[recipe](setting, seed)
    run_dir = os.path.join(root, recipe, f"{setting}_seed{seed}")
    kept = {}

    def keep(iteration, path):
        kept[iteration] = os.path.join(run_dir, f"step_{iteration:04d}.npz")
        shutil.copyfile(path, kept[iteration])

    tick = time.perf_counter()
    train(Detector(detector_config), train_config, run_dir, progress=False, after_checkpoint=keep)
    seconds = time.perf_counter() - tick
    points = {}
    for step, path in sorted(kept.items()):
        detector, _ = detector_from_checkpoint(path)
        metrics, detections, truths = evaluate_detector(detector, "test", EVAL_SCENES, seed=seed,
                                                        scene_config=train_config.scene_config())
        points[step] = {"metrics": metrics}
        if recipe == "live" and seed == 0:
            first = without_labels(truths[:NOTEBOOK_SCENES])
            points[step]["metrics_first_100"] = evaluate(detections[:NOTEBOOK_SCENES], first, 1)
    print(f"{recipe} {setting} seed {seed}: trained in {seconds:.0f} s; AR_s by step "
          + ", ".join(f"{s}: {100 * p['metrics']['AR_small']:.1f}" for s, p in points.items()), flush=True)
    return {"train_seconds": round(seconds, 1), "points": points,
            "detector_config": detector_config.to_dict(), "train_config": asdict(train_config)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=[*RECIPES, "both"], default="both",
                        help="both: live and full (the protocol's); the other two are the follow-up")
    parser.add_argument("--runs", default="runs/learning_curve")
    parser.add_argument("--out", default="docs/results/learning_curve.json")
    args = parser.parse_args()
    reuse_freed_memory()
    threadpool_limits(limits=1)
    results = json.load(open(args.out)) if os.path.exists(args.out) else {}
    for recipe in (["live", "full"] if args.recipe == "both" else [args.recipe]):
        results[recipe] = {"settings": SETTINGS, "seeds": SEEDS, "eval_scenes": EVAL_SCENES, "runs": {}}
        for seed in SEEDS:
            for setting in SETTINGS:
                results[recipe]["runs"][f"{setting}/{seed}"] = run_one(recipe, setting, seed, args.runs)
                with open(args.out, "w") as f:  # after every run: a stopped job keeps what it did
                    json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
