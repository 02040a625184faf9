"""The data-parallel step's communication: one all-reduce of the demo detector's flat gradient
(510,429 float32 values, 2.04 MB) and one of a SyncBN statistics buffer (2C + 1 = 257 values).

    .venv/bin/mpiexec -n 2 python benchmarks/bench_allreduce.py   (the ``parallel`` extra)

Each all-reduce follows a barrier, so that it times the reduction, not the ranks' skew; rank 0
prints the median.
"""
import statistics
import time

import numpy as np
from mpi4py import MPI

from minifpn.models.detector import Detector, DetectorConfig


def main():
    comm = MPI.COMM_WORLD
    gradient = sum(p.data.size for _, p in Detector(DetectorConfig()).named_trainable_parameters())
    for what, n, reps in (("flat gradient", gradient, 50), ("SyncBN statistics, C = 128", 2 * 128 + 1, 1000)):
        a, times = np.ones(n, np.float32), []
        for _ in range(reps):
            comm.Barrier()
            start = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
            times.append(time.perf_counter() - start)
        if comm.rank == 0:
            print(f"{what}: {n:,} float32 ({4 * n / 1e6:.3f} MB) over {comm.size} ranks: median of "
                  f"{reps} {statistics.median(times) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
