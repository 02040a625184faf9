"""minifpn.analysis: the per-level linear probe of digit identity (pooling, the classifier, the result)."""
import json

import numpy as np
import pytest

from minifpn.analysis import (
    BUCKETS,
    ProbeResult,
    box_cells,
    digit_features,
    fit_softmax,
    format_probe_table,
    level_maps,
    plot_probe,
    pool_box,
    probe_levels,
)
from minifpn.data import DigitScenes, size_bucket
from minifpn.models.detector import Detector

TINY = dict(widths=(4, 4, 8, 8), channels=4)  # an untrained detector that runs in milliseconds
LEVELS = ["C2", "C3", "C4", "C5", "P2", "P3", "P4", "P5"]


@pytest.fixture(scope="module")
def tiny():
    return Detector(setting="fpn", **TINY)


# ---- which cells a box covers ----------------------------------------------------------------

@pytest.mark.parametrize("box, stride, size, expected", [
    # centres at 2, 6, 10, ...: [4, 20) holds 6, 10, 14, 18 -> cols 1..4; [4, 12) holds 6, 10 -> rows 1..2
    ((4, 4, 20, 12), 4, 32, (slice(1, 3), slice(1, 5))),
    # stride 32, centres 16, 48, 80, 112: [40, 50) holds 48 -> cell 1 on both axes
    ((40, 40, 50, 50), 32, 4, (slice(1, 2), slice(1, 2))),
    # [50, 60) holds no centre: the cell under the box's centre, 55 // 32 = 1
    ((50, 50, 60, 60), 32, 4, (slice(1, 2), slice(1, 2))),
    # at the right edge: [120, 128) holds 122 and 126 -> cols 30, 31; rows [0, 3): no centre, cell 0
    ((120, 0, 128, 3), 4, 32, (slice(0, 1), slice(30, 32))),
])
def test_box_cells_are_the_cells_whose_centres_lie_in_the_box(box, stride, size, expected):
    assert box_cells(box, stride, size, size) == expected


def test_box_cells_never_leave_the_map_and_never_come_back_empty():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x1, y1 = rng.uniform(0, 127, 2)
        box = (x1, y1, x1 + rng.uniform(0.5, 128 - x1), y1 + rng.uniform(0.5, 128 - y1))
        for stride in (4, 8, 16, 32):
            for cells in box_cells(box, stride, 128 // stride, 128 // stride):
                assert 0 <= cells.start < cells.stop <= 128 // stride


def test_pool_box_is_the_mean_over_the_cells_computed_by_hand():
    m = np.arange(2 * 8 * 8, dtype=np.float64).reshape(2, 8, 8)
    # stride 4, box x in [5, 15): centres 6, 10, 14 -> cols 1..3; y in [0, 7): centres 2, 6 -> rows 0..1
    expected = [np.mean([m[c, r, j] for r in (0, 1) for j in (1, 2, 3)]) for c in (0, 1)]
    np.testing.assert_allclose(pool_box(m, (5, 0, 15, 7), 4), expected)
    with pytest.raises(ValueError, match=r"pool_box: expected one image's map \(C, H, W\), got shape"):
        pool_box(m[None], (5, 0, 15, 7), 4)


def test_digit_features_pool_each_level_inside_each_box(tiny):
    """The pooled feature of one digit equals the mean over its cells, taken by hand from the maps."""
    scenes = DigitScenes("val", n=2)
    feats = digit_features(tiny, scenes)
    image, boxes, labels = scenes[0]
    maps = level_maps(tiny, image[None])
    assert list(maps) == LEVELS
    box = boxes[0]
    for name, stride in (("C2", 4), ("C5", 32), ("P2", 4), ("P4", 16)):
        m = maps[name][0][0]  # (C, H, W) of scene 0
        assert maps[name][1] == stride
        cols = [j for j in range(m.shape[2]) if box[0] <= (j + 0.5) * stride < box[2]]
        rows = [i for i in range(m.shape[1]) if box[1] <= (i + 0.5) * stride < box[3]]
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        cols, rows = cols or [int(cx // stride)], rows or [int(cy // stride)]
        by_hand = m[:, rows][:, :, cols].mean(axis=(1, 2))
        np.testing.assert_allclose(feats.features[name][0], by_hand, rtol=1e-6)
    n_digits = len(scenes[0][1]) + len(scenes[1][1])
    assert feats.labels.tolist() == np.concatenate([scenes[0][2], scenes[1][2]]).tolist()
    assert feats.sizes.tolist() == np.concatenate([size_bucket(scenes[i][1]) for i in (0, 1)]).tolist()
    assert {name: f.shape for name, f in feats.features.items()} == {
        name: (n_digits, c) for name, c in zip(LEVELS, [4, 4, 8, 8, 4, 4, 4, 4])}


def test_level_maps_of_a_detector_without_a_pyramid_are_c2_to_c5():
    image = DigitScenes("val", n=1)[0][0][None]
    assert list(level_maps(Detector(setting="c4", **TINY), image)) == ["C2", "C3", "C4", "C5"]
    assert list(level_maps(Detector(setting="bottom_up", **TINY), image)) == LEVELS


# ---- the classifier ----------------------------------------------------------------------------

def _clusters(rng, n, centres, noise):
    y = rng.integers(0, len(centres), n)
    return centres[y] + noise * rng.normal(size=(n, centres.shape[1])), y


def test_fit_softmax_separates_linearly_separable_digits():
    rng = np.random.default_rng(0)
    centres = 5 * rng.normal(size=(10, 20))  # ten classes, far apart against unit noise
    X, y = _clusters(rng, 400, centres, 1.0)
    X_new, y_new = _clusters(rng, 400, centres, 1.0)
    probe = fit_softmax(X, y)
    assert (probe.predict(X) == y).mean() == 1.0
    assert (probe.predict(X_new) == y_new).mean() >= 0.99


def test_fit_softmax_cannot_name_classes_that_the_features_do_not_carry():
    """The check above can fail: on noise features the held-out accuracy is near chance (10%)."""
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(400, 20)), rng.integers(0, 10, 400)
    X_new, y_new = rng.normal(size=(2000, 20)), rng.integers(0, 10, 2000)
    assert (fit_softmax(X, y).predict(X_new) == y_new).mean() < 0.15


def test_fit_softmax_steps_never_raise_the_loss():
    """Step 1 / L with L a bound on the curvature: the regularised loss falls at every step."""
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(60, 5)) @ rng.normal(size=(5, 5)), rng.integers(0, 10, 60)  # correlated

    def loss(probe):
        logits = ((X - probe.mean) / probe.std) @ probe.W + probe.b
        logits -= logits.max(axis=1, keepdims=True)
        ce = np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(len(y)), y])
        return ce + 0.01 / 2 * np.sum(probe.W ** 2)

    losses = [loss(fit_softmax(X, y, steps=k, l2=0.01)) for k in range(0, 40)]
    assert losses[0] == pytest.approx(np.log(10))  # W = 0, b = 0: every class at 1/10
    assert np.all(np.diff(losses) < 0), np.diff(losses).max()


def test_fit_softmax_is_deterministic_and_tolerates_a_constant_feature():
    rng = np.random.default_rng(2)
    X, y = rng.normal(size=(50, 6)), rng.integers(0, 10, 50)
    X[:, 3] = 7.0  # a dead channel: standardised to 0, not NaN
    a, b = fit_softmax(X, y), fit_softmax(X, y)
    assert np.isfinite(a.W).all() and np.array_equal(a.W, b.W) and np.array_equal(a.b, b.b)
    with pytest.raises(ValueError, match=r"fit_softmax: expected X \(D, C\) and y \(D,\) with D >= 1"):
        fit_softmax(X, y[:-1])


# ---- the probe of every level ------------------------------------------------------------------

def test_probe_levels_result_shapes_and_counts(tiny):
    r = probe_levels(tiny, scenes=3, seeds=2, steps=20)
    assert r.levels == LEVELS and r.buckets == BUCKETS and r.setting == "fpn"
    assert r.accuracy.shape == (8, 2, 4)
    finite = r.accuracy[np.isfinite(r.accuracy)]
    assert finite.size and ((finite >= 0) & (finite <= 1)).all()
    assert np.isfinite(r.accuracy[:, :, 0]).all()  # every resample scores some digit
    scored = np.concatenate([DigitScenes("test", n=3)[i][1] for i in range(3)])
    assert r.counts["all"] == len(scored) == r.counts["small"] + r.counts["medium"] + r.counts["large"]
    assert r.fit_digits == sum(len(DigitScenes("val", n=3)[i][1]) for i in range(3))
    assert r.channels == dict(zip(LEVELS, [4, 4, 8, 8, 4, 4, 4, 4]))
    assert r.mean("P2") == pytest.approx(r.accuracy[4, :, 0].mean())
    assert r.std("C3", "all") == pytest.approx(r.accuracy[1, :, 0].std())
    table = format_probe_table(r)
    assert table.splitlines()[0].startswith("| detector | level | channels | all (")
    assert "| fpn | P2 | 4 | " in table and len(table.splitlines()) == 2 + 8


def test_probe_levels_is_determined_by_its_seeds(tiny):
    a = probe_levels(tiny, scenes=3, seeds=2, steps=20)
    b = probe_levels(tiny, scenes=3, seeds=2, steps=20)
    c = probe_levels(tiny, scenes=3, seeds=1, steps=20)
    np.testing.assert_array_equal(a.accuracy, b.accuracy)
    np.testing.assert_array_equal(a.accuracy[:, :1], c.accuracy)  # seed 0 is the same resample
    assert not np.array_equal(a.accuracy[:, 0], a.accuracy[:, 1])  # seed 1 is another one
    assert a.scene_seed == tiny.config.seed == 0


def test_probe_levels_draws_its_digits_with_the_training_runs_seed(tiny):
    """scene_seed picks the scenes and the split of the source digits (the run's TrainConfig.seed)."""
    r = probe_levels(tiny, scenes=3, seeds=1, steps=20, scene_seed=5)
    assert r.scene_seed == 5
    assert r.fit_digits == sum(len(DigitScenes("val", n=3, seed=5)[i][1]) for i in range(3))
    assert r.counts["all"] == sum(len(DigitScenes("test", n=3, seed=5)[i][1]) for i in range(3))


@pytest.mark.parametrize("scenes, seeds", [(0, 3), (5, 0), (2.5, 3)])
def test_probe_levels_refuses_bad_counts(tiny, scenes, seeds):
    with pytest.raises(ValueError, match="probe_levels: scenes and seeds must be integers >= 1"):
        probe_levels(tiny, scenes=scenes, seeds=seeds)


def test_probe_result_from_dict_inverts_to_dict_through_json(tiny):
    """A real result, with NaN where no scored digit has a size, comes back equal from its JSON."""
    r = probe_levels(tiny, scenes=3, seeds=2, steps=20)
    assert np.isnan(r.accuracy).any() and np.isfinite(r.accuracy).any()  # the test's premise
    back = ProbeResult.from_dict(json.loads(json.dumps(r.to_dict())))  # NaN -> None (null) -> NaN
    assert back.accuracy.dtype == np.float64 and back.accuracy.shape == r.accuracy.shape == (8, 2, 4)
    np.testing.assert_array_equal(np.isnan(back.accuracy), np.isnan(r.accuracy))
    np.testing.assert_array_equal(back.accuracy, r.accuracy)  # NaN in the same places, equal elsewhere
    assert (back.setting, back.levels, back.buckets) == (r.setting, r.levels, r.buckets)
    assert (r.setting, r.levels, r.buckets) == ("fpn", LEVELS, BUCKETS)
    assert back.counts == r.counts and back.channels == r.channels
    assert (back.fit_digits, back.scene_seed) == (r.fit_digits, r.scene_seed)
    assert back.seconds == round(r.seconds, 1)
    assert format_probe_table(back) == format_probe_table(r)
    assert " - |" in format_probe_table(back)  # a size with no scored digit, shown as "-"
    with pytest.raises(ValueError, match=r"ProbeResult.from_dict: expected accuracy \(levels 8, seeds, "):
        ProbeResult.from_dict({**r.to_dict(), "accuracy": r.to_dict()["accuracy"][:7]})


# ---- the CLI job: minifpn probe ----------------------------------------------------------------

def test_cli_probe_prints_the_table_of_a_checkpoint(tmp_path, capsys):
    from minifpn.cli import main
    from minifpn.optim import SGD
    from minifpn.train import save_checkpoint

    detector = Detector(setting="bottom_up", **TINY)
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, detector, SGD(detector.named_parameters(), lr=0.1),
                    {"detector_config": detector.config.to_dict(), "iteration": 0})
    assert main(["probe", str(path), "--scenes", "2", "--seeds", "2", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "softmax regression (1000 gradient-descent steps, L2 0.01)" in out
    assert "mean ± std over 2 bootstrap resamples" in out and "(scene seed 0;" in out
    rows = [line for line in out.splitlines() if line.startswith("| bottom_up |")]
    assert [row.split("|")[2].strip() for row in rows] == LEVELS
    saved = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert saved["command"] == f"minifpn probe {path} --scenes 2 --seeds 2 --out {tmp_path / 'out'}"
    (result,) = saved["results"]
    assert result["setting"] == "bottom_up" and result["levels"] == LEVELS and result["scene_seed"] == 0
    assert np.array(result["accuracy"], dtype=float).shape == (8, 2, 4)
    assert (tmp_path / "out" / "probe.png").stat().st_size > 10_000


def test_plot_probe_draws_c_and_p_of_the_first_detector_and_p_of_the_others(tiny):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpn = probe_levels(tiny, scenes=2, seeds=1, steps=5)
    bottom_up = probe_levels(Detector(setting="bottom_up", **TINY), scenes=2, seeds=1, steps=5)
    fig = plot_probe([fpn, bottom_up])
    titles = [ax.get_title().split(" (")[0] for ax in fig.axes]
    assert titles == ["small digits", "medium digits", "large digits"]
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["chance (10 %)", "fpn: C_k", "fpn: P_k", "bottom_up: P_k"]
    assert len(fig.axes[0].patches) == 3 * 4  # three series, levels 2..5
    plt.close(fig)


@pytest.mark.parametrize("argv, message", [
    (["probe", "missing.npz"], "minifpn probe: error: checkpoint missing.npz does not exist"),
    (["probe", "x.npz", "--seeds", "0"], "minifpn probe: error: --seeds must be a positive integer, got 0"),
    (["probe", "x.npz", "--scenes", "many"],
     "minifpn probe: error: --scenes must be a positive integer, got many"),
    (["probe", "x.npz", "--out", "tests/test_analysis.py/out"],
     "minifpn probe: error: --out tests/test_analysis.py/out: cannot write the probe's files: "),
])
def test_cli_probe_refuses_bad_options_in_one_line(argv, message, capsys):
    from minifpn.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)
