"""The command line refuses every bad option with one line in argparse's style, before any work;
--help shows every default; a run cut short by --time-limit or Ctrl-C says so and how to go on."""
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

from minifpn import cli
from minifpn.backend import cupy_available
from minifpn.cli import build_parser, main
from minifpn.models.detector import DetectorConfig
from minifpn.train import CheckpointError, TrainConfig, TrainingInterrupted

# (job's argv, the words after "minifpn JOB: error: "); training jobs also get --runs TMP/runs
BAD_VALUES = {
    "count": [
        (["train", "--iterations", "0"], "--iterations must be a positive integer, got 0"),
        (["train", "--batch-size", "-2"], "--batch-size must be a positive integer, got -2"),
        (["train", "--checkpoint-every", "0"], "--checkpoint-every must be a positive integer, got 0"),
        (["demo", "--channels", "1.5"], "--channels must be a positive integer, got 1.5"),
        (["demo", "--eval-scenes", "0"], "--eval-scenes must be a positive integer, got 0"),
        (["train", "--num-classes", "0"], "--num-classes must be a positive integer, got 0"),
        (["ablation", "--anchors-per-image", "-1"], "--anchors-per-image must be a positive integer, got -1"),
        (["evaluate", "some.npz", "--scenes", "0"], "--scenes must be a positive integer, got 0"),
    ],
    "widths": [
        (["train", "--widths", "4,4"],
         "--widths must be 4 positive integers separated by commas (W2,W3,W4,W5), got 4,4"),
        (["train", "--widths", "a,b,c,d"],
         "--widths must be 4 positive integers separated by commas (W2,W3,W4,W5), got a,b,c,d"),
        (["demo", "--widths", "16,0,64,128"],
         "--widths must be 4 positive integers separated by commas (W2,W3,W4,W5), got 16,0,64,128"),
    ],
    "lr": [
        (["train", "--lr", "-0.05"], "--lr must be a positive finite number, got -0.05"),
        (["train", "--lr", "0"], "--lr must be a positive finite number, got 0"),
        (["demo", "--lr", "nan"], "--lr must be a positive finite number, got nan"),
        (["train", "--lr", "inf"], "--lr must be a positive finite number, got inf"),
        (["train", "--lr", "fast"], "--lr must be a positive finite number, got fast"),
    ],
    "nonnegative": [
        (["train", "--warmup", "-1"], "--warmup must be an integer >= 0, got -1"),
        (["train", "--seed", "-3"], "--seed must be an integer >= 0, got -3"),
        (["gradcheck", "--seed", "-1"], "--seed must be an integer >= 0, got -1"),
        (["demo", "--time-limit", "-5"],
         "--time-limit must be a number of seconds >= 0 (0: no limit), got -5"),
        (["train", "--time-limit", "nan"],
         "--time-limit must be a number of seconds >= 0 (0: no limit), got nan"),
    ],
    "milestones": [
        (["train", "--milestones", "0.9,0.75"],
         "--milestones must be increasing fractions of the run in (0, 1], separated by commas (e.g. "
         "0.75,0.9), got 0.9,0.75"),
        (["demo", "--milestones", "0,0.5"],
         "--milestones must be increasing fractions of the run in (0, 1], separated by commas (e.g. "
         "0.75,0.9), got 0,0.5"),
        (["train", "--milestones", "late"],
         "--milestones must be increasing fractions of the run in (0, 1], separated by commas (e.g. "
         "0.75,0.9), got late"),
    ],
    "iou": [
        (["train", "--positive-iou", "0"], "--positive-iou must be an IoU in (0, 1], got 0"),
        (["train", "--positive-iou", "1.5"], "--positive-iou must be an IoU in (0, 1], got 1.5"),
        (["train", "--negative-iou", "1"], "--negative-iou must be an IoU in [0, 1), got 1"),
        (["train", "--negative-iou", "-0.1"], "--negative-iou must be an IoU in [0, 1), got -0.1"),
        (["train", "--negative-iou", "0.5"],  # DetectorConfig's own check, in the options' words
         "--negative-iou must be below --positive-iou (an anchor cannot be both), got 0.5 >= 0.4"),
        (["ablation", "--positive-iou", "0.3"],  # the ablation's default negative IoU is 0.3
         "--negative-iou must be below --positive-iou (an anchor cannot be both), got 0.3 >= 0.3"),
    ],
    "fraction": [
        (["train", "--positive-fraction", "0"], "--positive-fraction must be a fraction in (0, 1], got 0"),
        (["train", "--positive-fraction", "1.5"],
         "--positive-fraction must be a fraction in (0, 1], got 1.5"),
    ],
    "setting": [
        (["train", "--setting", "g"], "--setting must be one of c4, c5, fpn, bottom_up, no_lateral, "
                                      "p2_only or a Table 1 letter a-f, got g"),
        (["ablation", "--settings", "a,fpn,z"],
         "--settings must be Table 1 settings separated by commas (c4, c5, fpn, bottom_up, no_lateral, "
         "p2_only or a Table 1 letter a-f), got a,fpn,z: unknown 'z'"),
    ],
    "backend": [
        (["train", "--backend", "tpu"],
         "argument --backend: invalid choice: 'tpu' (choose from 'numpy', 'cupy')"),
        (["evaluate", "some.npz", "--backend", "jax"],
         "argument --backend: invalid choice: 'jax' (choose from 'numpy', 'cupy')"),
    ],
    "files": [
        (["evaluate", "no/such/checkpoint.npz"], "checkpoint no/such/checkpoint.npz does not exist"),
        (["train", "--allow-changes"], "--allow-changes only applies with --resume"),
    ],
}
CASES = [pytest.param(argv, message, id=f"{kind}-{' '.join(argv)}")
         for kind, cases in BAD_VALUES.items() for argv, message in cases]
TRAINING_JOBS = ("train", "demo", "ablation")


def refused(argv, capsys) -> str:
    """Run ``main(argv)``, expect argparse's exit status 2, and return its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", CASES)
def test_a_bad_value_is_one_line_before_any_work(argv, message, tmp_path, capsys):
    runs = tmp_path / "runs"
    extra = ["--runs", str(runs)] if argv[0] in TRAINING_JOBS else []
    err = refused([*argv, *extra], capsys)
    assert err == f"minifpn {argv[0]}: error: {message}\n"  # one line: no usage block, no traceback
    assert not runs.exists()  # refused before a folder was made


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    err = refused(["train", "--resume", "--runs", str(tmp_path), "--name", "none"], capsys)
    expected = os.path.join(str(tmp_path), "none", "checkpoint.npz")
    assert err == (f"minifpn train: error: --resume: no checkpoint at {expected} to resume; "
                   f"check --runs and --name\n")


def test_evaluate_a_folder_is_refused(tmp_path, capsys):
    err = refused(["evaluate", str(tmp_path)], capsys)
    assert err == (f"minifpn evaluate: error: checkpoint {tmp_path} is a folder; "
                   f"expected a checkpoint.npz file\n")


@pytest.mark.skipif(cupy_available(), reason="CuPy and a CUDA device are here: --backend cupy is valid")
@pytest.mark.parametrize("job", ["train", "demo", "gradcheck"])
def test_backend_cupy_without_cupy_is_one_line(job, tmp_path, capsys):
    runs = tmp_path / "runs"
    extra = ["--runs", str(runs)] if job in TRAINING_JOBS else []
    err = refused([job, "--backend", "cupy", *extra], capsys)
    assert err.startswith(f"minifpn {job}: error: --backend cupy cannot be used: backend 'cupy' was asked "
                          f"for but CuPy ")
    assert err.count("\n") == 1 and not runs.exists()


def test_runs_folder_under_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    runs = blocker / "runs"
    err = refused(["train", "--runs", str(runs), "--name", "t"], capsys)
    assert err == (f"minifpn train: error: --runs {runs}: cannot write run outputs to {runs / 't'}: "
                   f"{blocker} is a file, not a folder\n")
    err = refused(["demo", "--runs", str(blocker), "--name", ""], capsys)  # the runs folder is the file
    assert err.endswith(f"{blocker} is a file, not a folder\n") and err.count("\n") == 1


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: permission bits do not stop root's writes, so a read-only "
                           "folder cannot be made here")
def test_runs_folder_without_permission_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        err = refused(["train", "--runs", str(locked / "runs")], capsys)
    finally:
        locked.chmod(0o700)
    assert err == (f"minifpn train: error: --runs {locked / 'runs'}: cannot write run outputs to "
                   f"{locked / 'runs' / 'fpn'}: {locked} is not writable\n")
    assert not (locked / "runs").exists()


SCRIPT = shutil.which("minifpn", path=str(pathlib.Path(sys.executable).parent))
ENTRY_POINTS = [pytest.param([sys.executable, "-m", "minifpn.cli"], id="python -m minifpn.cli"),
                pytest.param([SCRIPT], id="console script", marks=pytest.mark.skipif(
                    SCRIPT is None, reason="the console script is not installed beside python"))]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("argv, message", [
    (["train", "--lr", "-0.05"], "--lr must be a positive finite number, got -0.05"),
    (["demo", "--widths", "8,8,8"],
     "--widths must be 4 positive integers separated by commas (W2,W3,W4,W5), got 8,8,8"),
    (["evaluate", "missing.npz"], "checkpoint missing.npz does not exist"),
])
def test_a_bad_value_from_the_shell(entry, argv, message, tmp_path):
    extra = ["--runs", str(tmp_path / "runs")] if argv[0] in TRAINING_JOBS else []
    res = subprocess.run([*entry, *argv, *extra], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert res.returncode == 2
    assert res.stderr == f"minifpn {argv[0]}: error: {message}\n"
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert sorted(os.listdir(tmp_path)) == []  # nothing was written


# ---- --help -------------------------------------------------------------------------------------

def test_help_shows_every_default_and_list_formats():
    parser = build_parser()
    for job, p in parser.jobs.items():
        text = " ".join(p.format_help().split())  # undo the wrapping
        options = [a for a in p._actions if a.option_strings and a.dest != "help"]
        # an option with default None says what it means instead (--lr, train's --name)
        shown = text.count("(default: ")
        assert shown == len(options), (job, shown, len(options))
    train = " ".join(parser.jobs["train"].format_help().split())
    assert "--widths W2,W3,W4,W5" in train and "(default: 16,32,64,128)" in train
    assert f"--iterations ITERATIONS training steps (default: {TrainConfig().iterations})" in train
    assert "(default: the linear scaling rule, 0.05 x batch size / 8)" in train
    assert "0: no limit (default: 0)" in train
    assert "--allow-changes with --resume: accept a different --lr, --batch-size, --iterations" in train
    demo = " ".join(parser.jobs["demo"].format_help().split())
    assert f"(default: {cli.DEMO_ITERATIONS})" in demo and "(default: 0.85,0.95)" in demo
    assert f"--batch-size BATCH_SIZE scenes per step (default: {cli.DEMO_BATCH_SIZE})" in demo
    assert "--batch-size BATCH_SIZE scenes per step (default: 8)" in train
    assert "--milestones F1,F2" in train and "(default: 0.75,0.9)" in train
    assert f"0: no limit (default: {cli.DEMO_TIME_LIMIT})" in demo
    assert "--time-limit 0 trains every step" in demo
    ablation = " ".join(parser.jobs["ablation"].format_help().split())
    assert "--settings a,b,c" in ablation and "(default: a,b,c,d,e,f)" in ablation


def test_defaults_come_from_the_config_dataclasses():
    args = build_parser().parse_args(["train"])
    assert cli._train_config(args) == TrainConfig()
    assert cli._detector_config(args) == DetectorConfig()
    demo = build_parser().parse_args(["demo"])
    assert cli._detector_config(demo) == DetectorConfig()
    assert (demo.iterations, demo.time_limit) == (cli.DEMO_ITERATIONS, cli.DEMO_TIME_LIMIT)
    assert cli._train_config(demo).milestones == cli.DEMO_MILESTONES == (0.85, 0.95)
    assert cli._train_config(demo).batch_size == cli.DEMO_BATCH_SIZE == 6
    assert cli._train_config(demo).peak_lr() == pytest.approx(0.05 * 6 / 8)  # the linear scaling rule


# ---- the time limit, Ctrl-C, resume ---------------------------------------------------------------

TINY = ["--iterations", "3", "--batch-size", "1", "--widths", "4,4,4,4", "--channels", "4",
        "--eval-scenes", "2", "--quiet"]


def test_demo_stopped_by_its_time_limit_says_so(tmp_path, capsys):
    assert main(["demo", *TINY, "--time-limit", "0.000001", "--runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last == (f"stopped by the time limit at step 1 of 3; expect a lower AP than docs/results.md "
                    f"reports; run `minifpn demo {' '.join(TINY)} --runs {tmp_path} --time-limit 0` "
                    f"(or a larger limit) to train all 3 steps")
    summary = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert summary["iterations"] == 1 and summary["stopped_by_time_limit"] is True


def test_train_stopped_by_its_time_limit_resumes_with_the_printed_command(tmp_path, capsys):
    assert main(["train", *TINY, "--time-limit", "0.000001", "--runs", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    command = (f"minifpn train {' '.join(TINY)} --runs {tmp_path} --resume --time-limit 0")
    assert last == (f"stopped by the time limit at step 1 of 3; expect a lower AP than a full run of 3 "
                    f"steps; run `{command}` (or a larger limit) to train all 3 steps")
    assert main(shlex.split(command)[1:]) == 0  # --time-limit 0: no limit, so all 3 steps
    out = capsys.readouterr().out
    assert "fpn: 3 iterations (3 images)" in out and "stopped by the time limit" not in out
    summary = json.loads((tmp_path / "fpn" / "metrics.json").read_text())
    assert summary["iterations"] == 3 and summary["stopped_by_time_limit"] is False


def interrupted_at(step):
    def fake_train(detector, config, run_dir, **kwargs):
        raise TrainingInterrupted(step, os.path.join(run_dir, "checkpoint.npz"))
    return fake_train


def test_ctrl_c_in_train_is_one_line_with_the_resume_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("minifpn.train.train", interrupted_at(120))
    argv = ["train", "--lr", "0.01", "--runs", str(tmp_path), "--name", "x", "--quiet"]
    assert main(argv) == cli.EXIT_INTERRUPTED == 130
    captured = capsys.readouterr()
    assert captured.err == (f"minifpn train: interrupted at step 120 of {TrainConfig().iterations}; "
                            f"checkpoint saved; resume with: minifpn train --resume --lr 0.01 --runs "
                            f"{tmp_path} --name x --quiet\n")
    assert "Traceback" not in captured.err + captured.out


@pytest.mark.parametrize("job", ["demo", "ablation", "train"])
def test_the_resume_command_rebuilds_the_same_run(job, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("minifpn.train.train", interrupted_at(7))
    argv = [job, "--runs", str(tmp_path), "--widths", "8,8,16,16", "--seed", "3", "--quiet"]
    argv += ["--settings", "e"] if job == "ablation" else ["--setting", "e"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"minifpn {job}: interrupted at step 7 of ")
    command = err.split("resume with: ")[1].strip()
    assert command.startswith("minifpn train --resume ")
    given, again = build_parser().parse_args(argv), build_parser().parse_args(shlex.split(command)[1:])
    if job == "ablation":
        given.setting = "no_lateral"
    assert cli._detector_config(again) == cli._detector_config(given)
    assert cli._train_config(again) == cli._train_config(given)
    assert again.time_limit == given.time_limit and again.resume
    assert cli._run_dir(again) == os.path.join(str(tmp_path), *(["ablation"] if job == "ablation" else []),
                                               {"demo": "demo"}.get(job, "no_lateral"))


def test_ctrl_c_elsewhere_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "checkpoint.npz"
    checkpoint.write_bytes(b"never read")

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("minifpn.train.detector_from_checkpoint", ctrl_c)
    assert main(["evaluate", str(checkpoint)]) == 130
    assert capsys.readouterr().err == "minifpn evaluate: interrupted (Ctrl-C) before it finished\n"


@pytest.mark.parametrize("flags, allowed", [(["--allow-changes"], True), ([], False)])
def test_allow_changes_reaches_train(flags, allowed, tmp_path, monkeypatch, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoint.npz").write_bytes(b"a checkpoint")
    seen = {}

    def fake_train(detector, config, run_dir, resume=False, progress=True, time_limit=None, log=print,
                   allow_changes=False):
        seen.update(resume=resume, allow_changes=allow_changes, lr=config.lr)
        raise CheckpointError("checkpoint r/checkpoint.npz was trained with another schedule: --lr: "
                              "checkpoint 0.05, now 0.1")

    monkeypatch.setattr("minifpn.train.train", fake_train)
    assert main(["train", "--resume", *flags, "--lr", "0.1", "--runs", str(tmp_path), "--name", "r"]) == 1
    assert seen == {"resume": True, "allow_changes": allowed, "lr": 0.1}
    assert capsys.readouterr().err == ("minifpn train: checkpoint r/checkpoint.npz was trained with "
                                       "another schedule: --lr: checkpoint 0.05, now 0.1\n")
