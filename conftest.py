"""Test-session settings shared by tests/ and notebooks/.

`pytest -n 2` runs two worker processes on a 2-core machine; each BLAS may start one thread
per core, and four busy threads on two cores run several times slower than two. So each worker,
and each notebook kernel it starts (which inherits the environment), uses one BLAS thread.
"""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=1)  # in case NumPy was imported before this file
    except ImportError:
        pass

# `minifpn train` and `demo` default to one MPI rank per physical core where mpi4py is installed;
# the tests run them in their own process unless a test asks for --workers itself.
os.environ.setdefault("MINIFPN_WORKERS", "1")
