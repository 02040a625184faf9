"""minifpn.table1: the six settings, the paper's numbers, the table writer and the runner."""
import json
import subprocess
import sys

import pytest

from minifpn import table1
from minifpn.models import settings
from minifpn.models.detector import DetectorConfig
from minifpn.table1 import (
    LETTERS,
    PAPER_AR1K,
    PAPER_AR100,
    PAPER_RPN,
    SETTINGS,
    markdown_table,
    resolve,
    run_ablation,
)
from minifpn.train import TrainConfig

ORDER = ["c4", "c5", "fpn", "bottom_up", "no_lateral", "p2_only"]  # the paper's rows (a)..(f)


def test_settings_are_the_papers_rows_in_order():
    assert list(SETTINGS) == ORDER
    assert [s.letter for s in SETTINGS.values()] == list("abcdef")
    assert all(name == s.name for name, s in SETTINGS.items())
    assert LETTERS == dict(zip("abcdef", ORDER))
    assert SETTINGS["fpn"].label == "(c) FPN: P2..P6, one anchor size per level"
    assert SETTINGS["c5"].label.startswith("(b) single-scale: head on C5")


@pytest.mark.parametrize("given, name", [("a", "c4"), ("b", "c5"), ("c", "fpn"), ("d", "bottom_up"),
                                         ("e", "no_lateral"), ("f", "p2_only"), ("fpn", "fpn"),
                                         ("p2_only", "p2_only"), (" c ", "fpn")])
def test_resolve_takes_a_name_or_a_letter(given, name):
    assert resolve(given) == name


@pytest.mark.parametrize("bad", ["g", "FPN", "", "a,b", 3])
def test_resolve_refuses_anything_else_and_lists_what_it_takes(bad):
    with pytest.raises(ValueError) as info:
        resolve(bad)
    assert str(info.value) == ("setting must be one of c4, c5, fpn, bottom_up, no_lateral, p2_only or "
                               f"a Table 1 letter a-f, got {bad!r}")


def test_detector_config_resolves_through_table1():
    assert DetectorConfig(setting="e").setting == "no_lateral"
    with pytest.raises(ValueError, match="or a Table 1 letter a-f, got 'z'"):
        DetectorConfig(setting="z")


def test_paper_numbers_have_one_row_per_setting():
    assert list(PAPER_AR1K) == ORDER and list(PAPER_AR100) == ORDER
    assert all(len(row) == 4 for row in PAPER_AR1K.values())  # AR^1k, AR^1k_s, AR^1k_m, AR^1k_l
    assert PAPER_AR1K["fpn"] == (56.3, 44.9, 63.4, 66.2) and PAPER_AR100["fpn"] == 44.0
    # the paper's text: FPN "improves AR^1k to 56.3, which is 8.0 points increase over the
    # single-scale RPN baseline" (a), and small objects "by a large margin of 12.9 points"
    assert PAPER_AR1K["fpn"][0] - PAPER_AR1K["c4"][0] == pytest.approx(8.0)
    assert PAPER_AR1K["fpn"][1] - PAPER_AR1K["c4"][1] == pytest.approx(12.9)
    # FPN has the best AR^1k, AR^1k_s and AR^100 of the six, but not the best AR^1k_l
    assert max(PAPER_AR1K, key=lambda s: PAPER_AR1K[s][0]) == "fpn"
    assert max(PAPER_AR1K, key=lambda s: PAPER_AR1K[s][1]) == "fpn"
    assert max(PAPER_AR100, key=PAPER_AR100.get) == "fpn"
    assert max(PAPER_AR1K, key=lambda s: PAPER_AR1K[s][3]) == "bottom_up"


def test_paper_rpn_fields_are_detector_config_fields():
    config = DetectorConfig(**PAPER_RPN)
    assert (config.num_classes, config.positive_iou, config.negative_iou, config.anchors_per_image) == (
        1, 0.7, 0.3, 256)


def fake_summary(setting, **metrics):
    values = {"AR@100": 0.5, "AR_small": 0.25, "AR_medium": 0.125, "AR_large": 1.0, "AP": 0.0, "AP50": 0.75}
    return {"setting": setting, "metrics": {**values, **metrics}}


def test_markdown_table_sets_ours_beside_the_papers():
    table = markdown_table([fake_summary("c5"), fake_summary("p2_only", AP=0.3456)])
    lines = table.splitlines()
    assert lines[0] == ("| setting | AR@100 | AR_s | AR_m | AR_l | AP | AP50 | paper AR^100 | paper AR^1k | "
                        "paper AR^1k_s | paper AR^1k_m | paper AR^1k_l |")
    assert lines[1] == "|" + "---|" * 12
    assert lines[2] == (f"| {SETTINGS['c5'].label} | 50.0 | 25.0 | 12.5 | 100.0 | 0.0 | 75.0 "
                        "| 36.3 | 44.9 | 25.3 | 55.5 | 64.2 |")
    assert lines[3] == (f"| {SETTINGS['p2_only'].label} | 50.0 | 25.0 | 12.5 | 100.0 | 34.6 | 75.0 "
                        "| 38.4 | 51.3 | 35.1 | 59.7 | 67.6 |")
    assert len(lines) == 4


def test_run_ablation_trains_each_setting_and_writes_the_table(tmp_path):
    detector_config = DetectorConfig(widths=(4, 4, 4, 4), channels=4, **PAPER_RPN)
    train_config = TrainConfig(iterations=2, batch_size=1, checkpoint_every=2)
    logged, reported = [], []
    summaries = run_ablation(["b", "fpn"], detector_config, train_config, str(tmp_path), eval_scenes=2,
                             progress=False, log=logged.append, report=reported.append)
    assert [s["setting"] for s in summaries] == ["c5", "fpn"]
    assert reported == summaries
    for s in summaries:
        assert s["iterations"] == 2 and s["test_scenes"] == 2 and s["stopped_by_time_limit"] is False
        config = s["detector_config"]
        assert (tuple(config["widths"]), config["channels"], config["num_classes"]) == ((4, 4, 4, 4), 4, 1)
        assert set(s["metrics"]) >= set(table1.OUR_COLUMNS)  # every column the table prints
        # overall values are fractions; a size bucket with no digit in 2 scenes reads -1
        assert all(0 <= s["metrics"][key] <= 1 for key in ("AR@100", "AP", "AP50")), s["metrics"]
        assert (tmp_path / s["setting"] / "checkpoint.npz").stat().st_size > 0
        assert json.loads((tmp_path / s["setting"] / "metrics.json").read_text()) == json.loads(json.dumps(s))
    assert json.loads((tmp_path / "table1.json").read_text()) == json.loads(json.dumps(summaries))
    text = (tmp_path / "table1.md").read_text()
    assert text.startswith("Table 1 at this scale: 2 iterations of batch 1 each, test split (2 scenes).")
    assert text.endswith(markdown_table(summaries) + "\n")
    assert "| 44.0 | 56.3 | 44.9 | 63.4 | 66.2 |" in text  # the paper's FPN row
    assert logged[0] == f"\n=== {SETTINGS['c5'].label} ==="
    assert logged[-1].endswith(f"wrote {tmp_path}/table1.md")


def test_run_ablation_refuses_a_bad_setting_before_any_training(tmp_path):
    with pytest.raises(ValueError, match="got 'z'"):
        run_ablation(["c", "z"], DetectorConfig(), TrainConfig(), str(tmp_path), eval_scenes=2)
    assert list(tmp_path.iterdir()) == []


def test_the_models_do_not_import_the_experiment_runner():
    # the settings live in models/ (minifpn.models.settings); table1, the experiment, imports the
    # models and train at its top, and nothing in models/ or train imports table1: no cycle
    code = ("import sys, minifpn.models, minifpn.models.detector, minifpn.train; "
            "print(sorted(m for m in sys.modules if m.startswith('minifpn.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "minifpn.models.settings" in out and "minifpn.table1" not in out
    assert table1.SETTINGS is settings.SETTINGS and table1.resolve is settings.resolve


# ---- over seeds --------------------------------------------------------------------------------

def seed_summaries(ar_small: dict, **metrics) -> list:
    """One seed's summaries: {setting: AR_small} (fractions), every other metric fixed."""
    return [fake_summary(name, **{"AR@10": 0.4, "AR_small": value, **metrics})
            for name, value in ar_small.items()]


def test_aggregate_gives_mean_and_sample_std_over_seeds_in_percent():
    runs = {0: seed_summaries({"fpn": 0.40, "bottom_up": 0.30}),
            1: seed_summaries({"fpn": 0.50, "bottom_up": 0.30}),
            2: seed_summaries({"fpn": 0.60, "bottom_up": 0.30})}
    table = table1.aggregate(runs)
    assert list(table) == ["fpn", "bottom_up"] and set(table["fpn"]) == set(table1.SEED_COLUMNS)
    assert table["fpn"]["AR_small"]["mean"] == pytest.approx(50.0)
    assert table["fpn"]["AR_small"]["std"] == pytest.approx(10.0)  # ddof = 1: sqrt((100 + 0 + 100) / 2)
    assert table["fpn"]["AR_small"]["values"] == pytest.approx([40.0, 50.0, 60.0])
    assert table["bottom_up"]["AR_small"] == {"mean": pytest.approx(30.0), "std": 0.0,
                                              "values": pytest.approx([30.0] * 3)}
    assert table["fpn"]["AR@10"]["mean"] == pytest.approx(40.0)
    assert table1.aggregate({7: seed_summaries({"fpn": 0.4})})["fpn"]["AR_small"]["std"] == 0.0  # one seed


def test_beyond_spread_is_the_difference_against_the_sum_of_the_stds():
    runs = {0: seed_summaries({"fpn": 0.40, "bottom_up": 0.30, "p2_only": 0.45}),
            1: seed_summaries({"fpn": 0.50, "bottom_up": 0.30, "p2_only": 0.50}),
            2: seed_summaries({"fpn": 0.60, "bottom_up": 0.30, "p2_only": 0.55})}
    table = table1.aggregate(runs)
    d = table1.beyond_spread(table, "fpn", "bottom_up")
    assert d == {"difference": pytest.approx(20.0), "spread": pytest.approx(10.0), "beyond": True}
    d = table1.beyond_spread(table, "fpn", "p2_only")  # same mean, stds 10 and 5
    assert d == {"difference": pytest.approx(0.0), "spread": pytest.approx(15.0), "beyond": False}
    equal = table1.aggregate({0: seed_summaries({"fpn": 0.5, "c4": 0.25}),
                              1: seed_summaries({"fpn": 0.5, "c4": 0.75})})  # |0| vs 35.4: not beyond
    assert table1.beyond_spread(equal, "fpn", "c4")["beyond"] is False


def test_aggregate_leaves_out_what_a_seed_could_not_measure_and_refuses_mismatched_seeds():
    runs = {0: seed_summaries({"fpn": 0.4}, AR_large=-1.0), 1: seed_summaries({"fpn": 0.6}, AR_large=0.5)}
    row = table1.aggregate(runs)["fpn"]
    assert row["AR_large"] == {"mean": pytest.approx(50.0), "std": 0.0, "values": [None, pytest.approx(50.0)]}
    none = table1.aggregate({0: seed_summaries({"fpn": 0.4, "c4": 0.2}, AR_large=-1.0)})
    assert none["fpn"]["AR_large"] == {"mean": None, "std": None, "values": [None]}
    assert table1.beyond_spread(none, "fpn", "c4", "AR_large") == {"difference": None, "spread": None,
                                                                     "beyond": None}
    assert "| n/a |" in table1.markdown_table_over_seeds(none)
    with pytest.raises(ValueError, match=r"every seed must hold the same settings \['fpn'\]; seed 1 holds"):
        table1.aggregate({0: seed_summaries({"fpn": 0.4}), 1: seed_summaries({"bottom_up": 0.4})})
    with pytest.raises(ValueError, match="at least one seed, got none"):
        table1.aggregate({})


def test_markdown_table_over_seeds_prints_mean_pm_std_and_says_what_exceeds_the_spread():
    runs = {0: seed_summaries({"fpn": 0.40, "bottom_up": 0.30, "p2_only": 0.45}),
            1: seed_summaries({"fpn": 0.60, "bottom_up": 0.30, "p2_only": 0.55})}
    lines = table1.markdown_table_over_seeds(table1.aggregate(runs)).splitlines()
    assert lines[0] == "| setting | AR@100 | AR@10 | AR_s | AR_m | AR_l | AP | AP50 |"
    assert lines[1] == "|" + "---|" * 8
    # AR_s of fpn: 40 and 60 -> 50.0 ± 14.1 (sample std: 20 / sqrt(2))
    assert lines[2] == (f"| {SETTINGS['fpn'].label} | 50.0 ± 0.0 | 40.0 ± 0.0 | 50.0 ± 14.1 | 12.5 ± 0.0 "
                        "| 100.0 ± 0.0 | 0.0 ± 0.0 | 75.0 ± 0.0 |")
    assert lines[3].startswith(f"| {SETTINGS['bottom_up'].label} | 50.0 ± 0.0 | 40.0 ± 0.0 | 30.0 ± 0.0 |")
    assert lines[5:] == ["", "* AR_s: (c) - (d) = +20.0, which exceeds the spread 14.1 (std + std)",
                         "* AR_s: (c) - (f) = +0.0, which does not exceed the spread 21.2 (std + std)"]


def test_run_over_seeds_runs_each_seed_on_its_own_test_split_and_writes_the_table(tmp_path):
    detector_config = DetectorConfig(widths=(4, 4, 4, 4), channels=4, **PAPER_RPN)
    train_config = TrainConfig(iterations=1, batch_size=1, checkpoint_every=1, scenes={"distractors": 3})
    logged = []
    runs = table1.run_over_seeds(["c", "d"], detector_config, train_config, str(tmp_path), 2, [3, 1],
                                 progress=False, log=logged.append)
    assert list(runs) == [3, 1]
    for seed, summaries in runs.items():
        assert [s["setting"] for s in summaries] == ["fpn", "bottom_up"]
        assert all(s["detector_config"]["seed"] == seed for s in summaries)
        assert (tmp_path / f"seed{seed}" / "bottom_up" / "checkpoint.npz").exists()
    saved = json.loads((tmp_path / "table1_seeds.json").read_text())
    assert saved["seeds"] == [3, 1] and saved["scenes"] == {"distractors": 3}
    assert saved["table"] == json.loads(json.dumps(table1.aggregate(runs)))
    assert list(saved["runs"]) == ["3", "1"]
    text = (tmp_path / "table1_seeds.md").read_text()
    assert text.startswith("Table 1 over seeds 3, 1: 1 iterations (1 images) each, scenes "
                           "{'distractors': 3}, test split of each seed (2 scenes). Mean ± sample std over "
                           "the seeds, in %.")
    # the same runs gathered from their metrics.json files: seeds sorted, settings in the paper's order
    paths = sorted(str(p) for p in tmp_path.glob("seed*/*/metrics.json"))
    assert len(paths) == 4
    saved_runs = json.loads(json.dumps(runs))  # as metrics.json holds them (lists for tuples)
    assert table1.collect_summaries(paths) == {1: saved_runs["1"], 3: saved_runs["3"]}
    assert table1.collect_summaries([p for p in paths if "seed1/fpn" not in p]) == {  # fpn not in every seed
        1: [saved_runs["1"][1]], 3: [saved_runs["3"][1]]}
    with pytest.raises(ValueError, match="two runs of seed 1, setting fpn"):
        table1.collect_summaries(paths + [str(tmp_path / "seed1" / "fpn" / "metrics.json")])
    assert logged[0] == "\n##### seed 3 #####" and logged[-1].endswith(f"wrote {tmp_path}/table1_seeds.md")
    with pytest.raises(ValueError, match=r"seeds must be distinct and at least one, got \[1, 1\]"):
        table1.run_over_seeds(["c"], detector_config, train_config, str(tmp_path), 2, [1, 1])


def test_train_and_evaluate_scores_the_test_split_of_the_runs_seed_and_scenes(tmp_path):
    # seed 1's test digits are not seed 0's, and the clutter of training is also in the test scenes
    from minifpn.data import DigitScenes, SceneConfig
    from minifpn.models.detector import Detector
    from minifpn.train import train_and_evaluate

    config = TrainConfig(iterations=1, batch_size=1, checkpoint_every=1, seed=1, scenes={"distractors": 4})
    detector = Detector(DetectorConfig(widths=(4, 4, 4, 4), channels=4, seed=1, **PAPER_RPN))
    _, _, _, truths = train_and_evaluate(detector, config, str(tmp_path), 3, progress=False)
    expected = DigitScenes("test", 3, seed=1, config=SceneConfig(distractors=4))
    seed0 = DigitScenes("test", 3, seed=0)
    assert [t["boxes"].tolist() for t in truths] == [expected[i][1].tolist() for i in range(3)]
    assert [t["boxes"].tolist() for t in truths] != [seed0[i][1].tolist() for i in range(3)]


@pytest.mark.parametrize("argv, words", [
    (["--seeds", "0,0"], "--seeds must be distinct integers >= 0 separated by commas, got 0,0"),
    (["--seeds", "0,-1"], "--seeds must be distinct integers >= 0 separated by commas, got 0,-1"),
    (["--seeds", "0,1", "--seed", "2"], "--seed and --seeds: give one of them"),
    (["--distractors", "-3"], "--distractors must be an integer >= 0, got -3"),
    (["--distractors", "2.5"], "--distractors must be an integer >= 0, got 2.5"),
])
def test_ablation_refuses_bad_seeds_and_distractors_in_one_line(argv, words, tmp_path, capsys):
    from minifpn.cli import main
    with pytest.raises(SystemExit) as e:
        main(["ablation", "--runs", str(tmp_path / "runs"), *argv])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"minifpn ablation: error: {words}"
    assert not (tmp_path / "runs").exists()


def test_ablation_options_reach_the_train_config():
    from minifpn.cli import _train_config, build_parser
    args = build_parser().parse_args(["ablation", "--distractors", "10", "--seeds", "2,0,1"])
    assert args.seeds == [2, 0, 1]
    assert _train_config(args).scenes == {"distractors": 10}
    assert _train_config(build_parser().parse_args(["ablation"])).scenes == {}  # default scenes


def _curve_recipe(values):
    # values: {setting: [[AR_s per step] per seed]} at steps 100 and 200 -> learning_curve.json's form
    runs = {f"{name}/{seed}": {"points": {str(step): {"metrics": {"AR_small": v}}
                                          for step, v in zip((100, 200), per_step)}}
            for name, seeds in values.items() for seed, per_step in enumerate(seeds)}
    return {"seeds": [0, 1, 2], "runs": runs}


def test_learning_curves_give_mean_std_and_per_seed_differences_and_find_the_crossing():
    from minifpn.table1 import learning_curves, markdown_learning_curves

    recipe = _curve_recipe({"fpn": [[0.30, 0.40], [0.32, 0.44], [0.34, 0.42]],
                            "bottom_up": [[0.28, 0.50], [0.30, 0.46], [0.26, 0.48]]})
    curves = learning_curves(recipe)
    assert curves["steps"] == [100, 200]
    assert curves["fpn"][0]["mean"] == pytest.approx(32.0) and curves["fpn"][0]["std"] == pytest.approx(2.0)
    assert curves["difference"][0]["values"] == pytest.approx([2.0, 2.0, 8.0])
    assert curves["difference"][1]["values"] == pytest.approx([-10.0, -2.0, -6.0])
    assert curves["difference"][1]["mean"] == pytest.approx(-6.0)
    assert curves["crossings"] == [200]  # (c) ahead at 100, behind at 200
    table = markdown_learning_curves(curves)
    assert "| 100 | 32.0 ± 2.0 | 28.0 ± 2.0 | +4.0 | +2.0, +2.0, +8.0 | no |" in table  # 4.0 = 2 + 2
    assert "| 200 | 42.0 ± 2.0 | 48.0 ± 2.0 | -6.0 | -10.0, -2.0, -6.0 | yes |" in table


def test_learning_curves_refuse_runs_with_different_steps():
    from minifpn.table1 import learning_curves

    recipe = _curve_recipe({"fpn": [[0.3, 0.4]] * 3, "bottom_up": [[0.3, 0.4]] * 3})
    del recipe["runs"]["bottom_up/2"]["points"]["200"]
    with pytest.raises(ValueError, match=r"every run must keep the same steps \[100, 200\]"):
        learning_curves(recipe)
