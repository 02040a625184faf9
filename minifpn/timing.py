"""Where a convolution's time goes, for notebook 01: the im2col copy against the GEMM, and one
product for the whole batch against one product per image.

Host-only (NumPy arrays): the times are wall-clock seconds of one call, the best of ``repeats``
(the least disturbed by other work on the machine). They depend on the machine and on its BLAS
threads; nothing here asserts a speed.
"""
from __future__ import annotations

import time

import numpy as np

from . import functional as F


def best_of(f, repeats: int = 5) -> float:
    """The shortest of ``repeats`` timed calls of ``f()``, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def conv_time_split(x, weight, stride: int = 1, padding: int = 1, repeats: int = 5) -> dict:
    """One ``F.conv2d`` (no bias) timed whole and in its two parts.

    x: (N, C, H, W); weight: (OC, C, K, K), a square kernel.
    Returns {"im2col": s, "gemm": s, "conv2d": s, "col_bytes": int, "flops": int}: the seconds of
    ``F.im2col`` (the copy), of the product ``W_mat @ col`` with ``W_mat`` (OC, C*K*K) and
    ``col`` (C*K*K, N*OH*OW), and of ``F.conv2d``; the size of ``col`` and the product's FLOPs,
    2 * OC * C*K*K * N*OH*OW. A first ``F.conv2d`` call warms up before anything is timed.
    """
    oc, _, k, _ = weight.shape
    F.conv2d(x, weight, None, stride=stride, padding=padding)  # warm-up
    col = F.im2col(x, k, stride, padding)  # (C, K, K, N, OH, OW)
    col = col.reshape(-1, int(np.prod(col.shape[3:])))  # (C*K*K, N*OH*OW)
    w_mat = weight.reshape(oc, -1)  # (OC, C*K*K)
    return {
        "im2col": best_of(lambda: F.im2col(x, k, stride, padding), repeats),
        "gemm": best_of(lambda: w_mat @ col, repeats),
        "conv2d": best_of(lambda: F.conv2d(x, weight, None, stride=stride, padding=padding), repeats),
        "col_bytes": col.nbytes,
        "flops": 2 * oc * col.shape[0] * col.shape[1],
    }


def batch_and_per_image_products(col, w_mat, dout) -> dict:
    """The forward and backward GEMMs of one convolution, done for the whole batch and per image.

    col: (K, N*L) the im2col columns, image n's L = OH*OW columns at n*L .. (n+1)*L - 1;
    w_mat: (OC, K) the flattened filters; dout: (N, OC, L) the upstream gradient.
    Returns {"whole batch": (forward, backward), "per image": (forward, backward)}, functions of
    no argument that compute the same numbers in two ways:
      forward() -> out (N, OC, L). Whole batch: one (OC, K) @ (K, N*L), then the (OC, N) -> (N, OC)
        transpose; per image: N products (OC, K) @ (K, L).
      backward() -> (dweight (OC, K), dcol). Whole batch: dweight = dout_mat @ col.T, one
        (OC, N*L) @ (N*L, K) whose inner dimension sums over the images, and dcol = W_mat.T @
        dout_mat, (K, N*L); per image: N products each, an (N, OC, K) stack summed over n, and
        dcol (N, K, L).
    """
    n, oc, length = dout.shape
    col_n = np.ascontiguousarray(col.reshape(-1, n, length).transpose(1, 0, 2))  # (N, K, L)

    def batch_forward():
        return np.ascontiguousarray((w_mat @ col).reshape(oc, n, length).transpose(1, 0, 2))

    def per_image_forward():
        return np.matmul(w_mat, col_n)

    def batch_backward():
        dout_mat = dout.transpose(1, 0, 2).reshape(oc, n * length)  # (OC, N*L)
        return dout_mat @ col.T, w_mat.T @ dout_mat

    def per_image_backward():
        return np.matmul(dout, col_n.transpose(0, 2, 1)).sum(axis=0), np.matmul(w_mat.T, dout)

    return {"whole batch": (batch_forward, batch_backward),
            "per image": (per_image_forward, per_image_backward)}


def time_products(products: dict, repeats: int = 5) -> dict:
    """{label: (forward seconds, backward seconds)} for ``batch_and_per_image_products``' output,
    each the best of ``repeats`` calls."""
    return {label: (best_of(forward, repeats), best_of(backward, repeats))
            for label, (forward, backward) in products.items()}
