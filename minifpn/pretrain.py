"""Pre-training the bottom-up pathway, our ImageNet (``minifpn pretrain``).

The paper fine-tunes a ResNet pre-trained on ImageNet classification. Our stand-in trains the
same small ResNet the detectors use (``DigitClassifier``: backbone, global average pooling of
C5, a Linear layer) to name one digit per image, placed as scenes place digits (a size drawn
log-uniformly from 6 to 80 px, anywhere on the 128-px canvas, on the scenes' texture and
noise), drawn from the **train split's source digits only** of the run's seed. Its accuracy is
measured on digits of the val split. ``minifpn.train.train`` runs the training, so pre-training
has the detectors' checkpoints, exact resume and divergence checks.

The recipe (``PRETRAIN_ITERATIONS`` steps of ``PRETRAIN_BATCH_SIZE`` images, SGD with the
detectors' momentum and weight decay, lr ``PRETRAIN_LR`` with warm-up, x0.1 at 75 % and 90 %)
was chosen by its val accuracy alone, before any detector was trained from it (docs/results.md).
"""
from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from .backend import to_device
from .data import DigitScenes, SceneConfig, size_bucket
from .models.classifier import ClassifierConfig, DigitClassifier
from .train import TrainConfig, train

# One digit per image, at the scenes' sizes, places, texture and noise (SceneConfig's defaults).
PRETRAIN_SCENES = {"min_objects": 1, "max_objects": 1}
PRETRAIN_ITERATIONS = 2000
PRETRAIN_BATCH_SIZE = 32
PRETRAIN_LR = 0.1
VAL_DIGITS = 1000  # val images (one digit each) the accuracy is measured on


def pretrain_config(iterations: int = PRETRAIN_ITERATIONS, batch_size: int = PRETRAIN_BATCH_SIZE,
                    lr: float = PRETRAIN_LR, seed: int = 0, warmup: int = 50) -> TrainConfig:
    """The TrainConfig of a pre-training run: single-digit images of the seed's train split."""
    return TrainConfig(iterations=iterations, batch_size=batch_size, lr=lr, warmup=warmup, seed=seed,
                       scenes=dict(PRETRAIN_SCENES))


def evaluate_classifier(classifier: DigitClassifier, split: str = "val", n: int = VAL_DIGITS,
                        seed: int | None = None, batch_size: int = 50) -> dict:
    """Accuracy of ``classifier`` on ``n`` single-digit images of ``split`` (the seed's source
    digits of that split; None: the classifier's own seed, the split it was pre-trained on),
    overall and by the digit's size (small, medium, large: data.md).
    Returns {"all": accuracy, "small": ..., "medium": ..., "large": ..., "count": {bucket: n}}."""
    seed = classifier.config.seed if seed is None else seed
    scenes = DigitScenes(split, n=n, seed=seed, config=SceneConfig(**PRETRAIN_SCENES))
    predicted, truth, buckets = [], [], []
    for start in range(0, n, batch_size):
        images, boxes, labels = scenes.batch(range(start, min(n, start + batch_size)))
        predicted.append(classifier.predict(to_device(images, classifier.backend)))
        truth.append(np.concatenate(labels))
        buckets.append(size_bucket(np.concatenate(boxes)))
    right = np.concatenate(predicted) == np.concatenate(truth)
    buckets = np.concatenate(buckets)
    result = {"all": float(right.mean())}
    for bucket in ("small", "medium", "large"):
        mine = buckets == bucket
        result[bucket] = float(right[mine].mean()) if mine.any() else None
    result["count"] = {"all": int(n), **{b: int((buckets == b).sum()) for b in ("small", "medium", "large")}}
    return result


def pretrain(config: ClassifierConfig, train_config: TrainConfig, run_dir: str,
             val_digits: int = VAL_DIGITS, progress: bool = True, resume: bool = False,
             backend: str = "numpy"):
    """Train a DigitClassifier of ``config`` with ``train_config`` (checkpoints in ``run_dir``),
    then measure its accuracy on ``val_digits`` val images of the run's seed.

    Returns (classifier, record): record is what backbones.json keeps of the run (the recipe,
    run time, accuracy)."""
    if config.seed != train_config.seed:
        raise ValueError(f"pretrain: the classifier's seed ({config.seed}) and the training seed "
                         f"({train_config.seed}) must be one seed: it names the split pre-trained on")
    classifier = DigitClassifier(config).to(backend)
    start = time.perf_counter()
    train(classifier, train_config, run_dir, resume=resume, progress=progress)
    train_seconds = time.perf_counter() - start
    accuracy = evaluate_classifier(classifier, "val", val_digits, seed=train_config.seed)
    record = {"train_config": asdict(train_config), "train_seconds": round(train_seconds, 1),
              "val_accuracy": accuracy, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    return classifier, record


__all__ = ["PRETRAIN_BATCH_SIZE", "PRETRAIN_ITERATIONS", "PRETRAIN_LR", "PRETRAIN_SCENES", "VAL_DIGITS",
           "evaluate_classifier", "pretrain", "pretrain_config"]
