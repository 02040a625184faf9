"""Data-parallel training over MPI ranks (mpi4py), as the paper trains: synchronized SGD.

Each rank holds the whole model and a part of the global batch; after the backward, ONE
all-reduce sums the ranks' gradients in the SGD's flat gradient buffer, and every rank takes the
same step, so the weights stay identical. Batch norm is synchronized (``SyncBatchNorm2d``).

``world()`` is the communicator of this process: the MPI world when it runs as one of several
ranks (under ``mpiexec``, or launched by ``--workers``), else ``SingleProcess``, a stand-in of
size 1 whose every operation does nothing, so training code has one path. ``simulate`` runs N
ranks as threads of one process (``SimulatedRank``), for a notebook or a test without MPI.
``launch`` re-runs a
command as N ranks through the ``mpiexec`` that the ``mpich`` wheel puts next to
``sys.executable`` (``pip install -e ".[parallel]"``), each rank with one BLAS thread.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import zlib

import numpy as np

from .backend import to_device, to_numpy

RANK_ENV = "MINIFPN_RANK_OF"  # set by ``launch``: a rank never launches again
PID_DIR_ENV = "MINIFPN_RANK_PIDS"  # where each rank writes its pid, to name a lost rank
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MPI_SIZE_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")  # MPICH, Open MPI, Intel
LOCAL_RANK_ENV = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK")  # a rank's index on its host


class SingleProcess:
    """The communicator of a run in one process: rank 0 of 1; every collective is the identity."""

    rank, size = 0, 1

    def allreduce_(self, a):
        """Sum ``a`` (any shape, host or device) over the ranks, in place; returns ``a``."""
        return a

    def allgather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
        return [obj]

    def bcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        return obj

    def abort(self, code: int) -> None:
        """Stop every rank with exit status ``code``."""
        sys.exit(code)


class MPIComm(SingleProcess):
    """mpi4py's COMM_WORLD behind the ``SingleProcess`` interface. A device (CuPy) array goes
    through the host, since the wheel's MPI is not CUDA-aware (docs/performance.md)."""

    def __init__(self):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def allreduce_(self, a):
        host = a if isinstance(a, np.ndarray) else to_numpy(a)
        self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
        if host is not a:
            a[...] = to_device(host, "cupy")
        return a

    def allgather(self, obj) -> list:
        return self.comm.allgather(obj)

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def abort(self, code: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


class SimulatedRank(SingleProcess):
    """Rank ``rank`` of ``size`` ranks simulated by threads of one process (``simulate``): each
    collective posts this rank's part on a shared board and meets the others at a barrier. The
    sum runs in rank order, so every rank gets the same bits, as from MPI."""

    def __init__(self, rank: int, size: int, board: list, barrier: threading.Barrier):
        self.rank, self.size, self._board, self._barrier = rank, size, board, barrier

    def _exchange(self, obj) -> list:
        self._board[self.rank] = obj
        self._barrier.wait()
        parts = list(self._board)
        self._barrier.wait()  # every rank has read the board before the next collective writes it
        return parts

    def allreduce_(self, a):
        parts = self._exchange(a.copy())
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        a[...] = total
        return a

    def allgather(self, obj) -> list:
        return self._exchange(obj)

    def bcast(self, obj):
        return self._exchange(obj)[0]

    def abort(self, code: int) -> None:
        self._barrier.abort()  # the other ranks' waits fail at once: no hang
        raise SystemExit(code)


def simulate(size: int, fn) -> list:
    """[fn(comm) of rank 0, of rank 1, ...]: ``size`` ranks run as threads of this process, each
    with its ``SimulatedRank`` communicator. An exception in one rank stops them all and is raised."""
    board, barrier = [None] * size, threading.Barrier(size)
    results, errors = [None] * size, [None] * size

    def run(rank):
        try:
            results[rank] = fn(SimulatedRank(rank, size, board, barrier))
        except BaseException as e:  # noqa: BLE001 (re-raised below, in the caller's thread)
            errors[rank] = e
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)),
                 next((e for e in errors if e is not None), None))
    if first is not None:
        raise first
    return results


_WORLD = None


def mpi_size_from_env() -> int:
    """The number of ranks an MPI launcher started this process among (1 outside one)."""
    for name in MPI_SIZE_ENV:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def world():
    """This process's communicator: ``MPIComm`` among several ranks, else ``SingleProcess``. A rank
    other than 0 ignores Ctrl-C: rank 0 alone stops the run (it keeps the last step, then aborts
    the others)."""
    global _WORLD
    if _WORLD is None:
        _WORLD = MPIComm() if mpi_size_from_env() > 1 else SingleProcess()
        if _WORLD.rank > 0:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if _WORLD.size > 1 and os.environ.get(PID_DIR_ENV):
            with open(os.path.join(os.environ[PID_DIR_ENV], f"{os.getpid()}.rank"), "w") as f:
                f.write(str(_WORLD.rank))
    return _WORLD


def local_rank(comm) -> int:
    """This rank's index among the ranks of its host (MPICH's or Open MPI's variable), else its
    rank in the world (one host)."""
    for name in LOCAL_RANK_ENV:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return comm.rank


def use_device_of_rank(comm) -> int:
    """One GPU per rank, on the CuPy backend: rank r of a host uses device r % (GPUs on the host)
    from here on (``cupy.cuda.Device(n).use()``), before any array is made. Returns n."""
    from .backend import get_backend
    cp = get_backend("cupy")
    device = local_rank(comm) % cp.cuda.runtime.getDeviceCount()
    cp.cuda.Device(device).use()
    return device


def mpi_available() -> bool:
    """Whether mpi4py and an mpiexec next to this Python are installed (the ``parallel`` extra)."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return mpiexec() is not None


def mpiexec() -> str | None:
    """The mpiexec of the mpich wheel, next to ``sys.executable`` (else one on PATH)."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.exists(here):
        return here
    from shutil import which
    return which("mpiexec")


def physical_cores() -> int:
    """Physical CPU cores (threadpoolctl's count falls back to logical ones)."""
    try:
        with open("/proc/cpuinfo") as f:
            pairs = set(re.findall(r"physical id\s*:\s*(\d+)[\s\S]*?core id\s*:\s*(\d+)", f.read()))
        if pairs:
            return len(pairs)
    except OSError:
        pass
    return os.cpu_count() or 1


def default_workers() -> tuple[int, str]:
    """(workers, the line that says why): the physical cores where MPI is installed, else 1."""
    if not mpi_available():
        return 1, "--workers 1: one process (mpi4py is not installed: pip install -e \".[parallel]\")"
    n = physical_cores()
    return n, f"--workers {n}: one rank per physical core (--workers 1 for one process)"


def split(total: int, size: int, rank: int) -> tuple[int, int]:
    """(start, stop) of rank ``rank``'s part of ``total`` items: contiguous, in order, sizes
    differing by at most one, so the parts' union is range(total)."""
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def checksum(arrays) -> int:
    """CRC-32 of the bytes of host or device ``arrays``: equal on every rank iff bit-identical."""
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(to_numpy(a)).tobytes(), crc)
    return crc


def synchronize_batch_norm(module, comm):
    """Replace every ``BatchNorm2d`` under ``module`` by a ``SyncBatchNorm2d`` over ``comm`` that
    shares its arrays (frozen batch norm needs no communication and stays). Returns ``module``."""
    from .nn import BatchNorm2d, SyncBatchNorm2d
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is BatchNorm2d:
                setattr(parent, name, SyncBatchNorm2d.from_batch_norm(child, comm))
    return module


# ---- the launcher: one command, N ranks ---------------------------------------------------------

def launch(workers: int, argv: list, module: str = "minifpn.cli") -> int:
    """Run ``python -m module *argv`` as ``workers`` MPI ranks and return their exit status.

    mpiexec runs in its own session, so a Ctrl-C reaches this process alone, which hands ONE
    SIGINT to mpiexec (a second would make it kill the ranks at once); mpiexec passes it to the
    ranks, where rank 0 keeps the last step. If a rank dies, mpiexec stops the others; its
    report is replaced by one line naming the lost rank."""
    with tempfile.TemporaryDirectory(prefix="minifpn-ranks-") as pids:
        env = {**os.environ, **ONE_THREAD, RANK_ENV: str(workers), PID_DIR_ENV: pids}
        command = [mpiexec(), "-n", str(workers), sys.executable, "-m", module, *argv]
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True, bufsize=1,
                                start_new_session=True)
        report = _relay(proc)
        code = proc.wait()
        if report:
            print(lost_rank_line(report, pids, code), file=sys.stderr)
    return code


def _relay(proc) -> list:
    """Copy the ranks' stdout through until mpiexec reports a bad termination (a line of =====);
    returns that report's lines, held back. A Ctrl-C here sends mpiexec one SIGINT and goes on."""
    report = []
    while True:
        try:
            line = proc.stdout.readline()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            continue
        if not line:
            return report
        if report or line.startswith("=" * 20):
            report.append(line.rstrip())
        else:
            sys.stdout.write(line)
            sys.stdout.flush()


def lost_rank_line(report: list, pid_dir: str, code: int) -> str:
    """One line from mpiexec's report of a rank that ended badly: which rank, how."""
    text = "\n".join(report)
    pid = re.search(r"PID (\d+)", text)
    exit_code = re.search(r"EXIT CODE: (\d+)", text)
    rank = "?"
    if pid and os.path.exists(os.path.join(pid_dir, f"{pid.group(1)}.rank")):
        with open(os.path.join(pid_dir, f"{pid.group(1)}.rank")) as f:
            rank = f.read().strip()
    how = f"exit code {exit_code.group(1)}" if exit_code else f"status {code}"
    if exit_code and int(exit_code.group(1)) in (9, 15):
        how = f"killed by signal {exit_code.group(1)}"
    return (f"minifpn: rank {rank} (pid {pid.group(1) if pid else '?'}) was lost ({how}); the other "
            f"ranks were stopped; the checkpoint on disk is the last one written whole")


def run_rank(main, argv) -> int:
    """A rank's entry: ``main(argv)``; a rank that fails (an exception or a non-zero status)
    aborts every rank, so that none waits forever in a collective."""
    comm = world()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    if code and comm.size > 1:
        comm.abort(code)
    return code or 0
