"""Which maps feed which: the paper's Table 1 variants, the trace, and bad input."""
import numpy as np
import pytest

from minifpn import functional as F
from minifpn.models import FPN

CHANNELS = [4, 6, 8, 10]
SIZES = [(13, 11), (7, 6), (4, 3), (2, 2)]


def features(rng, sizes=SIZES, channels=CHANNELS, n=2):
    return [rng.standard_normal((n, c, h, w)) for c, (h, w) in zip(channels, sizes)]


def fpn(variant="fpn", extra_block="maxpool", fuse="sum", trace=False):
    return FPN(CHANNELS, 5, extra_block=extra_block, variant=variant, fuse=fuse, seed=3,
               trace=trace).to(dtype=np.float64)


def changed_outputs(model, cs, level_index, rng):
    """Names of the outputs that move when C_{level_index + 2} is perturbed."""
    before = model(cs)
    bumped = list(cs)
    bumped[level_index] = cs[level_index] + rng.standard_normal(cs[level_index].shape)
    after = model(bumped)
    return [name for name, a, b in zip(model.output_names, before, after) if not np.allclose(a, b)]


def test_fpn_c_every_level_sees_c5_and_each_ck_reaches_only_finer_levels(rng):
    model, cs = fpn(), features(rng)
    assert model.output_names == ["P2", "P3", "P4", "P5", "P6"]
    assert changed_outputs(model, cs, 3, rng) == ["P2", "P3", "P4", "P5", "P6"]  # C5
    assert changed_outputs(model, cs, 1, rng) == ["P2", "P3"]  # C3: its level and finer
    assert changed_outputs(model, cs, 0, rng) == ["P2"]


def test_bottom_up_d_each_pk_sees_only_ck(rng):
    model, cs = fpn("bottom_up"), features(rng)
    assert changed_outputs(model, cs, 1, rng) == ["P3"]
    assert changed_outputs(model, cs, 3, rng) == ["P5", "P6"]
    out = model(cs)
    lateral3 = model.inner_blocks[1](cs[1])
    np.testing.assert_allclose(out[1], model.layer_blocks[1](lateral3))  # P3 = out3(lat3(C3))


def test_no_lateral_e_only_c5_feeds_the_pyramid(rng):
    model, cs = fpn("no_lateral", trace=True), features(rng)
    for i in range(3):
        assert changed_outputs(model, cs, i, rng) == [], f"C{i + 2} must not feed anything"
    assert changed_outputs(model, cs, 3, rng) == ["P2", "P3", "P4", "P5", "P6"]
    out = model(cs)
    m = model.inner_blocks[3](cs[3])  # M5 = lateral5(C5); then only upsampling
    for i in (2, 1, 0):
        m, _ = F.upsample_nearest(m, cs[i].shape[2:])
        np.testing.assert_allclose(out[i], model.layer_blocks[i](m))
    assert "lateral2" not in model.maps and "topdown2" in model.maps
    d_features = model.backward([np.ones_like(o) for o in out])
    assert d_features[:3] == [None, None, None] and d_features[3].shape == cs[3].shape


def test_p2_only_f_returns_the_full_pathways_p2(rng):
    cs = features(rng)
    full, p2_only = fpn("fpn", None), fpn("p2_only", None)
    p2_only.load_state_dict(full.state_dict())
    out = p2_only(cs)
    assert p2_only.output_names == ["P2"] and len(out) == 1
    np.testing.assert_allclose(out[0], full(cs)[0])
    assert changed_outputs(p2_only, cs, 3, rng) == ["P2"]  # C5 still reaches P2 top-down
    with pytest.raises(ValueError, match="p2_only.*extra_block=None"):
        FPN(CHANNELS, 5, variant="p2_only", extra_block="maxpool")


def test_p6_is_p5_subsampled_with_stride_2(rng):
    model, cs = fpn(), features(rng)
    out = model(cs)
    np.testing.assert_array_equal(out[4], out[3][:, :, ::2, ::2])
    assert model.strides == [4, 8, 16, 32, 64]


def test_p6p7_shapes_and_names(rng):
    model = fpn(extra_block="p6p7")
    out = model(features(rng))
    assert model.output_names == ["P2", "P3", "P4", "P5", "P6", "P7"]
    assert [o.shape[2:] for o in out[3:]] == [(2, 2), (1, 1), (1, 1)]
    assert model.extra_blocks.use_P5


def test_avg_fuse_halves_the_merge(rng):
    model, cs = fpn(fuse="avg", trace=True), features(rng)
    model(cs)
    maps = model.maps
    np.testing.assert_allclose(maps["M3"], (maps["lateral3"] + maps["topdown3"]) / 2)


def test_trace_records_every_named_map_and_the_merge_rule(rng):
    model, cs = fpn(trace=True), features(rng)
    out = model(cs)
    maps = model.maps
    expected = ({f"C{k}" for k in range(2, 6)} | {f"lateral{k}" for k in range(2, 6)}
                | {f"topdown{k}" for k in range(2, 5)} | {f"M{k}" for k in range(2, 6)}
                | {f"P{k}" for k in range(2, 7)})
    assert set(maps) == expected
    np.testing.assert_array_equal(maps["M5"], maps["lateral5"])
    for k in (2, 3, 4):
        np.testing.assert_allclose(maps[f"M{k}"], maps[f"lateral{k}"] + maps[f"topdown{k}"])
        up, _ = F.upsample_nearest(maps[f"M{k + 1}"], maps[f"lateral{k}"].shape[2:])
        np.testing.assert_array_equal(maps[f"topdown{k}"], up)
    for k, p in zip(range(2, 7), out):
        assert maps[f"P{k}"] is p

    douts = [rng.standard_normal(o.shape) for o in out]
    d_features = model.backward(douts)
    grads = model.grads
    assert set(grads) == expected
    for k in (2, 3, 4):  # the add hands dMk unchanged to both branches
        np.testing.assert_array_equal(grads[f"lateral{k}"], grads[f"M{k}"])
        np.testing.assert_array_equal(grads[f"topdown{k}"], grads[f"M{k}"])
    # dM5 = what P5's conv sends back + P6's share + the upsample's block sums of dM4
    d_p5 = douts[3] + F.max_pool2d_backward(douts[4], F.max_pool2d(out[3], 1, 2)[1])
    np.testing.assert_allclose(grads["P5"], d_p5)  # P5's total: its own and P6's share
    conv = model.layer_blocks[3]
    conv(maps["M5"])
    from_p5 = conv.backward(d_p5)
    _, up_cache = F.upsample_nearest(maps["M5"], maps["M4"].shape[2:])
    np.testing.assert_allclose(grads["M5"], from_p5 + F.upsample_nearest_backward(grads["M4"], up_cache))
    for k, d in zip(range(2, 6), d_features):
        assert grads[f"C{k}"] is d


def test_trace_is_off_by_default(rng):
    model = fpn()
    model(features(rng))
    assert model.maps == {} and model.grads == {}


def test_traced_is_a_forward_with_the_trace_on_that_turns_it_off_again(rng):
    cs = features(rng)
    model = fpn()
    maps = model.traced(cs)
    assert model.trace is False and maps is model.maps
    reference = fpn(trace=True)
    reference(cs)
    assert maps.keys() == reference.maps.keys()
    for name in maps:
        np.testing.assert_array_equal(maps[name], reference.maps[name], err_msg=name)


def test_wrong_number_of_levels():
    with pytest.raises(ValueError, match=r"expected a list of 4 maps \[C2..C5\], got 3"):
        fpn()(features(np.random.default_rng(0))[:3])


def test_channels_must_match_in_channels_list(rng):
    cs = features(rng)
    cs[2] = rng.standard_normal((2, 7, 4, 3))
    with pytest.raises(ValueError, match=r"C4 should have shape \(N, 8, H, W\) as in_channels_list says, "
                                         r"got \(2, 7, 4, 3\)"):
        fpn()(cs)


def test_sizes_must_halve(rng):
    cs = features(rng, sizes=[(13, 11), (5, 6), (3, 3), (2, 2)])
    with pytest.raises(ValueError, match=r"C2 has height 13, so C3 should have 6 or 7, got 5"):
        fpn()(cs)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input(bad, rng):
    cs = features(rng)
    cs[1][0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="C3 contains NaN or infinite values"):
        fpn()(cs)


def test_bad_options():
    with pytest.raises(ValueError, match="variant must be one of"):
        FPN(CHANNELS, 5, variant="top_down")
    with pytest.raises(ValueError, match="extra_block must be one of"):
        FPN(CHANNELS, 5, extra_block="p6")
    with pytest.raises(ValueError, match="fuse must be 'sum' or 'avg'"):
        FPN(CHANNELS, 5, fuse="max")
    with pytest.raises(ValueError, match=r"expected 5 gradients"):
        model = fpn()
        model(features(np.random.default_rng(0)))
        model.backward([None] * 4)
