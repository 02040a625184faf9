import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from minifpn.models import FPN  # noqa: E402
from minifpn.viz import channel_summary, plot_pyramid  # noqa: E402


def test_channel_summary_modes():
    a = np.zeros((1, 3, 2, 2))
    a[0, 1] = [[1.0, -1.0], [2.0, 0.0]]
    np.testing.assert_allclose(channel_summary(a, "mean"), a[0].mean(axis=0))
    np.testing.assert_allclose(channel_summary(a, "absmean"), np.abs(a[0]).mean(axis=0))
    np.testing.assert_array_equal(channel_summary(a, "max"), a[0, 1])
    with pytest.raises(ValueError, match="mode must be"):
        channel_summary(a, "median")


def test_plot_pyramid_draws_one_row_per_level_and_a_panel_per_traced_map(rng):
    fpn = FPN([4, 6, 8, 10], 5, trace=True)
    cs = [rng.standard_normal((1, c, s, s)).astype(np.float32)
          for c, s in zip([4, 6, 8, 10], [16, 8, 4, 2])]
    out = fpn(cs)
    fpn.backward([np.ones_like(o) for o in out])
    for traced in (fpn.maps, fpn.grads):
        fig = plot_pyramid(traced)
        axes = np.array(fig.axes).reshape(5, 5)  # levels 2..6 x stages C, lateral, topdown, M, P
        drawn = sum(len(ax.images) for ax in fig.axes)
        assert drawn == len(traced) == 4 + 4 + 3 + 4 + 5  # C, lateral, topdown, M, P
        assert len(axes[4, 4].images) == 1 and len(axes[4, 0].images) == 0  # P6 only
        assert len(axes[3, 2].images) == 0  # no top-down map arrives at level 5
        matplotlib.pyplot.close(fig)


def test_plot_pyramid_shares_one_colour_scale_per_row_with_a_colourbar_input_and_statistic(rng):
    fpn = FPN([4, 6, 8, 10], 5, trace=True)
    cs = [rng.standard_normal((1, c, s, s)).astype(np.float32)
          for c, s in zip([4, 6, 8, 10], [16, 8, 4, 2])]
    fpn(cs)
    image = rng.random((1, 64, 64))
    fig = plot_pyramid(fpn.maps, image=image, boxes=np.array([[4.0, 4.0, 20.0, 30.0]]), title="scene 0")
    panels, input_ax = np.array(fig.axes[:25]).reshape(5, 5), fig.axes[25]
    assert len(fig.axes) == 26  # 5 levels x 5 stages, then the input
    assert input_ax.get_title() == "input" and input_ax.images[0].get_array().shape == (64, 64)
    assert len(input_ax.patches) == 1  # the true box
    assert "mean |value| over channels" in fig._suptitle.get_text() and "scene 0" in fig._suptitle.get_text()
    for row, k in zip(panels, range(2, 7)):
        images = [im for ax in row for im in ax.images]
        clims = {im.get_clim() for im in images}
        assert len(clims) == 1  # every stage of a level on one scale
        low, high = clims.pop()
        summaries = [channel_summary(fpn.maps[n], "absmean") for n in
                     (f"{s}{k}" for s in ("C", "lateral", "topdown", "M", "P")) if n in fpn.maps]
        assert low == 0.0 and high == pytest.approx(max(float(a.max()) for a in summaries))
        colourbars = [child for ax in row for child in ax.child_axes]
        assert len(colourbars) == 1  # one per row, beside its last panel
    matplotlib.pyplot.close(fig)


def test_plot_pyramid_draws_two_pyramids_side_by_side_and_names_a_bad_mode(rng):
    fpn = FPN([4, 6, 8, 10], 5, trace=True)
    fpn([rng.standard_normal((1, c, s, s)).astype(np.float32) for c, s in zip([4, 6, 8, 10], [16, 8, 4, 2])])
    fig = matplotlib.pyplot.figure()
    left, right = fig.subfigures(1, 2)
    assert plot_pyramid(fpn.maps, fig=left) is left and plot_pyramid(fpn.maps, fig=right, mode="max") is right
    assert len(left.axes) == len(right.axes) == 25
    assert "the channel of largest energy" in right._suptitle.get_text()
    with pytest.raises(ValueError, match="mode must be one of 'mean', 'absmean', 'max', got 'median'"):
        plot_pyramid(fpn.maps, mode="median")
    matplotlib.pyplot.close("all")
