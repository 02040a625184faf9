"""The GPU path on every run: the strict CuPy stand-in's own rules, and the whole model (ResNet,
FPN, detector loss/backward/predict, training with a checkpoint and a resume, the figures) on
every backend, equal to NumPy's; and the device -> host synchronisations of a training step."""
import json
import os

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import strict_cupy  # noqa: E402

from minifpn import viz  # noqa: E402
from minifpn.backend import backend_name, get_array_module, to_device, to_numpy  # noqa: E402
from minifpn.data import DigitScenes  # noqa: E402
from minifpn.models import FPN, resnet_small  # noqa: E402
from minifpn.models.detector import Detector, DetectorConfig  # noqa: E402
from minifpn.train import TrainConfig, load_checkpoint, train  # noqa: E402

# Device -> host synchronisations in one training step on the strict stand-in (docs/performance.md):
# the loss's two parts read together with the flags of the input checks (images finite, C2..C5
# finite), and the batched finite check of the weights.
SYNCS_PER_STEP = 2


# ---- the stand-in is as strict as CuPy ---------------------------------------------------------

def test_stand_in_refuses_implicit_conversion_with_cupys_words(stand_in):
    x = to_device(np.arange(6.0).reshape(2, 3), "cupy")
    assert isinstance(x, strict_cupy.ndarray) and backend_name(x) == "cupy"
    for convert in (np.asarray, np.array, lambda a: np.testing.assert_array_equal(a, 0)):
        with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed.*"
                                            r"\.get\(\)"):
            convert(x)


@pytest.mark.parametrize("host", [np.ones(3), np.array(1.0)], ids=["1-d", "0-d"])
def test_stand_in_refuses_host_arrays_in_ufuncs_and_operators(stand_in, host):
    x = to_device(np.arange(3.0), "cupy")
    for mix in (lambda: x + host, lambda: host * x, lambda: strict_cupy.maximum(x, host),
                lambda: x - host[...], lambda: strict_cupy.concatenate([x, host])):
        with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
            mix()


def test_stand_in_accepts_scalars_and_keeps_reductions_on_the_device(stand_in):
    x = to_device(np.arange(3.0, dtype=np.float32), "cupy")
    y = (x + 1) * np.float32(2) - 1 + True  # Python and NumPy scalars mix freely
    strict_cupy.reset_sync_count()
    total = y.sum()
    assert isinstance(total, strict_cupy.ndarray) and total.shape == () and total.dtype == np.float32
    assert isinstance(x.max(), strict_cupy.ndarray) and isinstance(get_array_module(x).isfinite(x).all(),
                                                                   strict_cupy.ndarray)
    assert strict_cupy.sync_count() == 0
    assert float(total) == 12.0  # (x + 1) * 2 - 1 + 1 for x = 0, 1, 2: 2 + 4 + 6
    assert strict_cupy.sync_count() == 1


def test_stand_in_counts_every_device_to_host_read(stand_in):
    x = to_device(np.arange(4, dtype=np.int64), "cupy")
    strict_cupy.reset_sync_count()
    reads = [lambda: float(x[1]), lambda: int(x[2]), lambda: bool(x[3]), lambda: x[0].item(),
             lambda: x.get(), lambda: strict_cupy.asnumpy(x), lambda: to_numpy(x), lambda: x.tolist()]
    for i, read in enumerate(reads, 1):
        read()
        assert strict_cupy.sync_count() == i
    _ = x.shape, x.dtype, x.ndim, len(x), x.reshape(2, 2), x[np.array([3, 0])]  # host metadata only
    assert strict_cupy.sync_count() == len(reads)
    assert x[np.array([3, 0])].tolist() == [3, 0]  # host index arrays are copied over, as in CuPy
    assert strict_cupy.cuda.runtime.getDeviceCount() == 1


# ---- the model on every backend, equal to NumPy -------------------------------------------------

def test_resnet_and_fpn_forward_backward_equal_numpy(backend, rng):
    image = rng.standard_normal((2, 1, 64, 64)).astype(np.float32)
    results = {}
    for name in ("numpy", backend):
        backbone = resnet_small(in_channels=1).to(name)
        fpn = FPN(backbone.out_channels, out_channels=8, trace=True).to(name)
        ps = fpn(backbone(to_device(image, name)))
        d_image = backbone.backward(fpn.backward([get_array_module(p).ones_like(p) for p in ps]))
        assert {backend_name(p) for p in ps} | {backend_name(d_image)} == {name}
        results[name] = ([to_numpy(p) for p in ps], to_numpy(d_image),
                         {k: to_numpy(p.grad) for k, p in backbone.named_parameters()},
                         {k: to_numpy(p.grad) for k, p in fpn.named_parameters()})
    ours, ref = results[backend], results["numpy"]
    exact = backend == "numpy" or _stand_in()  # real CuPy's kernels round differently
    for a, b in zip(ours[0] + [ours[1]], ref[0] + [ref[1]]):
        if exact:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for grads, ref_grads in zip(ours[2:], ref[2:]):
        assert grads.keys() == ref_grads.keys()
        for k in grads:
            np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5, err_msg=k)


def _stand_in() -> bool:
    from minifpn import backend as B
    return B._cupy is strict_cupy


def tiny_detector(backend, **kw):
    return Detector(DetectorConfig(widths=(4, 4, 4, 4), channels=4, **kw)).to(backend)


@pytest.mark.parametrize("targets_on", ["host", "device"])
def test_detector_loss_backward_predict(backend, targets_on):
    images, boxes, labels = DigitScenes("train", n=2, seed=0).batch(range(2))
    results = {}
    for name in ("numpy", backend):
        det = tiny_detector(name)
        move = (lambda a: to_device(a, name)) if targets_on == "device" else (lambda a: a)
        loss, parts = det.loss(to_device(images, name), [move(b) for b in boxes],
                               [move(lab) for lab in labels], np.random.default_rng(0))
        assert type(loss) is float and set(parts) == {"cls", "box"}
        assert all(type(v) is float for v in parts.values())
        d_images = det.backward()
        assert backend_name(d_images) == name and d_images.shape == images.shape
        det.eval()
        detections = det.predict(to_device(images, name))
        assert len(detections) == 2 and all(isinstance(d["boxes"], np.ndarray) for d in detections)
        results[name] = (loss, {k: to_numpy(p.grad) for k, p in det.named_parameters()}, detections)
    (loss, grads, dets), (ref_loss, ref_grads, ref_dets) = results[backend], results["numpy"]
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for k in ref_grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-3, atol=1e-6, err_msg=k)
    assert [len(d["boxes"]) for d in dets] == [len(d["boxes"]) for d in ref_dets]


def _train(backend, run_dir, resume=False, time_limit=None):
    det = tiny_detector(backend)
    config = TrainConfig(iterations=4, batch_size=2, lr=0.01, warmup=2, checkpoint_every=2)
    return train(det, config, str(run_dir), resume=resume, progress=False, time_limit=time_limit,
                 log=lambda *a: None)


def _checkpoint_arrays(run_dir):
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.npz"))
    return ckpt["meta"], {**{f"model/{k}": v for k, v in ckpt["model"].items()},
                          **{f"optim/{k}": v for k, v in ckpt["optim"].items()}}


def test_training_checkpoint_and_resume_match_numpy_bit_for_bit(backend, tmp_path):
    _train("numpy", tmp_path / "numpy")
    history = _train(backend, tmp_path / "ours", time_limit=0)  # stops after step 1, checkpointed
    assert history["iteration"] == [1]
    _train(backend, tmp_path / "ours", resume=True)  # and goes on to step 4
    meta, arrays = _checkpoint_arrays(tmp_path / "ours")
    ref_meta, ref_arrays = _checkpoint_arrays(tmp_path / "numpy")
    assert meta["iteration"] == ref_meta["iteration"] == 4
    assert arrays.keys() == ref_arrays.keys() and len(arrays) > 40
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    exact = backend == "numpy" or _stand_in()  # real CuPy's kernels round differently
    for k in ref_arrays:
        if exact:
            assert arrays[k].dtype == ref_arrays[k].dtype
            assert arrays[k].tobytes() == ref_arrays[k].tobytes(), k
        else:
            np.testing.assert_allclose(arrays[k], ref_arrays[k], rtol=1e-3, atol=1e-6, err_msg=k)
    if exact:
        assert json.dumps(meta["history"]["loss"]) == json.dumps(ref_meta["history"]["loss"])


def test_figures_from_device_arrays(backend, rng):
    fpn = FPN([4, 6, 8, 10], 5, trace=True).to(backend)
    cs = [to_device(rng.standard_normal((1, c, s, s)).astype(np.float32), backend)
          for c, s in zip([4, 6, 8, 10], [16, 8, 4, 2])]
    out = fpn(cs)
    fpn.backward([get_array_module(o).ones_like(o) for o in out])
    for traced in (fpn.maps, fpn.grads):
        fig = viz.plot_pyramid(traced)
        assert sum(len(ax.images) for ax in fig.axes) == len(traced) == 20
        matplotlib.pyplot.close(fig)
    images = to_device(rng.random((2, 1, 64, 64)).astype(np.float32), backend)
    boxes = to_device(np.array([[1.0, 2.0, 11.0, 22.0]], np.float32), backend)
    detections = [{"boxes": boxes, "scores": to_device(np.array([0.9], np.float32), backend),
                   "labels": to_device(np.array([7]), backend)}] * 2
    truths = [{"boxes": boxes, "labels": to_device(np.array([7]), backend)}] * 2
    fig = viz.plot_detections(images, detections, truths, columns=2)
    for ax in fig.axes[:2]:
        rects = [p for p in ax.patches]
        assert len(rects) == 2  # the true box and the prediction
        assert [(r.get_x(), r.get_y(), r.get_width(), r.get_height()) for r in rects] == \
            [(0.5, 1.5, 10.0, 20.0)] * 2
        assert [t.get_text() for t in ax.texts] == ["7", "7 0.90"]  # the true digit, the prediction
    matplotlib.pyplot.close(fig)
    history = {"iteration": [1, 2, 3], "loss": [3.0, 2.0, 1.0], "cls": [2.0, 1.5, 0.8],
               "box": [1.0, 0.5, 0.2]}
    matplotlib.pyplot.close(viz.plot_loss_curve(history))


# ---- synchronisations per training step ---------------------------------------------------------

def test_a_training_step_synchronises_only_for_the_loss_and_the_finite_checks(stand_in, tmp_path,
                                                                              monkeypatch):
    """A step reads from the device only what the host must see: the loss (its parts and the
    input checks' flags in one copy) and one batched finite check of the weights, never one per
    parameter, per level, per input check or per upsample."""
    counts = []
    original = Detector.loss

    def counting_loss(self, *args, **kwargs):
        counts.append(strict_cupy.sync_count())
        return original(self, *args, **kwargs)
    monkeypatch.setattr(Detector, "loss", counting_loss)
    det = tiny_detector("cupy")
    config = TrainConfig(iterations=4, batch_size=2, lr=0.01, warmup=2, checkpoint_every=100)
    strict_cupy.reset_sync_count()
    train(det, config, str(tmp_path), progress=False, log=lambda *a: None)
    per_step = np.diff(counts)  # from one step's loss to the next: loss, backward, step, checks
    assert per_step.tolist() == [SYNCS_PER_STEP] * 3


# ---- device operations (kernel launches), counted by the stand-in -----------------------------

def test_the_stand_in_counts_kernels_not_views(stand_in):
    x = to_device(np.arange(24.0).reshape(2, 3, 4), "cupy")
    strict_cupy.reset_launch_count()
    x.reshape(6, 4).transpose(1, 0)[1:, ::2]  # views: no kernel
    assert strict_cupy.launch_count() == 0
    y = x * 2.0  # one elementwise kernel
    y.sum()  # one reduction
    x[:, [0, 2]]  # a fancy-index gather
    strict_cupy.add(y, x, out=y)  # one kernel, written in place
    assert strict_cupy.launch_count() == 4


def test_col2im_adds_each_kernel_offset_in_place(stand_in):
    """col2im of a 3x3 kernel with padding: one zeroed buffer, one add per kernel offset (no
    copy back, as `+=` on a slice would make), one copy to crop the padding: 11 operations."""
    from minifpn.functional.conv import col2im
    col = to_device(np.ones((2, 3, 3, 1, 4, 4)), "cupy")
    strict_cupy.reset_launch_count()
    dx = col2im(col, (1, 2, 4, 4), stride=1, padding=1)
    assert strict_cupy.launch_count() == 1 + 9 + 1
    # each pixel gets one contribution per kernel offset whose window covers it: 9 in the middle
    assert float(to_numpy(dx)[0, 0, 1:3, 1:3].min()) == 9.0
