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
