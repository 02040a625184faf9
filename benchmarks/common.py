"""Shared benchmark helpers: thread control, the BLAS report, interleaved timing and ratios."""
from __future__ import annotations

import os
import statistics
import time

import numpy as np


def setup_threads(threads: int):
    """Pin NumPy's BLAS and PyTorch to ``threads`` threads, and keep freed memory for reuse
    (as the minifpn command does); return (limiter, torch or None)."""
    from threadpoolctl import threadpool_limits

    from minifpn.backend import reuse_freed_memory
    reuse_freed_memory()
    limiter = threadpool_limits(limits=threads)
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    return limiter, torch


def blas_report(threads: int) -> str:
    """Which BLAS NumPy runs, with how many threads, and the OPENBLAS_CORETYPE warning."""
    from threadpoolctl import threadpool_info
    lines = []
    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            lines.append(f"NumPy BLAS: {pool.get('internal_api')} {pool.get('version')} "
                         f"({pool.get('architecture')}), {pool.get('num_threads')} threads")
    if not lines:
        lines.append("NumPy BLAS: not reported by threadpoolctl")
    if os.environ.get("OPENBLAS_CORETYPE"):
        lines.append(f"WARNING: OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} is set; "
                     "OpenBLAS then runs at about half speed on these machines. Unset it for "
                     "a benchmark run: `env -u OPENBLAS_CORETYPE python benchmarks/...`.")
    lines.append(f"threads: {threads} (NumPy BLAS and torch.set_num_threads); freed memory is "
                 f"kept for reuse (minifpn.backend.reuse_freed_memory)")
    return "\n".join(lines)


def interleaved(fns: dict, samples: int = 5, warmup: int = 1, min_time: float = 0.2,
                pause: float = 0.3) -> dict:
    """{name: [seconds per call, one per sample]} for each function of ``fns``. Within a sample
    the functions take turns (each repeated until ``min_time`` passes), so a burst of load on a
    shared machine falls on all of them alike instead of on whichever ran during it. Before each
    turn the process sleeps ``pause`` seconds: OpenBLAS's and PyTorch's worker threads keep
    spinning for a while after their last call, and would otherwise take a core from the other
    library's next turn (measured: a 2x slower PyTorch conv right after one of ours)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(samples):
        for name, fn in fns.items():
            time.sleep(pause)
            n, start = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_time:
                    break
            times[name].append(elapsed / n)
    return times


def ratio_summary(ours: list, theirs: list) -> tuple[float, str]:
    """Median of the per-sample ratios ours/theirs, and their spread as "min-max"."""
    ratios = sorted(a / b for a, b in zip(ours, theirs))
    return statistics.median(ratios), f"{ratios[0]:.2f}-{ratios[-1]:.2f}"


def ratio_cell(times: dict, which: str) -> str:
    """"median (min-max)" of ours/torch for ``times["ours_" + which]`` against
    ``times["torch_" + which]``, or "-" when PyTorch was not timed."""
    if f"torch_{which}" not in times:
        return "-"
    median, spread = ratio_summary(times[f"ours_{which}"], times[f"torch_{which}"])
    return f"{median:.2f} ({spread})"


def table(rows, header) -> str:
    rows = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    out = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def rng_array(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)
