import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import minifpn.functional as F  # noqa: E402
from minifpn.backend import to_device, to_numpy  # noqa: E402
from minifpn.detection import box_iou  # noqa: E402
from minifpn.models import FPN  # noqa: E402
from minifpn.models.detector import Detector, DetectorConfig  # noqa: E402
from minifpn.viz import channel_summary, explore_location, plot_pyramid, trace_location  # noqa: E402


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
    for row, k in zip(panels, range(2, 7)):  # ... and on every map, in the level's cells: box / 2 ** k
        for ax in (ax for ax in row if ax.images):
            (rect,) = ax.patches
            s = 2 ** k
            assert (rect.get_x(), rect.get_y()) == (4 / s - 0.5, 4 / s - 0.5)
            assert (rect.get_width(), rect.get_height()) == (16 / s, 26 / s)
            assert ax.get_xlim() == (-0.5, 64 / s - 0.5)  # the view stays on the map
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


def test_plot_pyramid_fits_a_notebook_column(rng):
    fpn = FPN([4, 6, 8, 10], 5, trace=True)
    fpn([rng.standard_normal((1, c, s, s)).astype(np.float32) for c, s in zip([4, 6, 8, 10], [16, 8, 4, 2])])
    fig = plot_pyramid(fpn.maps, image=rng.random((64, 64)))
    assert fig.get_figwidth() == 11.0 and fig.get_figheight() < 9  # one pyramid, about 1.5 in a panel
    matplotlib.pyplot.close(fig)


# ---- explore_location: the numbers it returns, computed again here --------------------------------

def _small_pair():
    """A small FPN detector and bottom-up pyramid (random weights, K = 3) and a 64 x 64 scene."""
    config = dict(num_classes=3, widths=(8, 8, 16, 16), channels=8, seed=3)
    detectors = {name: Detector(DetectorConfig(setting=name, **config)).eval()
                 for name in ("fpn", "bottom_up")}
    image = np.random.default_rng(5).random((1, 64, 64)).astype(np.float32)
    boxes = np.array([[10.0, 12.0, 30.0, 40.0], [40.0, 40.0, 48.0, 50.0]], np.float32)
    return detectors, image, boxes, np.array([7, 2])


def _one_hot_norms(det, image, level, row, col, channel):
    """The per-map gradient norms of a one-hot dP_level at (channel, row, col), via FPN.grads."""
    fpn = det.fpn
    fpn.trace = True
    p = fpn(det.backbone(image[None]))
    i = fpn.output_levels.index(level)
    assert channel == int(np.argmax(p[i][0, :, row, col]))  # the most active channel
    d_p = [None] * len(p)
    d_p[i] = np.zeros_like(p[i])
    d_p[i][0, channel, row, col] = 1.0
    fpn.backward(d_p)
    fpn.trace = False
    return {m: float(np.linalg.norm(fpn.grads[m].astype(np.float64))) if m in fpn.grads else 0.0
            for m in fpn.maps}


@pytest.mark.parametrize("level, row, col", [(2, 9, 5), (4, 2, 1), (6, 0, 0)])
def test_explore_location_returns_what_fpn_grads_box_iou_the_anchors_and_the_head_give(level, row, col):
    detectors, image, boxes, labels = _small_pair()
    found = explore_location(detectors, image, boxes, level, row, col, labels)
    assert list(found.traces) == ["fpn", "bottom_up"]
    assert (found.level, found.row, found.col) == (level, row, col)
    for name, det in detectors.items():
        t = found.traces[name]
        assert all(not p.grad.any() for p in det.fpn.parameters())  # the FPN's gradients left at zero
        # the one-hot traced down the pathway: the norms FPN.grads gives for the same one-hot
        expected = _one_hot_norms(det, image, level, row, col, t.channel)
        assert t.grad_norms.keys() == expected.keys()
        for m in expected:
            assert t.grad_norms[m] == pytest.approx(expected[m], rel=1e-6, abs=1e-12), (name, m)
        # the cell's anchors: the detector's own, at that cell, and their IoU with the nearest digit
        out = det.forward(image[None])
        i = det.fpn.output_levels.index(level)
        per_cell = det.num_anchors
        local = (row * out.sizes[i][1] + col) * per_cell
        np.testing.assert_array_equal(t.anchors, det.anchors(out.sizes)[i][local:local + per_cell])
        iou = box_iou(t.anchors, boxes)
        np.testing.assert_allclose(t.ious, iou.max(axis=1))
        np.testing.assert_array_equal(t.nearest, np.where(iou.max(axis=1) > 0, iou.argmax(axis=1), -1))
        # the head's output at those rows, and its softmax
        np.testing.assert_array_equal(t.logits, out.logits[0, t.rows])
        np.testing.assert_allclose(t.probs, F.softmax(out.logits[0, t.rows]), rtol=1e-6)
        s = 2 ** level
        assert t.stride == s and t.centre == ((col + 0.5) * s, (row + 0.5) * s)
        centres = (t.anchors[:, :2] + t.anchors[:, 2:]) / 2  # every anchor is centred on the cell
        np.testing.assert_allclose(centres, np.tile(t.centre, (len(centres), 1)))
    # the bottom-up pyramid: the gradient stays on its level (P6 hands it to P5 first)
    bottom = found.traces["bottom_up"]
    reached = {k for k in range(2, 6) if bottom.grad_norms[f"C{k}"] > 0}
    assert reached == {min(level, 5)}
    top_down = found.traces["fpn"]
    assert {k for k in range(2, 6) if top_down.grad_norms[f"C{k}"] > 0} == set(range(min(level, 5), 6))
    # the figure: the input, one norm grid per detector, 4 dC_k panels per detector, the anchor table
    fig = found.figure
    assert fig.get_figwidth() == 11.0
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any(text.startswith("a0 ") for text in texts) and "no gradient\nreaches C3" in texts
    matplotlib.pyplot.close(fig)


def test_explore_location_takes_a_channel_and_names_a_bad_level_cell_or_detector():
    detectors, image, boxes, labels = _small_pair()
    t = trace_location(detectors["fpn"], image, boxes, 3, 1, 2, channel=4)
    assert t.channel == 4 and t.grad_norms["P3"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="level must be one of"):
        trace_location(detectors["fpn"], image, boxes, 7, 0, 0)
    with pytest.raises(ValueError, match="P2 is 16 x 16; cell \\(16, 0\\) is not on it"):
        trace_location(detectors["fpn"], image, boxes, 2, 16, 0)
    c5 = Detector(DetectorConfig(setting="c5", num_classes=3, widths=(8, 8, 16, 16), channels=8))
    with pytest.raises(ValueError, match="has no FPN"):
        trace_location(c5, image, boxes, 5, 0, 0)
    empty = trace_location(detectors["fpn"], image, np.zeros((0, 4)), 2, 0, 0)
    assert not empty.ious.any() and (empty.nearest == -1).all()


def test_explore_location_on_a_device_backend_gives_numpy_s_numbers(backend):
    detectors, image, boxes, labels = _small_pair()
    host = {name: trace_location(det, image, boxes, 2, 9, 5) for name, det in detectors.items()}
    for name, det in detectors.items():
        det.to(backend)
        t = trace_location(det, to_device(image, backend), to_device(boxes, backend), 2, 9, 5)
        assert isinstance(t.logits, np.ndarray) and isinstance(t.anchors, np.ndarray)  # host arrays
        np.testing.assert_allclose(t.logits, host[name].logits, rtol=1e-4, atol=1e-6)
        assert t.grad_norms == pytest.approx(host[name].grad_norms, rel=1e-4)
    fig = explore_location(detectors, to_device(image, backend), to_device(boxes, backend), 2, 9, 5,
                           to_device(labels, backend)).figure
    assert to_numpy(fig.axes[0].images[0].get_array()).shape == (64, 64)
    matplotlib.pyplot.close(fig)


def test_explore_location_on_the_reference_pair_shows_the_top_down_pathway():
    from minifpn.data import DigitScenes
    from minifpn.weights import load_reference

    detectors = {name: load_reference(name) for name in ("fpn", "bottom_up")}
    image, boxes, labels = DigitScenes("test", 18)[17]
    found = explore_location(detectors, image, boxes, 2, 16, 18, labels)  # P2 on the 11.8-px 4
    fpn, bottom = found.traces["fpn"], found.traces["bottom_up"]
    assert all(fpn.grad_norms[f"C{k}"] > 0 for k in range(2, 6))
    assert bottom.grad_norms["C2"] > 0 and not any(bottom.grad_norms[f"C{k}"] for k in range(3, 6))
    assert (fpn.nearest == 2).all() and labels[2] == 4  # every anchor of the cell is nearest the small 4
    assert (fpn.probs[:, 1:].argmax(axis=1) == 4).all() and (bottom.probs[:, 1:].argmax(axis=1) == 4).all()
    matplotlib.pyplot.close(found.figure)
