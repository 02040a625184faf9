"""minifpn.timing, notebook 01's timing: the two ways of doing a convolution's products give the
same numbers, and the timers return what they say (no speed is asserted)."""
import time

import numpy as np

import minifpn.functional as F
from minifpn import timing


def test_best_of_times_every_call_and_keeps_the_shortest():
    pauses = iter([0.03, 0.0, 0.02])
    best = timing.best_of(lambda: time.sleep(next(pauses)), repeats=3)
    assert best < 0.015


def test_conv_time_split_reports_the_copy_the_product_and_the_conv():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)  # (N, C, H, W)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)  # (OC, C, K, K)
    split = timing.conv_time_split(x, w, stride=2, padding=1, repeats=2)
    oh, ow = F.conv_output_size(6, 3, 2, 1), F.conv_output_size(5, 3, 2, 1)
    assert split["col_bytes"] == 3 * 9 * 2 * oh * ow * 4
    assert split["flops"] == 2 * 4 * 3 * 9 * 2 * oh * ow
    assert all(split[k] > 0 for k in ("im2col", "gemm", "conv2d"))


def test_batch_and_per_image_products_agree_with_conv2d():
    rng = np.random.default_rng(1)
    n, c, oc, h = 3, 2, 5, 4
    x = rng.standard_normal((n, c, h, h))  # float64: the two ways differ only in rounding
    w = rng.standard_normal((oc, c, 3, 3))
    dout = rng.standard_normal((n, oc, h, h))
    col = F.im2col(x, 3, 1, 1).reshape(c * 9, n * h * h)  # (K, N*L)
    products = timing.batch_and_per_image_products(col, w.reshape(oc, -1), dout.reshape(n, oc, -1))
    out, cache = F.conv2d(x, w, None, stride=1, padding=1)
    dx, dw, _ = F.conv2d_backward(dout, cache)
    for label, (forward, backward) in products.items():
        np.testing.assert_allclose(forward().reshape(out.shape), out, rtol=1e-12, atol=1e-12, err_msg=label)
        dweight, dcol = backward()
        np.testing.assert_allclose(dweight.reshape(w.shape), dw, rtol=1e-12, atol=1e-12, err_msg=label)
        if label == "per image":  # (N, K, L) -> (K, N*L), the layout col2im reads
            dcol = dcol.transpose(1, 0, 2).reshape(c * 9, -1)
        got = F.col2im(dcol.reshape(c, 3, 3, n, h, h), x.shape, 1, 1)
        np.testing.assert_allclose(got, dx, rtol=1e-12, atol=1e-12, err_msg=label)
    times = timing.time_products(products, repeats=2)
    assert list(times) == ["whole batch", "per image"]
    assert all(len(t) == 2 and min(t) > 0 for t in times.values())
