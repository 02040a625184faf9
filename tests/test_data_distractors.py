"""DigitScenes' distractors: clutter that is not an object (no box, no label), seeded, split-safe,
and absent by default (every scene of the default config is the scene it was before they existed)."""
import numpy as np
import pytest

from minifpn.data import DISTRACTOR_KINDS, DigitScenes, SceneConfig, digits, draw_distractors, split_indices

# Scenes of the default config as the code before distractors drew them (commit 5653cab):
# (split, seed, i) -> (float64 sum of the image, boxes, labels)
BEFORE_DISTRACTORS = {
    ("train", 0, 7): (1621.6669969706181, [[30, 59, 50, 85], [8, 13, 14, 22], [65, 8, 82, 31]], [2, 1, 4]),
    ("train", 3, 0): (2196.6199932125687, [[16, 63, 61, 119], [118, 107, 124, 116], [104, 92, 116, 108],
                                           [22, 33, 28, 41], [105, 14, 113, 24]], [4, 8, 5, 1, 9]),
    ("test", 0, 123): (1543.544549500828, [[81, 42, 107, 76], [11, 101, 26, 125], [37, 111, 45, 122],
                                           [33, 6, 45, 23]], [3, 5, 2, 7]),
    ("test", 3, 7): (1430.3932527994475, [[69, 103, 77, 124], [46, 101, 52, 110], [1, 68, 5, 74]], [1, 7, 5]),
}


@pytest.mark.parametrize("key", sorted(BEFORE_DISTRACTORS))
def test_default_scenes_are_unchanged(key):
    split, seed, i = key
    total, boxes, labels = BEFORE_DISTRACTORS[key]
    for config in (None, SceneConfig(), SceneConfig(distractors=0)):
        image, b, lab = DigitScenes(split, 1000, seed, config)[i]
        assert float(image.astype(np.float64).sum()) == pytest.approx(total, rel=1e-9)
        np.testing.assert_array_equal(b, np.array(boxes, np.float32))
        np.testing.assert_array_equal(lab, labels)


def test_distractors_add_ink_but_no_boxes():
    plain = DigitScenes("train", 50, 0)
    cluttered = DigitScenes("train", 50, 0, SceneConfig(distractors=10))
    added = []
    for i in range(20):
        (image0, boxes0, labels0), (image1, boxes1, labels1) = plain[i], cluttered[i]
        np.testing.assert_array_equal(boxes1, boxes0)  # the same digits, no box for the clutter
        np.testing.assert_array_equal(labels1, labels0)
        assert (image1 >= image0).all()  # drawn with max over the same canvas and digits
        for x1, y1, x2, y2 in boxes0.astype(int):  # distractor_max_iou = 0: no digit box is touched
            np.testing.assert_array_equal(image1[0, y1:y2, x1:x2], image0[0, y1:y2, x1:x2])
        added.append(int((image1 > image0 + 0.2).sum()))  # pixels that became ink
    assert min(added) > 0 and np.mean(added) > 400, added


def test_distractors_are_deterministic_and_seeded():
    config = SceneConfig(distractors=8)
    a, b = DigitScenes("val", 10, 4, config), DigitScenes("val", 10, 4, SceneConfig(distractors=8))
    for i in (0, 3, 9):
        for x, y in zip(a[i], b[i]):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0][0], DigitScenes("val", 10, 5, config)[0][0])  # another seed
    assert not np.array_equal(a[0][0], a[1][0])  # another scene


def test_distractors_come_from_the_splits_own_digits(monkeypatch):
    # every source digit is a constant image with its own grey value: the values a scene holds
    # name the digits it was drawn from
    images, labels = digits.load_source_digits()
    values = 0.5 + 0.5 * np.arange(len(labels)) / len(labels)
    fake = np.broadcast_to(values[:, None, None], images.shape).copy()
    monkeypatch.setattr(digits, "load_source_digits", lambda: (fake, labels))
    config = SceneConfig(distractors=12, distractor_kinds=("fragment", "scrambled"), noise=0.0, texture=0.0)
    for split in ("train", "test"):
        own = set(values[split_indices(split, 0)].astype(np.float32))
        seen = set()
        for i in range(10):
            image = DigitScenes(split, 10, 0, config)[i][0]
            seen |= set(np.unique(image[image > 0]))
        assert len(seen) > 10 and seen <= own, (split, len(seen - own))


def test_each_kind_and_the_count_placed():
    pool = split_indices("train", 0)
    for kind in DISTRACTOR_KINDS:
        canvas = np.zeros((128, 128))
        config = SceneConfig(distractors=6, distractor_kinds=(kind,))
        placed = draw_distractors(np.random.default_rng(0), canvas, pool, np.zeros((0, 4)), config)
        assert placed == 6 and canvas.max() > 0.5 and canvas.min() == 0.0, kind
    # a scene-filling box leaves no room: nothing is placed, the canvas is untouched
    canvas = np.zeros((128, 128))
    full = np.array([[0.0, 0.0, 128.0, 128.0]])
    assert draw_distractors(np.random.default_rng(0), canvas, pool, full, SceneConfig(distractors=5)) == 0
    assert canvas.max() == 0.0


def test_scrambled_digit_keeps_its_2x2_blocks():
    source = digits.load_source_digits()[0][0]
    scrambled = digits._scrambled(np.random.default_rng(1), source, 8)  # 8 -> 8: no resampling
    blocks = {source[r:r + 2, c:c + 2].tobytes() for r in range(0, 8, 2) for c in range(0, 8, 2)}
    got = [scrambled[r:r + 2, c:c + 2].tobytes() for r in range(0, 8, 2) for c in range(0, 8, 2)]
    assert set(got) <= blocks and not np.array_equal(scrambled, source)
    np.testing.assert_allclose(np.sort(scrambled.ravel()), np.sort(source.ravel()))


@pytest.mark.parametrize("kwargs, words", [
    ({"distractors": -1}, "distractors must be an integer >= 0, got -1"),
    ({"distractors": 2.5}, "distractors must be an integer >= 0, got 2.5"),
    ({"distractors": True}, "distractors must be an integer >= 0, got True"),
    ({"distractor_kinds": ("blob",)}, "distractor_kinds must be a non-empty subset of"),
    ({"distractor_kinds": ()}, "distractor_kinds must be a non-empty subset of"),
    ({"distractor_max_iou": 1.0}, "distractor_max_iou must be in [0, 1), got 1.0"),
])
def test_bad_distractor_options_are_refused(kwargs, words):
    with pytest.raises(ValueError) as e:
        SceneConfig(**kwargs)
    assert words in str(e.value)


def test_train_and_evaluate_from_the_command_line_use_the_runs_seed_and_distractors(tmp_path, capsys):
    # `minifpn evaluate` scores a checkpoint on the scenes its run was tested on: same seed, same clutter
    import json

    from minifpn.cli import main
    tiny = ["--widths", "4,8,8,16", "--channels", "8", "--iterations", "2", "--batch-size", "2",
            "--eval-scenes", "4", "--quiet", "--checkpoint-every", "2"]
    argv = ["train", *tiny, "--seed", "2", "--distractors", "6", "--runs", str(tmp_path), "--name", "t"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "t" / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "t" / "checkpoint.npz"), "--scenes", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary["metrics"]
