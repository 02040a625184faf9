"""RoIAlign: forward and hand-written backward against torchvision.ops.roi_align (autograd), the
loop reference, the adjoint identity and central differences, on every backend; bad input.

Tolerances: float64 agrees with torchvision to 1e-12 (the order of a few additions differs);
float32 to torch_helpers' rtol 1e-4, atol 1e-5 (measured: about 1e-6).
"""
import numpy as np
import pytest

from minifpn import functional as F
from minifpn.backend import BackendError, to_device, to_numpy
from minifpn.gradcheck import check

TOL = 1e-6  # gradient check, as every functional op's
TOLERANCES = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}


def torchvision_ops():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: parity tests need it "
                                "(pip install -e .[parity])")
    ops = pytest.importorskip("torchvision.ops", reason="torchvision is not installed: parity "
                              "tests need it (pip install -e .[parity])")
    return torch, ops


def awkward_boxes(rng, N: int, H: int, W: int, scale: float, count: int = 12):
    """(R, 5) boxes in image pixels for maps of H x W cells at ``scale``: random ones over and
    beyond the map, plus the awkward cases: partly outside (every side), fully outside, tiny,
    zero-width, zero-height, a point, inverted (x2 < x1), and one covering the whole map."""
    h, w = H / scale, W / scale  # the map's extent in image pixels
    xy = rng.uniform(-0.3, 1.1, (count, 2)) * (w, h)
    wh = rng.uniform(0.0, 0.8, (count, 2)) * (w, h)
    random = np.concatenate([xy, xy + wh], axis=1)
    special = np.array([
        [-0.4 * w, -0.2 * h, 0.3 * w, 0.5 * h],     # partly outside, top left
        [0.6 * w, 0.7 * h, 1.4 * w, 1.3 * h],       # partly outside, bottom right
        [1.2 * w, 0.1 * h, 1.5 * w, 0.4 * h],       # fully outside
        [-3.0 / scale, -3.0 / scale, -1.5 / scale, 0.5 * h],  # left of the map by more than a cell
        [0.41 * w, 0.37 * h, 0.41 * w + 0.3, 0.37 * h + 0.2],  # tiny: a fraction of a pixel
        [0.5 * w, 0.2 * h, 0.5 * w, 0.6 * h],       # zero width
        [0.1 * w, 0.3 * h, 0.7 * w, 0.3 * h],       # zero height
        [0.33 * w, 0.66 * h, 0.33 * w, 0.66 * h],   # a point
        [0.7 * w, 0.6 * h, 0.2 * w, 0.1 * h],       # inverted
        [0.0, 0.0, w, h],                            # the whole map
    ])
    coords = np.concatenate([random, special])
    index = rng.integers(0, N, (len(coords), 1))
    index[:N, 0] = np.arange(N)  # every image has at least one RoI
    return np.concatenate([index, coords], axis=1)


CASES = [(aligned, ratio, scale) for aligned in (True, False) for ratio in (-1, 1, 2)
         for scale in (1.0, 0.5, 0.25)]


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("aligned,sampling_ratio,spatial_scale", CASES)
def test_forward_and_backward_equal_torchvision(dtype, aligned, sampling_ratio, spatial_scale):
    torch, ops = torchvision_ops()
    rng = np.random.default_rng(7)
    N, C, H, W, size = 3, 4, 9, 11, (3, 5)  # a non-square output from a non-square map
    features = rng.standard_normal((N, C, H, W)).astype(dtype)
    boxes = awkward_boxes(rng, N, H, W, spatial_scale).astype(dtype)
    out, cache = F.roi_align(features, boxes, size, spatial_scale, sampling_ratio, aligned)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dfeatures = F.roi_align_backward(dout, cache)

    x = torch.tensor(features, requires_grad=True)
    theirs = ops.roi_align(x, torch.tensor(boxes), size, spatial_scale, sampling_ratio, aligned)
    theirs.backward(torch.tensor(dout))
    assert out.shape == (len(boxes), C, 3, 5) and out.dtype == dtype
    assert dfeatures.shape == features.shape and dfeatures.dtype == dtype
    np.testing.assert_allclose(out, theirs.detach().numpy(), err_msg="out", **TOLERANCES[dtype])
    np.testing.assert_allclose(dfeatures, x.grad.numpy(), err_msg="dfeatures", **TOLERANCES[dtype])
    assert np.abs(out).max() > 0.1 and np.abs(dfeatures).max() > 0.1  # not a vacuous match


@pytest.mark.torch
def test_a_large_adaptive_batch_equals_torchvision():
    """Grids from 1 x 1 to about 7 x 7 in one call: the padding to the largest is invisible."""
    torch, ops = torchvision_ops()
    rng = np.random.default_rng(3)
    features = rng.standard_normal((4, 8, 32, 32)).astype(np.float32)
    xy = rng.uniform(0, 100, (200, 2))
    wh = np.exp(rng.uniform(np.log(2), np.log(200), (200, 2)))
    boxes = np.concatenate([rng.integers(0, 4, (200, 1)), xy, xy + wh], 1).astype(np.float32)
    out, cache = F.roi_align(features, boxes, 7, 0.25, -1, True)
    assert cache[2][0].shape[2] >= 6  # GH: some RoI needs a large grid
    dout = rng.standard_normal(out.shape).astype(np.float32)
    x = torch.tensor(features, requires_grad=True)
    theirs = ops.roi_align(x, torch.tensor(boxes), 7, 0.25, -1, True)
    theirs.backward(torch.tensor(dout))
    np.testing.assert_allclose(out, theirs.detach().numpy(), **TOLERANCES[np.float32])
    np.testing.assert_allclose(F.roi_align_backward(dout, cache), x.grad.numpy(),
                               **TOLERANCES[np.float32])


@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_many_rois_of_every_size_equal_torchvision(dtype, sampling_ratio):
    """300 RoIs in random order, sides from half a pixel to beyond the map, and duplicates: they
    are sorted by window size into several chunks of F.roi_align's CHUNK, each with its own
    window, and the windows of one image overlap (the backward's sums)."""
    from minifpn.functional.roi_align import CHUNK
    torch, ops = torchvision_ops()
    rng = np.random.default_rng(11)
    features = rng.standard_normal((3, 5, 24, 20)).astype(dtype)
    side = np.exp(rng.uniform(np.log(0.5), np.log(150.0), (300, 2)))
    xy = rng.uniform(-20, 90, (300, 2))
    boxes = np.concatenate([rng.integers(0, 3, (300, 1)), xy, xy + side], 1)
    boxes[250:] = boxes[:50]  # the same RoI twice: the same cells, twice the gradient
    boxes = boxes.astype(dtype)
    out, cache = F.roi_align(features, boxes, 7, 0.25, sampling_ratio, True)
    windows = [cells.shape[1:] for *_, cells in cache[4]]
    assert len(windows) == -(-300 // CHUNK) and windows[0] < windows[-1]  # each chunk its own size
    dout = rng.standard_normal(out.shape).astype(dtype)
    x = torch.tensor(features, requires_grad=True)
    theirs = ops.roi_align(x, torch.tensor(boxes), 7, 0.25, sampling_ratio, True)
    theirs.backward(torch.tensor(dout))
    np.testing.assert_allclose(out, theirs.detach().numpy(), err_msg="out", **TOLERANCES[dtype])
    np.testing.assert_allclose(F.roi_align_backward(dout, cache), x.grad.numpy(), err_msg="dfeatures",
                               **TOLERANCES[dtype])


# ---- every backend: the loop reference, the adjoint, central differences -------------------

@pytest.mark.parametrize("aligned,sampling_ratio,spatial_scale", CASES[::2])
def test_equals_the_loop_reference(aligned, sampling_ratio, spatial_scale, make, rng):
    features = rng.standard_normal((2, 3, 7, 6))
    boxes = awkward_boxes(rng, 2, 7, 6, spatial_scale, count=4)
    out, _ = F.roi_align(make(features), make(boxes), (2, 3), spatial_scale, sampling_ratio, aligned)
    slow = F.roi_align_simple(make(features), make(boxes), (2, 3), spatial_scale, sampling_ratio,
                              aligned)
    np.testing.assert_allclose(to_numpy(out), to_numpy(slow), rtol=1e-12, atol=1e-12)
    assert np.abs(to_numpy(out)).max() > 0.1


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_backward_is_the_adjoint_of_forward(sampling_ratio, make, rng):
    """<roi_align(f), g> = <f, roi_align_backward(g)>: forward is linear in f for fixed boxes."""
    features = make(rng.standard_normal((2, 3, 8, 8)))
    boxes = make(awkward_boxes(rng, 2, 8, 8, 0.5, count=6))
    out, cache = F.roi_align(features, boxes, 3, 0.5, sampling_ratio)
    g = make(rng.standard_normal(out.shape))
    lhs = float((out * g).sum())
    rhs = float((features * F.roi_align_backward(g, cache)).sum())
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs)), (lhs, rhs)


@pytest.mark.parametrize("aligned,sampling_ratio", [(True, -1), (True, 2), (False, -1), (False, 1)])
def test_gradient_check(aligned, sampling_ratio, make, rng):
    """For fixed boxes the output is linear in the features: the bilinear weights depend on the
    boxes only. So central differences have no kink to straddle, wherever the samples fall
    (bilinear sampling is piecewise linear in the *coordinates*, which get no gradient), and
    the difference is exact up to rounding: TOL = 1e-6 is generous."""
    state = {}
    boxes = make(awkward_boxes(rng, 2, 5, 6, 0.5, count=3))

    def forward(features):
        out, state["cache"] = F.roi_align(features, boxes, (2, 3), 0.5, sampling_ratio, aligned)
        return out

    inputs = {"features": make(rng.standard_normal((2, 3, 5, 6)))}
    result = check("roi_align", "", forward,
                   lambda d: {"features": F.roi_align_backward(d, state["cache"])}, inputs, tol=TOL)
    assert result.max_error < TOL, result.errors


def test_a_bin_is_the_mean_of_bilinear_samples(make):
    """By hand: aligned, one bin over cells 0..2 x 0..2 of a ramp f[y, x] = 10 y + x. The box
    (0.5, 0.5)-(2.5, 2.5) is (0, 0)-(2, 2) after the -0.5 shift; 2 x 2 samples at 0.5 and 1.5
    read the ramp exactly (bilinear is exact on a linear function): mean 10 + 1 = 11."""
    ramp = (10 * np.arange(4)[:, None] + np.arange(4)[None, :]).astype(np.float64)
    features = make(ramp[None, None])
    out, cache = F.roi_align(features, make(np.array([[0, 0.5, 0.5, 2.5, 2.5]])), 1, 1.0, 2)
    assert to_numpy(out).ravel().tolist() == [11.0]
    grad = to_numpy(F.roi_align_backward(make(np.ones((1, 1, 1, 1))), cache))[0, 0]
    # each sample spreads 1/4 over its 4 neighbours, 1/4 each: the 3 x 3 cells 0..2 get
    # 1/16 x (1, 2, 1) outer (1, 2, 1)
    expected = np.zeros((4, 4))
    expected[:3, :3] = np.outer([1, 2, 1], [1, 2, 1]) / 16
    np.testing.assert_allclose(grad, expected, rtol=0, atol=1e-15)


def test_samples_beyond_one_cell_outside_read_zero_and_the_edge_is_clamped(make):
    """A sample at y in [-1, 0] reads row 0 (clamped); at y < -1 it reads nothing (0)."""
    features = make(np.ones((1, 1, 4, 4)))
    inside_edge = [0, 1.0, -1.0, 3.0, 0.0]   # x: 1..3, y: -1..0 -> samples at y = -0.75, -0.25
    beyond = [0, 1.0, -4.0, 3.0, -2.0]       # y: -4..-2 -> every sample below -1
    out, cache = F.roi_align(features, make(np.array([inside_edge, beyond])), 1, 1.0, 2, False)
    np.testing.assert_array_equal(to_numpy(out).ravel(), [1.0, 0.0])
    grad = to_numpy(F.roi_align_backward(make(np.ones((2, 1, 1, 1))), cache))[0, 0]
    assert grad[0].sum() == pytest.approx(1.0) and not grad[1:].any()  # all on row 0


def test_an_rois_window_and_chunk_do_not_change_its_value(make, rng):
    """An RoI pooled among CHUNK + 1 others, most of them larger (a larger window, another
    chunk), equals the RoI pooled alone; its gradient lands on its own window's cells only."""
    from minifpn.functional.roi_align import CHUNK
    features = make(rng.standard_normal((2, 3, 16, 16)))
    small = np.array([[1, 21.0, 30.0, 27.0, 33.0]])  # 6 x 3 px at scale 1/4: about 2 x 1 cells
    xy = rng.uniform(0, 20, (CHUNK + 1, 2))
    large = np.concatenate([np.zeros((CHUNK + 1, 1)), xy, xy + 40.0], 1)  # 10 x 10 cells, image 0
    together, cache = F.roi_align(features, make(np.concatenate([large, small])), 3, 0.25, 2)
    alone, cache_alone = F.roi_align(features, make(small), 3, 0.25, 2)
    np.testing.assert_allclose(to_numpy(together)[-1], to_numpy(alone)[0], rtol=0, atol=1e-15)
    # aligned, in cells: y from 7.0 to 7.75 (rows 7..8), x from 4.75 to 6.25 (columns 4..7)
    assert [cells.shape[1:] for *_, cells in cache_alone[4]] == [(2, 4)]
    dout = np.zeros(to_numpy(together).shape)
    dout[-1] = 1.0
    grad = to_numpy(F.roi_align_backward(make(dout), cache))
    assert not grad[0].any() and grad[1].sum() == pytest.approx(3 * 3 * 3)  # all of it, on image 1
    outside = np.ones((16, 16), dtype=bool)
    outside[7:9, 4:8] = False
    assert not grad[1][:, outside].any()
    np.testing.assert_allclose(grad, to_numpy(F.roi_align_backward(make(dout[-1:]), cache_alone)),
                               rtol=0, atol=1e-15)


def test_the_padding_of_an_adaptive_grid_is_invisible(make, rng):
    """Each RoI pooled together with a much larger one (a bigger padded grid) = pooled alone."""
    features = make(rng.standard_normal((2, 3, 16, 16)))
    small = np.array([[1, 2.0, 3.0, 5.0, 4.5]])
    large = np.array([[0, 0.0, 0.0, 60.0, 50.0]])
    together, cache = F.roi_align(features, make(np.concatenate([small, large])), 2, 0.25, -1)
    assert cache[2][0].shape[2] == 7  # GH = ceil(50 * 0.25 / 2): the small RoI needs 1
    for row, box in enumerate((small, large)):
        alone, _ = F.roi_align(features, make(box), 2, 0.25, -1)
        np.testing.assert_allclose(to_numpy(together)[row], to_numpy(alone)[0], rtol=0, atol=1e-15)


def test_no_boxes(make):
    features = make(np.ones((2, 3, 5, 5), dtype=np.float32))
    out, cache = F.roi_align(features, make(np.zeros((0, 5), dtype=np.float32)), (2, 4))
    assert out.shape == (0, 3, 2, 4) and out.dtype == np.float32
    dfeatures = F.roi_align_backward(make(np.zeros((0, 3, 2, 4), dtype=np.float32)), cache)
    assert dfeatures.shape == (2, 3, 5, 5) and not to_numpy(dfeatures).any()


def test_numpy_and_the_device_agree_bit_for_bit(backend, rng):
    features = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    boxes = awkward_boxes(rng, 2, 9, 9, 0.5).astype(np.float32)
    out, cache = F.roi_align(features, boxes, 3, 0.5)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    out_b, cache_b = F.roi_align(to_device(features, backend), to_device(boxes, backend), 3, 0.5)
    np.testing.assert_array_equal(to_numpy(out_b), out)
    dfeatures = F.roi_align_backward(to_device(dout, backend), cache_b)
    np.testing.assert_array_equal(to_numpy(dfeatures), F.roi_align_backward(dout, cache))


def test_backward_leaves_dout_alone(make, rng):
    features = make(rng.standard_normal((1, 2, 6, 6)))
    out, cache = F.roi_align(features, make(np.array([[0, 1.0, 1.0, 5.0, 4.0]])), 2)
    dout = make(rng.standard_normal(out.shape))
    before = to_numpy(dout).copy()
    F.roi_align_backward(dout, cache)
    np.testing.assert_array_equal(to_numpy(dout), before)


# ---- bad input --------------------------------------------------------------------------------

GOOD_FEATURES = np.zeros((2, 3, 5, 5))
GOOD_BOXES = np.array([[0, 1.0, 1.0, 3.0, 3.0], [1, 0.0, 0.0, 4.0, 2.0]])


@pytest.mark.parametrize("features,boxes,kwargs,error,match", [
    (np.zeros((3, 5, 5)), GOOD_BOXES, {}, ValueError, r"features of shape \(N, C, H, W\)"),
    (GOOD_FEATURES, GOOD_BOXES[:, 1:], {}, ValueError, r"boxes of shape \(R, 5\)"),
    (GOOD_FEATURES, GOOD_BOXES[0], {}, ValueError, r"boxes of shape \(R, 5\)"),
    (GOOD_FEATURES.astype(np.int64), GOOD_BOXES, {}, TypeError, "floating-point"),
    (GOOD_FEATURES, GOOD_BOXES.astype(np.int64), {}, TypeError, "floating-point"),
    (GOOD_FEATURES.astype(np.float32), GOOD_BOXES, {}, TypeError, "share one dtype"),
    (GOOD_FEATURES, GOOD_BOXES, {"output_size": 0}, ValueError, "output_size must be >= 1"),
    (GOOD_FEATURES, GOOD_BOXES, {"output_size": (2, -1)}, ValueError, "output_size must be >= 1"),
    (GOOD_FEATURES, GOOD_BOXES, {"output_size": 2.5}, ValueError, "output_size must be an int"),
    (GOOD_FEATURES, GOOD_BOXES, {"output_size": (2,)}, ValueError, "output_size must be an int"),
    (GOOD_FEATURES, GOOD_BOXES, {"spatial_scale": 0}, ValueError, "spatial_scale must be a positive"),
    (GOOD_FEATURES, GOOD_BOXES, {"spatial_scale": -0.5}, ValueError, "spatial_scale must be a posi"),
    (GOOD_FEATURES, GOOD_BOXES, {"spatial_scale": True}, ValueError, "spatial_scale must be a posi"),
    (GOOD_FEATURES, GOOD_BOXES, {"sampling_ratio": 1.5}, ValueError, "sampling_ratio must be an int"),
    (GOOD_FEATURES, GOOD_BOXES, {"aligned": 1}, ValueError, "aligned must be True or False"),
    (GOOD_FEATURES, np.array([[2, 1.0, 1, 3, 3]]), {}, ValueError, r"batch index .* \[0, 1\]"),
    (GOOD_FEATURES, np.array([[-1, 1.0, 1, 3, 3]]), {}, ValueError, r"boxes\[0\] .* batch index"),
    (GOOD_FEATURES, np.array([[0, 1, 1, 3, 3], [0.5, 1, 1, 3, 3]]), {}, ValueError, r"boxes\[1\]"),
    (GOOD_FEATURES, np.array([[0, 1.0, np.nan, 3, 3]]), {}, ValueError, "coordinates finite"),
    (GOOD_FEATURES, np.array([[0, 1.0, 1, np.inf, 3]]), {}, ValueError, "coordinates finite"),
])
def test_bad_input_is_refused_with_words(features, boxes, kwargs, error, match, make):
    kwargs = {"output_size": 2, **kwargs}
    for op in (F.roi_align, F.roi_align_simple):
        with pytest.raises(error, match=match):
            op(make(features), make(boxes), **kwargs)


def test_backends_are_not_mixed_with_the_stand_in(stand_in):
    with pytest.raises(BackendError, match="two backends"):
        F.roi_align(GOOD_FEATURES, to_device(GOOD_BOXES, "cupy"), 2)


def test_backward_refuses_a_dout_of_another_shape():
    out, cache = F.roi_align(GOOD_FEATURES, GOOD_BOXES, (2, 3))
    with pytest.raises(ValueError, match=r"dout of shape \(R, C, OH, OW\) = \(2, 3, 2, 3\)"):
        F.roi_align_backward(np.zeros((2, 3, 3, 2)), cache)


def test_the_stand_in_add_at_adds_every_repeated_index(stand_in):
    import strict_cupy
    target = to_device(np.zeros((3, 2)), "cupy")
    strict_cupy.add.at(target, to_device(np.array([0, 2, 0]), "cupy"),
                       to_device(np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), "cupy"))
    np.testing.assert_array_equal(to_numpy(target), [[6.0, 8.0], [0.0, 0.0], [3.0, 4.0]])
    with pytest.raises(TypeError, match="Unsupported type"):
        strict_cupy.add.at(target, np.array([0]), np.ones((1, 2)))  # host values: CuPy refuses
    with pytest.raises(TypeError, match="Unsupported type"):
        strict_cupy.add.at(np.zeros(3), np.array([0]), 1.0)


def test_the_stand_in_counts_the_syncs_hidden_in_bincount_and_nonzero(stand_in):
    """CuPy must read the device to size these outputs: bincount checks its input for negative
    values and takes its maximum (two reads); nonzero and flatnonzero count the nonzeros (one)."""
    import strict_cupy
    x = to_device(np.array([0, 2, 2]), "cupy")
    strict_cupy.reset_sync_count()
    counts = strict_cupy.bincount(x, minlength=4)
    assert strict_cupy.sync_count() == 2
    where = strict_cupy.flatnonzero(x)
    assert strict_cupy.sync_count() == 3
    strict_cupy.nonzero(x)
    assert strict_cupy.sync_count() == 4
    np.testing.assert_array_equal(to_numpy(counts), [1, 0, 2, 0])
    np.testing.assert_array_equal(to_numpy(where), [1, 2])


@pytest.mark.parametrize("sampling_ratio,syncs", [(2, 1), (-1, 2)])
def test_device_syncs(sampling_ratio, syncs, stand_in):
    """Forward: one read for the validity flags and the chunks' window sizes together, one more
    before it for an adaptive grid's size (both axes at once); backward: none."""
    import strict_cupy
    features = to_device(np.ones((2, 3, 8, 8)), "cupy")
    boxes = to_device(GOOD_BOXES, "cupy")
    strict_cupy.reset_sync_count()
    out, cache = F.roi_align(features, boxes, 2, 0.5, sampling_ratio)
    assert strict_cupy.sync_count() == syncs
    F.roi_align_backward(out, cache)
    assert strict_cupy.sync_count() == syncs
