"""Data-parallel training over MPI ranks (minifpn.parallel): SyncBN against batch norm on the
concatenated batch, 2 ranks against 1, --workers on the command line, and a lost rank. The MPI tests
start ``mpiexec -n 2`` in a subprocess with a timeout; without mpi4py they skip."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minifpn import parallel
from minifpn.cli import main
from minifpn.train import load_checkpoint

SCRIPTS = pathlib.Path(__file__).parent / "mpi_scripts"
needs_mpi = pytest.mark.skipif(not parallel.mpi_available(),
                               reason="needs mpi4py and mpich: pip install -e \".[parallel]\"")
ENV = {**os.environ, **parallel.ONE_THREAD}
ENV.pop("MINIFPN_WORKERS", None)
TINY = ["--widths", "4,8,8,16", "--channels", "8", "--iterations", "8", "--batch-size", "4",
        "--anchors-per-image", "64", "--eval-scenes", "4", "--checkpoint-every", "4", "--quiet"]


def ranks(n, *args, timeout=60):
    """``mpiexec -n n python *args``, checked; returns its stdout."""
    out = subprocess.run([parallel.mpiexec(), "-n", str(n), sys.executable, *map(str, args)], env=ENV,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_split_is_the_batch_in_order():
    for total, size in [(4, 2), (5, 2), (7, 3), (2, 2)]:
        parts = [parallel.split(total, size, r) for r in range(size)]
        assert [i for a, b in parts for i in range(a, b)] == list(range(total))
        assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


def test_single_process_stand_in_does_nothing():
    comm = parallel.SingleProcess()
    a = np.arange(3.0)
    assert comm.allreduce_(a) is a and a.tolist() == [0.0, 1.0, 2.0]
    assert (comm.rank, comm.size, comm.allgather(5), comm.bcast(7)) == (0, 1, [5], 7)


def test_sync_batch_norm_with_one_rank_is_batch_norm():
    from minifpn import functional as F
    rng = np.random.default_rng(1)
    x, dout = rng.normal(1, 2, (3, 2, 4, 4)), rng.normal(size=(3, 2, 4, 4))
    g, b, rm, rv = rng.normal(size=2), rng.normal(size=2), np.zeros(2), np.ones(2)
    y, cache = F.batch_norm(x, g, b, rm.copy(), rv.copy(), True)
    ys, sync_cache = F.sync_batch_norm(x, g, b, rm.copy(), rv.copy(), parallel.SingleProcess())
    np.testing.assert_allclose(ys, y, rtol=1e-12, atol=1e-12)
    for got, want in zip(F.sync_batch_norm_backward(dout, sync_cache), F.batch_norm_backward(dout, cache)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@needs_mpi
def test_sync_batch_norm_over_two_ranks_is_batch_norm_of_the_whole_batch():
    errors = json.loads(ranks(2, SCRIPTS / "sync_bn_check.py").strip().splitlines()[-1])
    assert errors.pop("size") == 2
    assert all(e < 1e-10 for e in errors.values()), errors


@needs_mpi
def test_two_ranks_train_the_one_process_run_and_resume_with_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, SCRIPTS / "train_run.py", one, "full"], env=ENV, check=True, timeout=60)
    ranks(2, SCRIPTS / "train_run.py", two, "half")  # steps 1-4 on 2 ranks, then 5-8 in one process
    assert load_checkpoint(two / "checkpoint.npz")["meta"]["iteration"] == 4
    subprocess.run([sys.executable, SCRIPTS / "train_run.py", two, "resume"], env=ENV, check=True, timeout=60)
    a, b = (json.loads((d / "history.json").read_text()) for d in (one, two))
    assert len(a["loss"]) == len(b["loss"]) == 8
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    wa, wb = np.load(one / "weights.npz"), np.load(two / "weights.npz")
    for k in wa.files:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-4, atol=1e-5, err_msg=k)


@needs_mpi
def test_cli_workers_2_records_the_workers_1_history(tmp_path):
    for n in (1, 2):
        code = subprocess.run([sys.executable, "-m", "minifpn.cli", "train", *TINY, "--runs", tmp_path,
                               "--name", f"w{n}", "--workers", str(n)], env=ENV, timeout=120,
                              capture_output=True, text=True)
        assert code.returncode == 0, code.stderr[-2000:]
    h1, h2 = (load_checkpoint(tmp_path / f"w{n}" / "checkpoint.npz")["meta"]["history"] for n in (1, 2))
    rel = np.abs(np.array(h2["loss"]) - h1["loss"]) / np.abs(h1["loss"])
    assert len(h1["loss"]) == 8 and rel.max() < 1e-4
    m1, m2 = (load_checkpoint(tmp_path / f"w{n}" / "checkpoint.npz")["model"] for n in (1, 2))
    for k in m1:
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("workers, words", [("0", "at least 1"), ("5", "more than the global batch")])
def test_workers_out_of_range_is_one_line_and_an_error(tmp_path, capsys, workers, words):
    with pytest.raises(SystemExit) as e:
        main(["train", *TINY, "--runs", str(tmp_path), "--workers", workers])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1] and len([line for line in err if "--workers" in line]) == 1


def _rank_pid(run_dir: str, rank: int):
    """The pid of the rank ``rank`` whose command line names ``run_dir`` (read from /proc)."""
    for proc in pathlib.Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if run_dir.encode() in cmd and f"PMI_RANK={rank}".encode() in env:
            return int(proc.name)
    return None


@needs_mpi
def test_a_lost_rank_stops_the_run_with_one_line_and_a_loadable_checkpoint(tmp_path):
    run = tmp_path / "lost"
    args = [*TINY, "--iterations", "100000", "--checkpoint-every", "2"]
    job = subprocess.Popen([sys.executable, "-m", "minifpn.cli", "train", *args, "--runs", str(tmp_path),
                            "--name", "lost", "--workers", "2"], env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (run / "checkpoint.npz").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    pid = _rank_pid(str(tmp_path), 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    _, err = job.communicate(timeout=30)
    assert job.returncode != 0 and time.time() - killed < 30
    assert any(line.startswith("minifpn: rank 1 ") and "was lost" in line for line in err.splitlines()), err
    assert load_checkpoint(run / "checkpoint.npz")["meta"]["iteration"] >= 2


# ---- without MPI: ranks simulated by threads (parallel.simulate) ------------------------------

def test_simulated_ranks_all_reduce_gather_and_broadcast():
    def collectives(comm):
        a = np.full(3, comm.rank + 1.0)
        return comm.allreduce_(a).tolist(), comm.allgather(comm.rank * 10), comm.bcast(comm.rank + 7)
    assert parallel.simulate(3, collectives) == [([6.0, 6.0, 6.0], [0, 10, 20], 7)] * 3


def test_a_simulated_rank_that_fails_stops_the_others():
    def fail_on_rank_1(comm):
        if comm.rank == 1:
            raise ValueError("rank 1 failed")
        return comm.allreduce_(np.zeros(1))  # would wait forever for rank 1 without the abort
    with pytest.raises(ValueError, match="rank 1 failed"):
        parallel.simulate(2, fail_on_rank_1)


def _sync_bn_of_parts(x, gamma, beta, rm, rv, dout, sizes):
    """Sync batch norm of x split into parts of ``sizes`` over simulated ranks: (y, dx) of the
    whole batch concatenated, dgamma and dbeta summed (as the SGD's all-reduce does), and every
    rank's running statistics."""
    from minifpn import functional as F
    bounds = np.cumsum([0, *sizes])

    def rank(comm):
        a, b = bounds[comm.rank], bounds[comm.rank + 1]
        m, v = rm.copy(), rv.copy()
        y, cache = F.sync_batch_norm(x[a:b], gamma, beta, m, v, comm)
        dx, dgamma, dbeta = F.sync_batch_norm_backward(dout[a:b], cache)
        return y, dx, comm.allreduce_(dgamma.copy()), comm.allreduce_(dbeta.copy()), m, v
    parts = parallel.simulate(len(sizes), rank)
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            parts[0][2], parts[0][3], [p[4:] for p in parts])


def test_sync_batch_norm_over_simulated_ranks_is_batch_norm_of_the_whole_batch():
    from minifpn import functional as F
    rng = np.random.default_rng(3)
    x, dout = rng.normal(5.0, 3.0, (5, 3, 4, 6)), rng.normal(size=(5, 3, 4, 6))
    gamma, beta, rm, rv = rng.normal(size=3), rng.normal(size=3), rng.normal(size=3), rng.random(3) + 0.5
    rm_ref, rv_ref = rm.copy(), rv.copy()
    y_ref, cache = F.batch_norm(x, gamma, beta, rm_ref, rv_ref, True)
    want = (y_ref, *F.batch_norm_backward(dout, cache))
    for sizes in [(3, 2), (1, 4), (2, 1, 2)]:
        y, dx, dgamma, dbeta, stats = _sync_bn_of_parts(x, gamma, beta, rm, rv, dout, sizes)
        for name, got, ref in zip(("y", "dx", "dgamma", "dbeta"), (y, dx, dgamma, dbeta), want):
            np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12, err_msg=f"{name} {sizes}")
        for m, v in stats:  # every rank moves its running averages by the global statistics
            np.testing.assert_allclose(m, rm_ref, rtol=1e-10)
            np.testing.assert_allclose(v, rv_ref, rtol=1e-10)


def test_sync_batch_norm_gradient_over_two_ranks_by_central_differences():
    from minifpn.gradcheck import numerical_gradient, rel_error
    rng = np.random.default_rng(4)
    x, dout = rng.normal(1.0, 2.0, (3, 2, 2, 3)), rng.normal(size=(3, 2, 2, 3))
    gamma, beta = rng.normal(size=2), rng.normal(size=2)
    zeros, ones = np.zeros(2), np.ones(2)

    def y():
        return _sync_bn_of_parts(x, gamma, beta, zeros, ones, dout, (2, 1))[0]
    _, dx, dgamma, dbeta, _ = _sync_bn_of_parts(x, gamma, beta, zeros, ones, dout, (2, 1))
    for name, arr, grad in (("x", x, dx), ("gamma", gamma, dgamma), ("beta", beta, dbeta)):
        assert rel_error(grad, numerical_gradient(y, arr, dout)) < 1e-7, name


def test_two_simulated_ranks_sum_to_the_one_process_loss_and_gradient():
    """Detector.loss(shard=...) on each half of a batch, with synchronized batch norm: the halves'
    losses and gradients sum to the one-process ones (float64)."""
    from minifpn.data import DigitScenes, SceneConfig
    from minifpn.models.detector import Detector, DetectorConfig
    config = DetectorConfig(widths=(4, 8, 8, 16), channels=8, anchors_per_image=32)
    images, boxes, labels = DigitScenes("train", n=8, config=SceneConfig(canvas=64, max_size=40,
                                                                        max_objects=3)).batch(range(4))
    images = images.astype(np.float64)

    def gradient(detector, comm, shard=None):
        parallel.synchronize_batch_norm(detector, comm)
        a, b = shard or (0, len(images))
        loss, _ = detector.loss(images[a:b], boxes, labels, np.random.default_rng(0), shard=shard)
        detector.zero_grad()
        detector.backward()
        return loss, np.concatenate([p.grad.ravel() for p in detector.parameters()])

    one_loss, one_grad = gradient(Detector(config, dtype=np.float64), parallel.SingleProcess())
    halves = parallel.simulate(2, lambda comm: gradient(Detector(config, dtype=np.float64), comm,
                                                        parallel.split(len(images), 2, comm.rank)))
    assert abs(sum(loss for loss, _ in halves) - one_loss) < 1e-10 * abs(one_loss)
    total = halves[0][1] + halves[1][1]
    assert np.abs(total - one_grad).max() < 1e-10 * np.abs(one_grad).max()


def _tiny_run(run_dir, comm, seed=0, iterations=4):
    """A tiny detector trained ``iterations`` steps on a global batch of 4 over ``comm``."""
    from minifpn.models.detector import Detector, DetectorConfig
    from minifpn.train import TrainConfig, train
    detector = Detector(DetectorConfig(widths=(4, 8, 8, 16), channels=8, anchors_per_image=64, seed=seed))
    config = TrainConfig(iterations=iterations, batch_size=4, lr=0.01, warmup=2, checkpoint_every=2,
                         scenes={"canvas": 64, "max_size": 40, "max_objects": 3})
    history = train(detector, config, str(run_dir), progress=False, log=lambda *_: None, comm=comm)
    return history, detector.state_dict()


def test_two_simulated_ranks_train_the_one_process_run(tmp_path):
    one, _ = _tiny_run(tmp_path / "one", parallel.SingleProcess())
    (two, weights), _ = parallel.simulate(2, lambda comm: _tiny_run(tmp_path / "two", comm))
    rel = np.abs(np.array(two["loss"]) - one["loss"]) / np.abs(one["loss"])
    assert len(two["loss"]) == 4 and rel.max() < 1e-4
    saved = load_checkpoint(tmp_path / "two" / "checkpoint.npz")  # rank 0 wrote it: the ranks' weights
    assert saved["meta"]["iteration"] == 4
    for k, v in weights.items():
        np.testing.assert_array_equal(saved["model"][k], v, err_msg=k)


def test_ranks_with_different_weights_are_stopped_at_the_first_check(tmp_path):
    from minifpn.train import TrainingDiverged
    with pytest.raises(TrainingDiverged, match=r"weights of rank\(s\) \[1\] differ from rank 0's"):
        parallel.simulate(2, lambda comm: _tiny_run(tmp_path / "differ", comm, seed=comm.rank))
    assert not (tmp_path / "differ" / "checkpoint.npz").exists()  # nothing was written


def test_evaluation_split_over_simulated_ranks_gathers_the_one_process_result():
    from minifpn.models.detector import Detector, DetectorConfig
    from minifpn.train import evaluate_detector
    config = DetectorConfig(widths=(4, 8, 8, 16), channels=8)
    detector = Detector(config).eval()
    one = evaluate_detector(detector, n=5, batch_size=2, comm=parallel.SingleProcess())
    parts = parallel.simulate(2, lambda comm: evaluate_detector(Detector(config).eval(), n=5, batch_size=2,
                                                                 comm=comm))
    for metrics, detections, truths in parts:  # every rank returns all 5 scenes, in order
        assert metrics == one[0] and len(detections) == len(truths) == 5
        for got, want in zip(detections, one[1]):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
        for got, want in zip(truths, one[2]):
            np.testing.assert_array_equal(got["boxes"], want["boxes"])


def test_sync_batch_norm_on_each_backend_over_simulated_ranks(backend):
    """The synchronized forward and backward keep to the device (the strict CuPy stand-in refuses
    implicit host round trips) and equal batch norm of the whole batch there."""
    from minifpn import functional as F
    from minifpn.backend import to_device, to_numpy
    rng = np.random.default_rng(5)
    host = [rng.normal(size=(4, 3, 2, 3)), rng.normal(size=(4, 3, 2, 3)), rng.normal(size=3),
            rng.normal(size=3)]
    x, dout, gamma, beta = (to_device(a, backend) for a in host)

    def rank(comm):
        a, b = parallel.split(4, 2, comm.rank)
        y, cache = F.sync_batch_norm(x[a:b], gamma, beta, to_device(np.zeros(3), backend),
                                     to_device(np.ones(3), backend), comm)
        return to_numpy(y), to_numpy(F.sync_batch_norm_backward(dout[a:b], cache)[0])
    parts = parallel.simulate(2, rank)
    y_ref, cache = F.batch_norm(host[0], host[2], host[3], np.zeros(3), np.ones(3), True)
    dx_ref = F.batch_norm_backward(host[1], cache)[0]
    np.testing.assert_allclose(np.concatenate([p[0] for p in parts]), y_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), dx_ref, rtol=1e-10, atol=1e-12)


@needs_mpi
def test_ablation_on_two_workers_writes_the_one_process_table_once(tmp_path):
    for n in (1, 2):
        out = subprocess.run([sys.executable, "-m", "minifpn.cli", "ablation", *TINY, "--settings", "c4,fpn",
                              "--runs", tmp_path, "--name", f"w{n}", "--workers", str(n)], env=ENV,
                             timeout=240, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.count("wrote ") == 1, out.stdout[-2000:]  # rank 0 alone speaks
    t1, t2 = (json.loads((tmp_path / f"w{n}" / "table1.json").read_text()) for n in (1, 2))
    assert [s["setting"] for s in t2] == ["c4", "fpn"]
    for setting in ("c4", "fpn"):  # the same runs, split: float32 summation order apart
        h1, h2 = (load_checkpoint(tmp_path / f"w{n}" / setting / "checkpoint.npz")["meta"]["history"]
                  for n in (1, 2))
        np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=1e-4, err_msg=setting)
    for s1, s2 in zip(t1, t2):  # weights 1e-7 apart score the 4 test scenes alike
        for key in s1["metrics"]:
            assert abs(s2["metrics"][key] - s1["metrics"][key]) <= 1e-6, (s1["setting"], key)


@needs_mpi
def test_reference_refuses_workers_and_jobs_together(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["reference", "--workers", "2", "--jobs", "2", "--out", str(tmp_path)])
    assert e.value.code != 0
    assert "give one of them" in capsys.readouterr().err.strip().splitlines()[-1]


def test_each_rank_of_a_host_takes_its_own_gpu(stand_in, monkeypatch):
    monkeypatch.setattr(stand_in.cuda.runtime, "getDeviceCount", lambda: 4)
    monkeypatch.delenv("MPI_LOCALRANKID", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_RANK", raising=False)

    class Rank:
        def __init__(self, rank):
            self.rank = rank

    chosen = []
    for rank in range(6):  # one host: device rank % 4
        chosen.append((parallel.use_device_of_rank(Rank(rank)), stand_in.cuda.Device.current))
    assert chosen == [(0, 0), (1, 1), (2, 2), (3, 3), (0, 0), (1, 1)]
    monkeypatch.setenv("MPI_LOCALRANKID", "2")  # rank 9, third on its host (MPICH's variable)
    assert parallel.use_device_of_rank(Rank(9)) == 2 and stand_in.cuda.Device.current == 2
