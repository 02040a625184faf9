"""Run under ``mpiexec -n 2``: SyncBatchNorm over 2 ranks (3 + 2 images) against batch norm over the
concatenated batch, float64. Rank 0 prints one JSON line of the largest differences."""
import json

import numpy as np

from minifpn import functional as F
from minifpn.parallel import split, world

comm = world()
rng = np.random.default_rng(0)
N, C, H, W = 5, 3, 4, 6
x = rng.normal(2.0, 3.0, (N, C, H, W))
dout = rng.normal(size=(N, C, H, W))
gamma, beta = rng.normal(size=C), rng.normal(size=C)
rm, rv = rng.normal(size=C), rng.random(C) + 0.5

y_ref, cache = F.batch_norm(x, gamma, beta, rm.copy(), rv.copy(), True)
rm_ref, rv_ref = rm.copy(), rv.copy()
F.batch_norm(x, gamma, beta, rm_ref, rv_ref, True)
dx_ref, dgamma_ref, dbeta_ref = F.batch_norm_backward(dout, cache)

start, stop = split(N, comm.size, comm.rank)
rm_sync, rv_sync = rm.copy(), rv.copy()
y, sync_cache = F.sync_batch_norm(x[start:stop], gamma, beta, rm_sync, rv_sync, comm)
dx, dgamma, dbeta = F.sync_batch_norm_backward(dout[start:stop], sync_cache)
dgamma, dbeta = comm.allreduce_(dgamma.copy()), comm.allreduce_(dbeta.copy())  # as the SGD's all-reduce
y_all = np.concatenate(comm.allgather(y))
dx_all = np.concatenate(comm.allgather(dx))


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


if comm.rank == 0:
    print(json.dumps({"size": comm.size, "y": rel(y_all, y_ref), "dx": rel(dx_all, dx_ref),
                      "dgamma": rel(dgamma, dgamma_ref), "dbeta": rel(dbeta, dbeta_ref),
                      "running_mean": rel(rm_sync, rm_ref), "running_var": rel(rv_sync, rv_ref)}))
