import pathlib
import shutil
import subprocess
import sys

import pytest

from minifpn.cli import main


def test_gradcheck_prints_a_table_with_every_check_passing(capsys):
    assert main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.endswith("pass")]
    assert len(lines) >= 20
    assert "FAIL" not in out
    assert "op" in out and "max rel. error" in out
    for op in ("conv2d", "max_pool2d", "upsample_nearest", "batch_norm", "relu", "add"):
        assert any(line.startswith(op) for line in lines), op


def test_gradcheck_exits_nonzero_when_a_check_fails(monkeypatch, capsys):
    import minifpn.gradcheck as gc
    real = gc.standard_checks

    def one_broken(**kwargs):
        results = real(**kwargs)
        results[0].errors["x"] = 0.5  # pretend a backward were wrong
        return results

    monkeypatch.setattr(gc, "standard_checks", one_broken)
    assert main(["gradcheck"]) == 1
    assert "FAIL" in capsys.readouterr().out


SCRIPT = shutil.which("minifpn", path=str(pathlib.Path(sys.executable).parent))


@pytest.mark.skipif(SCRIPT is None, reason="the console script is not installed beside python")
def test_console_script_help():
    out = subprocess.run([SCRIPT, "gradcheck", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "central-difference" in out


def test_module_entry_point_refuses_unknown_job():
    res = subprocess.run([sys.executable, "-m", "minifpn.cli", "fly"], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "invalid choice" in res.stderr
