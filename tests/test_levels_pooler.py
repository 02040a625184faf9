"""Eq. (1)'s level assignment against torchvision's LevelMapper, and the multi-level RoI pooler
against torchvision's MultiScaleRoIAlign (forward and autograd backward), by hand, by central
differences, on every backend; bad input."""
import numpy as np
import pytest

from minifpn import functional as F
from minifpn.backend import BackendError, to_device, to_numpy
from minifpn.detection import ANCHOR_SIZES, map_levels
from minifpn.gradcheck import check
from minifpn.models import RoIPooler
from minifpn.nn.module import BackwardBeforeForward

TOL = 1e-6  # gradient check: the pooler is linear in the features for fixed RoIs


def torchvision_poolers():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: parity tests need it "
                                "(pip install -e .[parity])")
    poolers = pytest.importorskip("torchvision.ops.poolers", reason="torchvision is not installed: "
                                  "parity tests need it (pip install -e .[parity])")
    return torch, poolers


def boundary_boxes(canonical: float, dtype) -> np.ndarray:
    """Boxes whose sqrt(w h) is exactly canonical * 2**m (squares and 1:4 rectangles), and the
    squares one float step below and above each: where floor() in Eq. (1) changes its value."""
    rows = []
    for m in range(-5, 6):
        side = dtype(canonical * 2.0 ** m)
        for w, h in ((side, side), (side / 2, side * 2),
                     (np.nextafter(side, dtype(0)), np.nextafter(side, dtype(0))),
                     (np.nextafter(side, dtype(np.inf)), np.nextafter(side, dtype(np.inf)))):
            rows.append([3.0, 5.0, 3.0 + w, 5.0 + h])
    return np.array(rows, dtype=dtype)


def random_boxes(rng, count: int, dtype) -> np.ndarray:
    """Sides from 1 to 2000 px (log-uniform), aspect ratios from 1:4 to 4:1."""
    side = np.exp(rng.uniform(np.log(1.0), np.log(2000.0), count))
    ratio = np.exp(rng.uniform(np.log(0.25), np.log(4.0), count))
    w, h = side * np.sqrt(ratio), side / np.sqrt(ratio)
    xy = rng.uniform(-50, 500, (count, 2))
    return np.concatenate([xy, xy + np.stack([w, h], 1)], 1).astype(dtype)


# ---- Eq. (1) --------------------------------------------------------------------------------

@pytest.mark.torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k_min,k_max,canonical,level", [(2, 5, 224, 4), (2, 5, 32, 4), (3, 6, 56, 5)])
def test_map_levels_equals_torchvisions_level_mapper(dtype, k_min, k_max, canonical, level):
    torch, poolers = torchvision_poolers()
    rng = np.random.default_rng(0)
    boxes = np.concatenate([random_boxes(rng, 5000, dtype), boundary_boxes(canonical, dtype)])
    ours = map_levels(boxes, k_min, k_max, canonical, level)
    mapper = poolers.LevelMapper(k_min, k_max, canonical_scale=canonical, canonical_level=level)
    theirs = mapper([torch.tensor(boxes)]).numpy()  # k - k_min: an index into its list of maps
    assert ours.dtype == np.int64 and ours.shape == (len(boxes),)
    np.testing.assert_array_equal(ours, theirs + k_min)
    assert set(np.unique(ours)) == set(range(k_min, k_max + 1))  # every level is reached


def test_map_levels_by_hand(make):
    """canonical 32 at level 4: a box of side s in [a_k, 2 a_k) goes to the level of anchor a_k;
    exact powers of two go up (the epsilon); smaller than 8 px clamps to P2, 64 px and up to P5."""
    sides = [2.0, 7.9, 8.0, 15.9, 16.0, 31.99, 32.0, 63.0, 64.0, 1000.0]
    boxes = np.array([[10.0, 20.0, 10.0 + s, 20.0 + s] for s in sides])
    levels = map_levels(make(boxes), canonical_size=32)
    assert to_numpy(levels).tolist() == [2, 2, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [ANCHOR_SIZES[k] for k in (2, 3, 4, 5)] == [8, 16, 32, 64]  # what 32 was chosen for
    rect = np.array([[0.0, 0.0, 16.0, 64.0]])  # sqrt(16 * 64) = 32: area decides, not the side
    assert to_numpy(map_levels(make(rect), canonical_size=32)).tolist() == [4]


def test_map_levels_of_degenerate_boxes_is_k_min(make):
    boxes = np.array([[5.0, 5.0, 5.0, 50.0],      # zero width
                      [5.0, 5.0, 1.0, 50.0],      # negative area
                      [5.0, np.nan, 9.0, 50.0],   # NaN
                      [0.0, 0.0, 500.0, 500.0]])  # an ordinary box: floor(4 + log2(500 / 224)) = 5
    levels = to_numpy(map_levels(make(boxes), 2, 5))
    assert levels.tolist() == [2, 2, 2, 5]


def test_map_levels_keeps_the_device_and_returns_no_boxes_for_no_boxes(backend):
    boxes = to_device(np.zeros((0, 4), dtype=np.float32), backend)
    levels = map_levels(boxes)
    assert levels.shape == (0,) and levels.dtype == np.int64
    assert type(levels) is type(boxes)


@pytest.mark.parametrize("boxes,kwargs,error,match", [
    (np.zeros((3, 5)), {}, ValueError, r"boxes of shape \(R, 4\)"),
    (np.zeros(4), {}, ValueError, r"boxes of shape \(R, 4\)"),
    (np.zeros((3, 4), dtype=np.int64), {}, TypeError, "floating point"),
    (np.zeros((3, 4)), {"k_min": 4, "k_max": 3}, ValueError, "k_max must be >= 4"),
    (np.zeros((3, 4)), {"k_min": 2.0}, ValueError, "k_min must be an int"),
    (np.zeros((3, 4)), {"canonical_size": 0}, ValueError, "canonical_size must be a positive"),
    (np.zeros((3, 4)), {"canonical_level": -1}, ValueError, "canonical_level must be >= 0"),
])
def test_map_levels_refuses_bad_input(boxes, kwargs, error, match):
    with pytest.raises(error, match=match):
        map_levels(boxes, **kwargs)


# ---- the pooler -----------------------------------------------------------------------------

def pyramid(rng, N: int, C: int, image: int, levels=(2, 3, 4, 5), dtype=np.float64):
    """Random maps for an image x image input: level k is image / 2**k square."""
    return [rng.standard_normal((N, C, image // 2 ** k, image // 2 ** k)).astype(dtype)
            for k in levels]


def rois_over_all_levels(rng, N: int, image: int, per_image: int = 12, dtype=np.float64):
    """(N * per_image, 5) RoIs sorted by image, sides 3 to 100 px (digits are 3.5-73 px); the
    first four of each image are squares of 6, 20, 40 and 90 px, one per level P2..P5."""
    rows = []
    for n in range(N):
        side = np.exp(rng.uniform(np.log(3.0), np.log(100.0), (per_image, 2)))
        side[:4] = np.array([6.0, 20.0, 40.0, 90.0])[:per_image, None]
        xy = rng.uniform(-10, image - 10, (per_image, 2))
        rows.append(np.concatenate([np.full((per_image, 1), n), xy, xy + side], 1))
    return np.concatenate(rows).astype(dtype)


@pytest.mark.torch
@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_pooler_equals_torchvisions_multiscale_roi_align(sampling_ratio):
    """MultiScaleRoIAlign infers each level's scale from the map sizes (32 / 128 = 1/4 ...) and
    always runs the legacy RoIAlign (aligned=False): the pooler is set to match."""
    torch, poolers = torchvision_poolers()
    rng = np.random.default_rng(5)
    N, C, image = 2, 3, 128
    maps = pyramid(rng, N, C, image)
    rois = rois_over_all_levels(rng, N, image)
    pooler = RoIPooler(output_size=7, sampling_ratio=sampling_ratio, canonical_size=32, aligned=False)
    pooled = pooler(maps, rois)
    dpooled = rng.standard_normal(pooled.shape)
    grads = pooler.backward(dpooled)

    names = ["p2", "p3", "p4", "p5"]
    x = {name: torch.tensor(m, requires_grad=True) for name, m in zip(names, maps)}
    theirs_pooler = poolers.MultiScaleRoIAlign(names, 7, sampling_ratio, canonical_scale=32,
                                               canonical_level=4)
    boxes = [torch.tensor(rois[rois[:, 0] == n, 1:]) for n in range(N)]  # per image, in order
    theirs = theirs_pooler(x, boxes, [(image, image)] * N)
    theirs.backward(torch.tensor(dpooled))
    levels = to_numpy(map_levels(rois[:, 1:], canonical_size=32))
    assert set(levels.tolist()) == {2, 3, 4, 5}  # every level pools some RoIs
    np.testing.assert_allclose(pooled, theirs.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert len(grads) == 4
    for name, grad in zip(names, grads):
        np.testing.assert_allclose(grad, x[name].grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)
        assert np.abs(grad).max() > 0.01, name


def test_pooler_gradient_check_over_all_levels(make, rng):
    N, C, image = 2, 2, 32
    maps = pyramid(rng, N, C, image)  # 8x8, 4x4, 2x2, 1x1
    rois = np.array([[0, 3.0, 4.0, 9.0, 10.0],     # 6 px: P2
                     [1, 2.0, 1.0, 22.0, 19.0],    # ~19 px: P3
                     [0, 0.0, 5.0, 40.0, 38.0],    # ~36 px: P4
                     [1, -5.0, -9.0, 70.0, 66.0],  # 75 px: P5
                     [0, 10.0, 12.0, 14.0, 30.0]])  # sqrt(4 * 18) ~ 8.5 px: P2
    assert to_numpy(map_levels(rois[:, 1:], canonical_size=32)).tolist() == [2, 3, 4, 5, 2]
    pooler = RoIPooler(output_size=(2, 3), sampling_ratio=2)
    names = ["p2", "p3", "p4", "p5"]
    rois_device = make(rois)

    def forward(p2, p3, p4, p5):
        return pooler([p2, p3, p4, p5], rois_device)

    def backward(dout):
        return dict(zip(names, pooler.backward(dout)))

    inputs = {name: make(m) for name, m in zip(names, maps)}
    result = check("RoIPooler", "", forward, backward, inputs, tol=TOL)
    assert set(result.errors) == set(names)
    assert result.max_error < TOL, result.errors


def test_a_small_box_is_pooled_from_p2_and_a_big_one_from_p5(make, rng):
    maps = [make(m) for m in pyramid(rng, 1, 3, 128)]
    rois = make(np.array([[0, 40.0, 40.0, 48.0, 50.0],    # ~9 px
                          [0, 10.0, 20.0, 90.0, 100.0]]))  # 80 px
    pooler = RoIPooler()
    pooled = pooler(maps, rois)
    alone_p2, _ = F.roi_align(maps[0], rois[:1], 7, 1 / 4, 2, True)
    alone_p5, _ = F.roi_align(maps[3], rois[1:], 7, 1 / 32, 2, True)
    np.testing.assert_array_equal(to_numpy(pooled[:1]), to_numpy(alone_p2))
    np.testing.assert_array_equal(to_numpy(pooled[1:]), to_numpy(alone_p5))
    dpooled = np.zeros(pooled.shape)
    dpooled[0] = 1.0  # only the small box's gradient: it must land on P2 alone
    grads = [to_numpy(g) for g in pooler.backward(make(dpooled))]
    assert grads[0].sum() == pytest.approx(7 * 7 * 3)  # every bin passes its whole gradient back
    assert not grads[1].any() and not grads[2].any() and not grads[3].any()
    assert [g.shape for g in grads] == [(1, 3, 32, 32), (1, 3, 16, 16), (1, 3, 8, 8), (1, 3, 4, 4)]


def test_no_rois(make, rng):
    maps = [make(m) for m in pyramid(rng, 2, 3, 64, dtype=np.float32)]
    pooler = RoIPooler(output_size=(3, 4))
    pooled = pooler(maps, make(np.zeros((0, 5), dtype=np.float32)))
    assert pooled.shape == (0, 3, 3, 4) and pooled.dtype == np.float32
    grads = pooler.backward(make(np.zeros((0, 3, 3, 4), dtype=np.float32)))
    assert [g.shape for g in grads] == [m.shape for m in maps]
    assert not any(to_numpy(g).any() for g in grads)


def test_numpy_and_the_device_agree_bit_for_bit(backend, rng):
    maps = pyramid(rng, 2, 4, 128, dtype=np.float32)
    rois = rois_over_all_levels(rng, 2, 128, dtype=np.float32)
    host, device = RoIPooler(), RoIPooler()
    pooled = host(maps, rois)
    pooled_b = device([to_device(m, backend) for m in maps], to_device(rois, backend))
    np.testing.assert_array_equal(to_numpy(pooled_b), pooled)
    dpooled = rng.standard_normal(pooled.shape).astype(np.float32)
    for ours, theirs in zip(device.backward(to_device(dpooled, backend)), host.backward(dpooled)):
        np.testing.assert_array_equal(to_numpy(ours), theirs)


@pytest.mark.parametrize("sampling_ratio,host_rois,syncs", [(2, False, 5), (2, True, 4),
                                                            (-1, False, 9), (-1, True, 8)])
def test_pooler_syncs(sampling_ratio, host_rois, syncs, stand_in, rng):
    """Forward: one read of how many RoIs each level gets (none for host rois: Eq. (1) runs on
    the host) and roi_align's one per level (two with an adaptive grid); backward: none. Host
    rois with device maps give NumPy's values bit for bit."""
    maps = pyramid(rng, 2, 3, 128, dtype=np.float32)
    rois = rois_over_all_levels(rng, 2, 128, dtype=np.float32)  # RoIs on all four levels
    dpooled = rng.standard_normal((len(rois), 3, 7, 7)).astype(np.float32)
    pooler = RoIPooler(sampling_ratio=sampling_ratio)
    stand_in.reset_sync_count()
    pooled = pooler([to_device(m, "cupy") for m in maps], rois if host_rois else to_device(rois, "cupy"))
    assert stand_in.sync_count() == syncs
    grads = pooler.backward(to_device(dpooled, "cupy"))
    assert stand_in.sync_count() == syncs
    reference = RoIPooler(sampling_ratio=sampling_ratio)
    np.testing.assert_array_equal(to_numpy(pooled), reference(maps, rois))
    for ours, theirs in zip(grads, reference.backward(dpooled)):
        np.testing.assert_array_equal(to_numpy(ours), theirs)


def test_pooler_refuses_device_rois_with_host_maps(stand_in, rng):
    maps = pyramid(rng, 1, 3, 64)
    with pytest.raises(BackendError, match="two backends"):
        RoIPooler()(maps, to_device(np.array([[0, 1.0, 1.0, 20.0, 20.0]]), "cupy"))


def test_pooler_defaults_and_repr():
    pooler = RoIPooler()
    assert (pooler.levels, pooler.output_size, pooler.sampling_ratio) == ((2, 3, 4, 5), (7, 7), 2)
    assert (pooler.canonical_size, pooler.canonical_level, pooler.aligned) == (32, 4, True)
    assert "canonical_size=32" in repr(pooler) and pooler.parameters() == []


@pytest.mark.parametrize("kwargs,match", [
    ({"levels": (2, 4)}, "consecutive increasing"),
    ({"levels": (5, 4, 3, 2)}, "consecutive increasing"),
    ({"levels": ()}, "consecutive increasing"),
    ({"levels": (-1, 0)}, "consecutive increasing"),
    ({"levels": 3}, "consecutive increasing"),
    ({"output_size": 0}, "output_size must be >= 1"),
    ({"sampling_ratio": 2.0}, "sampling_ratio must be an int"),
    ({"canonical_size": -32}, "canonical_size must be a positive"),
    ({"aligned": "yes"}, "aligned must be True or False"),
])
def test_pooler_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoIPooler(**kwargs)


def test_pooler_refuses_mismatched_maps_and_rois(rng):
    maps = pyramid(rng, 2, 3, 64)
    rois = rois_over_all_levels(rng, 2, 64, per_image=2)
    pooler = RoIPooler()
    with pytest.raises(ValueError, match=r"a list of 4 feature maps, one per level \(2, 3, 4, 5\), got 3"):
        pooler(maps[:3], rois)
    with pytest.raises(ValueError, match="a list of 4 feature maps"):
        pooler(maps[0], rois)
    with pytest.raises(ValueError, match=r"P3 map \(2, 3, 4, 4\) does not follow the P2 map \(2, 3, 2, 2\)"):
        pooler(maps[::-1], rois)  # coarsest first
    with pytest.raises(ValueError, match="the P4 map .* same N and C"):
        pooler([maps[0], maps[1], maps[2][:, :2], maps[3]], rois)  # another channel count
    with pytest.raises(ValueError, match="the P5 map .* same N and C"):
        pooler([maps[0], maps[1], maps[2], maps[3][:1]], rois)  # another batch size
    with pytest.raises(ValueError, match=r"the P2 map of shape \(N, C, H, W\)"):
        pooler([maps[0][0], *maps[1:]], rois)
    with pytest.raises(TypeError, match="share one dtype"):
        pooler(maps, rois.astype(np.float32))
    with pytest.raises(ValueError, match=r"rois of shape \(R, 5\)"):
        pooler(maps, rois[:, 1:])
    with pytest.raises(ValueError, match=r"batch index must be an integer in \[0, 1\]"):
        pooler(maps, np.array([[2, 1.0, 1.0, 9.0, 9.0]]))


def test_pooler_backward_before_forward_and_of_another_shape(rng):
    pooler = RoIPooler()
    with pytest.raises(BackwardBeforeForward):
        pooler.backward(np.zeros((1, 3, 7, 7)))
    pooled = pooler(pyramid(rng, 1, 3, 64), np.array([[0, 1.0, 1.0, 20.0, 20.0]]))
    with pytest.raises(ValueError, match=r"expected a gradient of shape \(R, C, OH, OW\) = \(1, 3, 7, 7\)"):
        pooler.backward(np.zeros((2, 3, 7, 7)))
    assert pooled.shape == (1, 3, 7, 7)
