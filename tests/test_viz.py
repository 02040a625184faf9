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


def _label_extents(fig):
    """(panel extent, [(text, extent)]) of every drawn panel, after a draw."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [(ax.get_window_extent(renderer),
             [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts])
            for ax in fig.axes if ax.images]


def test_plot_detections_names_truth_and_predictions_and_labels_neither_overlap_nor_clip():
    from minifpn.viz import plot_detections

    images = np.zeros((2, 1, 64, 64), dtype=np.float32)
    # a box on the top edge (a label above it would clip), one on the right edge, and a crowd of
    # predictions on one small digit: the labels have to find free places
    truths = [{"boxes": np.array([[0, 0, 10, 12], [54, 30, 64, 44]], np.float32), "labels": np.array([7, 1])},
              {"boxes": np.array([[20, 20, 28, 30]], np.float32), "labels": np.array([3])}]
    crowd = np.array([[20, 20, 28, 30]] * 6, np.float32) + np.arange(6, dtype=np.float32)[:, None] * 0.5
    detections = [{"boxes": np.array([[0, 1, 10, 12], [54, 31, 64, 44]], np.float32),
                   "scores": np.array([0.9, 0.2]), "labels": np.array([7, 4])},
                  {"boxes": crowd, "scores": np.linspace(0.95, 0.45, 6), "labels": np.arange(6)}]
    fig = plot_detections(images, detections, truths, columns=2, min_score=0.3)
    panels = _label_extents(fig)
    texts = [text for _, labels in panels for text, _ in labels]
    assert "7" in texts and "1" in texts and "3" in texts          # the true digits are named
    assert "7 0.90" in texts and "0 0.95" in texts                 # predictions: digit and score
    assert not any(t.startswith("4 0.20") for t in texts)          # below min_score: not drawn
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "true box" in legend and "prediction" in legend and ">= 0.3" in legend
    for panel, labels in panels:
        for k, (text, extent) in enumerate(labels):
            assert panel.x0 <= extent.x0 and extent.x1 <= panel.x1, f"{text!r} clipped left/right"
            assert panel.y0 <= extent.y0 and extent.y1 <= panel.y1, f"{text!r} clipped top/bottom"
            for other, other_extent in labels[k + 1:]:
                assert not extent.overlaps(other_extent), f"labels {text!r} and {other!r} overlap"
    # the crowd does not fit: what is left out is counted in the title, never drawn on top
    crowd_panel = fig.axes[1]
    drawn = sum(t.get_text()[:1].isdigit() and " " in t.get_text() for t in crowd_panel.texts)
    left_out = 6 - drawn
    assert left_out == 0 or f"{left_out} label" in crowd_panel.get_title()
    assert len(crowd_panel.patches) == 1 + 6                       # every box is drawn, labelled or not
    matplotlib.pyplot.close(fig)


def test_plot_pyramid_marks_the_maps_no_gradient_reaches(rng):
    fpn = FPN([4, 6, 8, 10], 5, trace=True)
    sizes = zip([4, 6, 8, 10], [16, 8, 4, 2])
    out = fpn([rng.standard_normal((1, c, s, s)).astype(np.float32) for c, s in sizes])
    fpn.backward([None, None, np.ones_like(out[2]), None, None])  # dP4 only: levels 2 and 3 get nothing
    grads = {name: fpn.grads.get(name, np.zeros_like(m)) for name, m in fpn.maps.items()}
    panels = np.array(plot_pyramid(grads).axes).reshape(5, 5)
    assert [t.get_text() for t in panels[0, 0].texts] == ["C2 (4, 16, 16) = 0"]
    assert panels[0, 0].images[0].get_clim() == (0.0, 1.0)  # an all-zero row still has a scale
    assert [t.get_text() for t in panels[2, 0].texts] == ["C4 (8, 4, 4)"]
    assert [t.get_text() for t in panels[2, 4].texts] == ["P4 (5, 4, 4)"]
    matplotlib.pyplot.close("all")


def test_the_demo_draws_the_pyramid_of_a_scene_with_several_digit_sizes():
    from minifpn.cli import _scene_of_several_sizes
    small, medium, large = [0, 0, 10, 10], [0, 0, 30, 30], [0, 0, 60, 60]
    truths = [{"boxes": np.array([small, small], np.float32)},
              {"boxes": np.zeros((0, 4), np.float32)},
              {"boxes": np.array([small, large], np.float32)},
              {"boxes": np.array([small, medium, large], np.float32)},
              {"boxes": np.array([large, medium, small], np.float32)}]
    assert _scene_of_several_sizes(truths) == 3  # the first with all three sizes
