"""Every configuration checks its values where it is defined, with one line naming what is
expected: DetectorConfig (anchors, labelling), TrainConfig (schedule, scenes)."""
import re

import numpy as np
import pytest

from minifpn.models.detector import Detector, DetectorConfig
from minifpn.train import TrainConfig


@pytest.mark.parametrize("overrides,message", [
    ({"anchor_sizes": (8, 16)},
     "DetectorConfig: setting 'fpn' puts one anchor size on each of P2, P3, P4, P5, P6: anchor_sizes "
     "needs 5 sizes, got 2 (8, 16)"),
    ({"setting": "d", "anchor_sizes": (8, 16, 32, 64, 128, 256)},
     "DetectorConfig: setting 'bottom_up' puts one anchor size on each of P2, P3, P4, P5, P6: "
     "anchor_sizes needs 5 sizes, got 6 (8, 16, 32, 64, 128, 256)"),
    ({"anchor_sizes": (8, 16, 0, 64, 128)},
     "DetectorConfig: anchor_sizes must be positive numbers, got (8, 16, 0, 64, 128)"),
    ({"aspect_ratios": ()}, "DetectorConfig: aspect_ratios must be positive numbers, got ()"),
    ({"positive_iou": 0.1, "negative_iou": 0.9},
     "DetectorConfig: negative_iou must be below positive_iou (an anchor cannot be both), got 0.9 >= 0.1"),
    ({"positive_fraction": 7}, "DetectorConfig: positive_fraction must be a number in (0, 1], got 7"),
    ({"positive_fraction": 0}, "DetectorConfig: positive_fraction must be a number in (0, 1], got 0"),
    ({"positive_iou": float("nan")}, "DetectorConfig: positive_iou must be a number in (0, 1], got nan"),
    ({"positive_iou": True}, "DetectorConfig: positive_iou must be a number in (0, 1], got True"),
    ({"negative_iou": 1.0}, "DetectorConfig: negative_iou must be a number in [0, 1), got 1.0"),
    ({"normalize_by": "bogus"},
     "DetectorConfig: normalize_by must be one of 'sampled', 'positives', got 'bogus'"),
])
def test_detector_config_refuses_what_its_detector_cannot_use(overrides, message):
    with pytest.raises(ValueError) as e:
        DetectorConfig(**overrides)
    assert str(e.value) == message and "\n" not in str(e.value)


def test_the_anchor_rows_match_the_head_rows_for_every_accepted_config():
    # the bug the check prevents: 2 sizes on 5 levels gave 1,023 logit rows per image for 960 anchors
    for overrides in ({}, {"setting": "p2_only", "anchor_sizes": (8, 16)},
                      {"setting": "c4", "anchor_sizes": (16, 32, 64)}):
        det = Detector(DetectorConfig(widths=(4, 4, 4, 4), channels=4, **overrides))
        images = np.zeros((2, 1, 128, 128), np.float32)
        out = det.forward(images)
        assert out.logits.shape[1] == sum(len(a) for a in out.anchors), overrides


def test_detector_config_keeps_the_values_it_accepts():
    c = DetectorConfig(positive_iou=np.float32(0.7), negative_iou=0, positive_fraction=1,
                       normalize_by="positives", setting="f", anchor_sizes=(8, 16))
    assert (c.negative_iou, c.positive_fraction, c.normalize_by, c.setting) == (0, 1, "positives", "p2_only")


@pytest.mark.parametrize("overrides,message", [
    ({"iterations": 0}, "TrainConfig: iterations must be >= 1, got 0"),
    ({"batch_size": 2.5}, "TrainConfig: batch_size must be an int (not a bool or a float), got 2.5"),
    ({"warmup": -1}, "TrainConfig: warmup must be >= 0, got -1"),
    ({"checkpoint_every": 0}, "TrainConfig: checkpoint_every must be >= 1, got 0"),
    ({"lr": -0.05}, "TrainConfig: lr must be a positive finite number (or None: the linear scaling rule), "
                    "got -0.05"),
    ({"lr": float("inf")}, "TrainConfig: lr must be a positive finite number (or None: the linear "
                           "scaling rule), got inf"),
    ({"momentum": 1.0}, "TrainConfig: momentum must be a number in [0, 1), got 1.0"),
    ({"weight_decay": -1e-4}, "TrainConfig: weight_decay must be a finite number >= 0, got -0.0001"),
    ({"milestones": (0.9, 0.75)},
     "TrainConfig: milestones must be increasing fractions of the run in (0, 1], got (0.9, 0.75)"),
    ({"milestones": (0.5, 1.5)},
     "TrainConfig: milestones must be increasing fractions of the run in (0, 1], got (0.5, 1.5)"),
])
def test_train_config_refuses_a_schedule_it_cannot_run(overrides, message):
    with pytest.raises(ValueError) as e:
        TrainConfig(**overrides)
    assert str(e.value) == message


def test_train_config_refuses_scenes_that_are_not_a_scene_config():
    with pytest.raises(ValueError, match=re.escape("TrainConfig: scenes {'bogus': 1} are not a "
                                                   "SceneConfig: ")):
        TrainConfig(scenes={"bogus": 1})
    with pytest.raises(ValueError, match=re.escape("TrainConfig: scenes {'distractors': -1} are not a "
                                                   "SceneConfig: distractors must be an integer >= 0")):
        TrainConfig(scenes={"distractors": -1})


def test_a_saved_train_config_still_loads():
    saved = {"iterations": 1600, "batch_size": 8, "lr": None, "momentum": 0.9, "weight_decay": 0.0001,
             "warmup": 50, "milestones": [0.75, 0.9], "checkpoint_every": 100, "seed": 0, "scenes": {}}
    config = TrainConfig.from_dict(saved)
    assert config.milestones == (0.75, 0.9) and config.peak_lr() == 0.05
