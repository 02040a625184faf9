"""The Fast R-CNN part of the two-stage detector: RoI sampling and targets (hand-made cases whose
answer is stated, and torchvision's matcher and box coder), the 2fc head (float64 gradient check,
TOL = 1e-6; parity with torchvision's TwoMLPHead + FastRCNNPredictor loaded with the same
weights), the loss (gradient check; parity with torchvision's fastrcnn_loss, values and autograd
gradients), and the detections (parity with RoIHeads.postprocess_detections)."""
import numpy as np
import pytest

from minifpn import nn
from minifpn.backend import get_array_module, to_device, to_numpy
from minifpn.detection import box_iou
from minifpn.detection.roi_targets import (
    BOX_CODER_WEIGHTS,
    decode_detections,
    decode_rois,
    encode_rois,
    match_rois,
    sample_rois,
)
from minifpn.gradcheck import check, check_module
from minifpn.models import FastRCNNHead, fast_rcnn_loss, fast_rcnn_loss_backward

TOL = 1e-6
TORCH_REASON = "PyTorch/torchvision are not installed: parity tests need them (pip install -e .[parity])"

# ---- a hand-made image: two digits, eight proposals whose IoUs are worked out below ----------
GT_BOXES = np.array([[10.0, 10, 30, 30], [60, 60, 100, 100]])  # 20 x 20 and 40 x 40
GT_LABELS = np.array([3, 7])  # digits 3 and 7: classes 4 and 8
PROPOSALS = np.array([
    [10.0, 10, 30, 30],   # p0: gt0 itself, IoU 1                               -> positive, 4
    [12, 10, 32, 30],     # p1: gt0 moved 2 px right, IoU 360 / 440 = 0.82      -> positive, 4
    [20, 10, 40, 30],     # p2: gt0 moved 10 px, IoU 200 / 600 = 0.33           -> background
    [60, 60, 100, 90],    # p3: gt1 without its bottom 10 px, IoU 1200 / 1600    -> positive, 8
    [0, 100, 20, 120],    # p4: touches nothing, IoU 0                          -> background
    [60, 60, 80, 80],     # p5: a quarter of gt1, IoU 400 / 1600 = 0.25         -> background
    [60, 60, 100, 80],    # p6: half of gt1, IoU 800 / 1600 = 0.5 exactly        -> positive, 8
    [61, 60, 100, 80],    # p7: just under half of gt1, IoU 780 / 1600 = 0.49    -> background
])
# the 8 proposals, then the 2 appended ground-truth boxes (positives of their own class)
ALL_LABELS = np.array([4, 4, 0, 8, 0, 0, 8, 0, 4, 8])


def test_match_rois_labels_the_hand_made_case():
    candidates = np.concatenate([PROPOSALS, GT_BOXES])
    labels, matched = match_rois(candidates, GT_BOXES)
    np.testing.assert_array_equal(labels, [1, 1, 0, 1, 0, 0, 1, 0, 1, 1])
    np.testing.assert_array_equal(matched, [0, 0, -1, 1, -1, -1, 1, -1, 0, 1])
    # Fast R-CNN's background interval [0.1, 0.5): p4 (IoU 0) is ignored
    labels, _ = match_rois(candidates, GT_BOXES, bg_iou=(0.1, 0.5))
    np.testing.assert_array_equal(labels, [1, 1, 0, 1, -1, 0, 1, 0, 1, 1])
    # a gap between background and object: p6 (0.5) and p7 (0.49) fall in it
    labels, _ = match_rois(candidates, GT_BOXES, fg_iou=0.6, bg_iou=(0.0, 0.4))
    np.testing.assert_array_equal(labels, [1, 1, 0, 1, 0, 0, -1, -1, 1, 1])


def test_sample_rois_keeps_everything_when_the_batch_is_large():
    rois, labels, targets = sample_rois(PROPOSALS, GT_BOXES, GT_LABELS, np.random.default_rng(0),
                                        batch_size_per_image=100)
    np.testing.assert_array_equal(rois, np.concatenate([PROPOSALS, GT_BOXES]))  # gt appended
    np.testing.assert_array_equal(labels, ALL_LABELS)
    # p1 is gt0 moved 2 px right (centre 22 vs 20, width 20): dx = -2/20 * 10 = -1
    np.testing.assert_allclose(targets[1], [-1.0, 0, 0, 0], atol=1e-12)
    # p3 is gt1 without its bottom 10 px (centre y 75 vs 80, height 30 vs 40):
    # dy = 5/30 * 10, dh = log(40/30) * 5
    np.testing.assert_allclose(targets[3], [0, 50 / 30, 0, 5 * np.log(4 / 3)], atol=1e-12)
    for r in (0, 8, 9):  # a box on itself: zero deltas
        np.testing.assert_array_equal(targets[r], 0)
    np.testing.assert_array_equal(targets[labels == 0], 0)  # background learns no box


def test_sample_rois_takes_at_most_a_quarter_positives():
    # 6 positives, 4 negatives; 8 RoIs at 25% positive: 2 positives and all 4 negatives
    for seed in range(5):
        rois, labels, targets = sample_rois(PROPOSALS, GT_BOXES, GT_LABELS,
                                            np.random.default_rng(seed), batch_size_per_image=8)
        assert len(rois) == 6
        assert (labels > 0).sum() == 2 and (labels == 0).sum() == 4
        candidates = np.concatenate([PROPOSALS, GT_BOXES])
        for roi, label in zip(rois, labels):  # every sampled RoI keeps its own label
            row = np.flatnonzero((candidates == roi).all(axis=1))[0]
            assert label == ALL_LABELS[row]


def test_sample_rois_fractions_on_a_random_scene():
    rng = np.random.default_rng(3)
    gt = np.array([[5.0, 5, 25, 30], [40, 50, 90, 100], [100, 10, 120, 28]])
    gt_labels = np.array([0, 5, 9])
    centres = rng.uniform(0, 128, (600, 2))
    sizes = rng.uniform(4, 60, (600, 2))
    proposals = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
    jittered = gt.repeat(40, axis=0) + rng.normal(0, 1.5, (120, 4))  # 40 near each digit
    proposals = np.concatenate([proposals, jittered])
    rois, labels, targets = sample_rois(proposals, gt, gt_labels, rng)
    iou = box_iou(rois, gt)
    assert len(rois) == 128
    assert (labels > 0).sum() == 32  # 25% of 128: there are more than 32 positives to draw from
    best = iou.argmax(axis=1)
    assert (iou.max(axis=1)[labels > 0] >= 0.5).all()
    assert (iou.max(axis=1)[labels == 0] < 0.5).all()
    np.testing.assert_array_equal(labels[labels > 0], 1 + gt_labels[best[labels > 0]])
    # the targets decode back onto the matched boxes
    positive = labels > 0
    np.testing.assert_allclose(decode_rois(targets[positive], rois[positive]), gt[best[positive]],
                               atol=1e-9)


def test_sample_rois_without_objects_is_all_background():
    rois, labels, targets = sample_rois(PROPOSALS, np.zeros((0, 4)), np.zeros(0, np.int64),
                                        np.random.default_rng(0), batch_size_per_image=5)
    assert len(rois) == 5 and not labels.any() and not targets.any()
    rois, labels, targets = sample_rois(np.zeros((0, 4)), GT_BOXES, GT_LABELS,
                                        np.random.default_rng(0))
    np.testing.assert_array_equal(rois, GT_BOXES)  # no proposals: the boxes themselves
    np.testing.assert_array_equal(labels, [4, 8])


def test_matching_agrees_with_torchvision():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads", reason=TORCH_REASON)
    heads = roi_heads.RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100)
    rng = np.random.default_rng(7)
    proposals = np.concatenate([GT_BOXES.repeat(30, axis=0) + rng.normal(0, 4, (60, 4)),
                                rng.uniform(0, 64, (40, 2)).repeat(2, axis=1) + [0, 0, 30, 30]])
    candidates = np.concatenate([proposals, GT_BOXES])
    _, t_labels = heads.assign_targets_to_proposals(
        [torch.tensor(candidates)], [torch.tensor(GT_BOXES)], [torch.tensor(GT_LABELS + 1)])
    labels, matched = match_rois(candidates, GT_BOXES)
    ours = np.where(labels == 1, 1 + GT_LABELS[matched], 0)
    np.testing.assert_array_equal(ours, t_labels[0].numpy())
    assert 0 < (ours > 0).sum() < len(ours)


def test_box_coder_matches_torchvision_and_round_trips():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    utils = pytest.importorskip("torchvision.models.detection._utils", reason=TORCH_REASON)
    rng = np.random.default_rng(0)
    rois = np.concatenate([rng.uniform(0, 100, (20, 2)), rng.uniform(2, 40, (20, 2))], axis=1)
    rois[:, 2:] += rois[:, :2]
    gt = rois + rng.normal(0, 3, rois.shape)
    coder = utils.BoxCoder(BOX_CODER_WEIGHTS)
    targets = encode_rois(gt, rois)
    np.testing.assert_allclose(targets, coder.encode_single(torch.tensor(gt), torch.tensor(rois)).numpy(),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(decode_rois(targets, rois), gt, atol=1e-9)
    deltas = rng.normal(0, 2, (20, 4))
    np.testing.assert_allclose(decode_rois(deltas, rois),
                               coder.decode_single(torch.tensor(deltas), torch.tensor(rois)).numpy(),
                               rtol=1e-12, atol=1e-9)


# ---- the head ----------------------------------------------------------------------------------
class Joined(nn.Module):
    """The head's two outputs side by side, (R, (K + 1) + 4 (K + 1)), so that check_module (one
    output) sees every gradient; its backward splits the upstream gradient again."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        cls, box = self.head(x)
        self.split = cls.shape[1]
        return get_array_module(cls).concatenate([cls, box], axis=1)

    def backward(self, dout):
        return self.head.backward((dout[:, :self.split], dout[:, self.split:]))


def small_head(dtype=np.float64, **kwargs):
    args = dict(in_channels=2, pool_size=3, hidden=5, num_classes=3, dtype=dtype, seed=1)
    return FastRCNNHead(**{**args, **kwargs})


def test_head_shapes_and_names():
    head = FastRCNNHead()  # 64 channels, 7 x 7, hidden 256, 10 digits
    cls, box = head(np.zeros((3, 64, 7, 7), np.float32))
    assert cls.shape == (3, 11) and box.shape == (3, 44)
    assert cls.dtype == box.dtype == np.float32
    assert [(n, p.shape) for n, p in head.named_parameters()] == [
        ("fc6.weight", (256, 3136)), ("fc6.bias", (256,)), ("fc7.weight", (256, 256)),
        ("fc7.bias", (256,)), ("cls_score.weight", (11, 256)), ("cls_score.bias", (11,)),
        ("bbox_pred.weight", (44, 256)), ("bbox_pred.bias", (44,))]
    # Detectron's predictor init: small weights, zero biases
    assert abs(head.cls_score.weight.data.std() - 0.01) < 0.001
    assert abs(head.bbox_pred.weight.data.std() - 0.001) < 0.0001
    assert not head.cls_score.bias.data.any() and not head.bbox_pred.bias.data.any()
    assert abs(np.abs(head.fc6.weight.data).max() - 1 / 56) < 1e-4  # U(+-1/sqrt(3136))


def test_head_gradients(backend, rng):
    head = small_head().to(backend)
    for p in head.parameters():  # non-trivial predictor weights too (init makes them tiny)
        p.data[...] = to_device(rng.standard_normal(p.shape) * 0.5, backend)
    x = to_device(rng.standard_normal((4, 2, 3, 3)), backend)
    result = check_module("FastRCNNHead", "(4, 2, 3, 3)", Joined(head), x, tol=TOL)
    assert set(result.errors) == {"input"} | {f"head.{n}" for n, _ in head.named_parameters()}
    assert result.max_error < TOL, result.errors


def test_head_backward_adds_to_grad_and_keeps_dout(backend, rng):
    head = small_head().to(backend)
    x = to_device(rng.standard_normal((4, 2, 3, 3)), backend)
    d_cls = to_device(rng.standard_normal((4, 4)), backend)
    d_box = to_device(rng.standard_normal((4, 16)), backend)
    before = to_numpy(d_cls).copy(), to_numpy(d_box).copy()
    head(x)
    head.backward((d_cls, d_box))
    once = to_numpy(head.fc6.weight.grad).copy()
    head.backward((d_cls, d_box))
    np.testing.assert_allclose(to_numpy(head.fc6.weight.grad), 2 * once, rtol=1e-12)
    np.testing.assert_array_equal(to_numpy(d_cls), before[0])
    np.testing.assert_array_equal(to_numpy(d_box), before[1])


def test_head_with_zero_rois(backend):
    head = small_head(np.float32).to(backend)
    cls, box = head(to_device(np.zeros((0, 2, 3, 3), np.float32), backend))
    assert cls.shape == (0, 4) and box.shape == (0, 16)
    dx = head.backward((to_device(np.zeros((0, 4), np.float32), backend),
                        to_device(np.zeros((0, 16), np.float32), backend)))
    assert dx.shape == (0, 2, 3, 3)
    assert not any(to_numpy(p.grad).any() for p in head.parameters())


def test_head_errors():
    head = small_head(np.float32)
    with pytest.raises(nn.BackwardBeforeForward, match="FastRCNNHead.backward called before forward"):
        head.backward((np.zeros((1, 4), np.float32), np.zeros((1, 16), np.float32)))
    with pytest.raises(ValueError, match=r"expected features of shape \(R, 2, 3, 3\).*got \(1, 3, 3, 3\)"):
        head(np.zeros((1, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected features of shape \(R, 2, 3, 3\).*got \(1, 2, 7, 7\)"):
        head(np.zeros((1, 2, 7, 7), np.float32))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) \(4 dims\), got shape \(1, 18\)"):
        head(np.zeros((1, 18), np.float32))
    with pytest.raises(TypeError, match="input=float64, weight=float32"):
        head(np.zeros((1, 2, 3, 3)))
    with pytest.raises(ValueError, match="FastRCNNHead: num_classes must be >= 1, got 0"):
        FastRCNNHead(num_classes=0)
    with pytest.raises(ValueError, match="FastRCNNHead: hidden must be an int"):
        FastRCNNHead(hidden=25.5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_head_matches_torchvision(dtype, backend, rng):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    faster_rcnn = pytest.importorskip("torchvision.models.detection.faster_rcnn", reason=TORCH_REASON)
    C, P, D, K = 4, 7, 32, 10
    t_dtype = torch.float64 if dtype == np.float64 else torch.float32
    box_head = faster_rcnn.TwoMLPHead(C * P * P, D).to(t_dtype)
    predictor = faster_rcnn.FastRCNNPredictor(D, K + 1).to(t_dtype)
    ours = FastRCNNHead(C, P, D, K, dtype=dtype)
    ours.load_state_dict({**box_head.state_dict(), **predictor.state_dict()})
    ours.to(backend)
    x = rng.standard_normal((6, C, P, P)).astype(dtype)
    cls, box = ours(to_device(x, backend))
    d_cls = rng.standard_normal(cls.shape).astype(dtype)
    d_box = rng.standard_normal(box.shape).astype(dtype)
    dx = ours.backward((to_device(d_cls, backend), to_device(d_box, backend)))

    tx = torch.tensor(x, requires_grad=True)
    t_cls, t_box = predictor(box_head(tx))
    torch.autograd.backward([t_cls, t_box], [torch.tensor(d_cls), torch.tensor(d_box)])
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(cls), t_cls.detach().numpy(), **tol)
    np.testing.assert_allclose(to_numpy(box), t_box.detach().numpy(), **tol)
    np.testing.assert_allclose(to_numpy(dx), tx.grad.numpy(), **tol)
    theirs = {**dict(box_head.named_parameters()), **dict(predictor.named_parameters())}
    for name, p in ours.named_parameters():
        assert to_numpy(p.grad).dtype == dtype
        np.testing.assert_allclose(to_numpy(p.grad), theirs[name].grad.numpy(), err_msg=name, **tol)


# ---- the loss -----------------------------------------------------------------------------------
def loss_inputs(rng, R=12, K=3, dtype=np.float64):
    cls = rng.standard_normal((R, K + 1)).astype(dtype)
    box = rng.standard_normal((R, 4 * (K + 1))).astype(dtype)
    labels = rng.integers(0, K + 1, R)
    labels[:3] = [0, 2, 0]  # at least one background and one object
    targets = rng.standard_normal((R, 4)) * np.where(labels > 0, 1.0, 0.0)[:, None]
    return cls, box, labels, targets


def test_loss_by_hand():
    # 2 RoIs, K = 1: RoI 0 is background, RoI 1 is class 1 with target deltas 0
    cls = np.array([[0.0, 0.0], [0.0, 0.0]])
    box = np.zeros((2, 8))
    box[1, 4:] = [1.0, 0.05, 0.0, -2.0]  # class 1's deltas of RoI 1
    box[1, :4] = 7.0  # its background deltas: never trained
    box[0] = 9.0  # a background RoI's deltas: never trained
    (loss_cls, loss_box), cache = fast_rcnn_loss(cls, box, np.array([0, 1]), np.zeros((2, 4)))
    np.testing.assert_allclose(loss_cls, np.log(2))  # two uniform rows, divided by R = 2
    beta = 1 / 9
    # |1| - beta/2, 0.5 * 0.05^2 / beta, 0, |2| - beta/2; summed, divided by R = 2
    expected = ((1 - beta / 2) + 0.5 * 0.05 ** 2 / beta + (2 - beta / 2)) / 2
    np.testing.assert_allclose(loss_box, expected)
    d_cls, d_box = fast_rcnn_loss_backward(cache)
    np.testing.assert_allclose(d_cls, [[-0.25, 0.25], [0.25, -0.25]])
    expected_box = np.zeros((2, 8))
    expected_box[1, 4:] = [1 / 2, 0.05 / beta / 2, 0, -1 / 2]
    np.testing.assert_allclose(d_box, expected_box)


def test_loss_gradients(backend, rng):
    cls, box, labels, targets = loss_inputs(rng)
    state = {}

    def forward(cls_score, bbox_pred):
        (loss_cls, loss_box), state["cache"] = fast_rcnn_loss(cls_score, bbox_pred, labels, targets)
        return loss_cls + loss_box

    def backward(dout):
        d_cls, d_box = fast_rcnn_loss_backward(state["cache"], dout)
        return {"cls_score": d_cls, "bbox_pred": d_box}

    inputs = {"cls_score": to_device(cls, backend), "bbox_pred": to_device(box, backend)}
    result = check("fast_rcnn_loss", "", forward, backward, inputs, tol=TOL)
    assert result.max_error < TOL, result.errors


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_loss_matches_torchvision(dtype, backend, rng):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads", reason=TORCH_REASON)
    cls, box, labels, targets = loss_inputs(rng, R=40, K=10, dtype=dtype)
    (loss_cls, loss_box), cache = fast_rcnn_loss(to_device(cls, backend), to_device(box, backend),
                                                 labels, targets)
    d_cls, d_box = fast_rcnn_loss_backward(cache)
    t_cls, t_box = torch.tensor(cls, requires_grad=True), torch.tensor(box, requires_grad=True)
    t_loss_cls, t_loss_box = roi_heads.fastrcnn_loss(t_cls, t_box, [torch.tensor(labels)],
                                                     [torch.tensor(targets.astype(dtype))])
    (t_loss_cls + t_loss_box).backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    assert to_numpy(loss_cls).dtype == to_numpy(d_box).dtype == dtype
    np.testing.assert_allclose(to_numpy(loss_cls), t_loss_cls.item(), **tol)
    np.testing.assert_allclose(to_numpy(loss_box), t_loss_box.item(), **tol)
    np.testing.assert_allclose(to_numpy(d_cls), t_cls.grad.numpy(), **tol)
    np.testing.assert_allclose(to_numpy(d_box), t_box.grad.numpy(), **tol)


def test_loss_with_no_rois_or_no_positives(backend):
    (loss_cls, loss_box), cache = fast_rcnn_loss(
        to_device(np.zeros((0, 4)), backend), to_device(np.zeros((0, 16)), backend),
        np.zeros(0, np.int64), np.zeros((0, 4)))
    assert float(to_numpy(loss_cls)) == float(to_numpy(loss_box)) == 0.0
    d_cls, d_box = fast_rcnn_loss_backward(cache)
    assert d_cls.shape == (0, 4) and d_box.shape == (0, 16)
    (_, loss_box), cache = fast_rcnn_loss(to_device(np.zeros((3, 4)), backend),
                                          to_device(np.ones((3, 16)), backend),
                                          np.zeros(3, np.int64), np.ones((3, 4)))
    assert float(to_numpy(loss_box)) == 0.0
    assert not to_numpy(fast_rcnn_loss_backward(cache)[1]).any()


def test_loss_errors():
    cls, box = np.zeros((3, 4)), np.zeros((3, 16))
    labels, targets = np.array([0, 1, 3]), np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"bbox_pred of shape \(R, 4 \* \(K \+ 1\)\) = \(3, 16\)"
                                         r".*got \(3, 12\)"):
        fast_rcnn_loss(cls, np.zeros((3, 12)), labels, targets)
    with pytest.raises(ValueError, match=r"labels \(R,\) = \(3,\).*got \(2,\) and \(3, 4\)"):
        fast_rcnn_loss(cls, box, labels[:2], targets)
    with pytest.raises(ValueError, match=r"integers in \[0, K \+ 1\) = \[0, 4\).*range \[0, 4\]"):
        fast_rcnn_loss(cls, box, np.array([0, 1, 4]), targets)
    with pytest.raises(ValueError, match="got dtype float64"):
        fast_rcnn_loss(cls, box, labels.astype(np.float64), targets)
    with pytest.raises(ValueError, match=r"cls_score of shape \(R, K \+ 1\)"):
        fast_rcnn_loss(np.zeros(4), box, labels, targets)


# ---- detections -----------------------------------------------------------------------------------
def test_decode_detections_by_hand():
    rois = np.array([[10.0, 20, 50, 40], [100, 100, 140, 150]])  # the second crosses the border
    logits = np.array([[0.0, -5.0, 5.0], [0.0, 4.0, -9.0]])  # K = 2
    deltas = np.zeros((2, 12))
    deltas[0, 8:] = [10.0, 0, 0, 0]  # class 2 of RoI 0: move by one width (dx = 10 / wx = 1)
    out = decode_detections(logits, deltas, rois, (128, 128), score_threshold=0.5)
    p_best = np.exp(5) / (1 + np.exp(-5) + np.exp(5))
    np.testing.assert_allclose(out["scores"], [p_best, np.exp(4) / (1 + np.exp(4) + np.exp(-9))])
    np.testing.assert_array_equal(out["labels"], [1, 0])  # class 2 is digit 1, class 1 digit 0
    np.testing.assert_allclose(out["boxes"], [[50, 20, 90, 40], [100, 100, 128, 128]])
    assert out["boxes"].dtype == np.float32 and out["labels"].dtype == np.int64
    empty = decode_detections(np.zeros((0, 3)), np.zeros((0, 12)), np.zeros((0, 4)), (128, 128))
    assert empty["boxes"].shape == (0, 4) and len(empty["scores"]) == len(empty["labels"]) == 0


def test_decode_detections_reads_device_arrays(backend, rng):
    logits, deltas = rng.standard_normal((5, 4)), rng.standard_normal((5, 16))
    rois = np.array([[10.0, 10, 40, 50]] * 5) + np.arange(5)[:, None]
    host = decode_detections(logits, deltas, rois, (64, 64), score_threshold=0.0)
    device = decode_detections(to_device(logits, backend), to_device(deltas, backend),
                               to_device(rois, backend), (64, 64), score_threshold=0.0)
    for key in host:
        np.testing.assert_array_equal(device[key], host[key])
    assert len(host["scores"]) > 0


def test_decode_detections_matches_torchvision():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads", reason=TORCH_REASON)
    rng = np.random.default_rng(11)
    R, K = 60, 4
    corners = rng.uniform(10, 80, (R, 2))
    rois = np.concatenate([corners, corners + rng.uniform(8, 40, (R, 2))], axis=1)
    logits = rng.standard_normal((R, K + 1)) * 2
    deltas = rng.standard_normal((R, 4 * (K + 1)))
    heads = roi_heads.RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.1, 0.4, 25)
    t_boxes, t_scores, t_labels = heads.postprocess_detections(
        torch.tensor(logits), torch.tensor(deltas), [torch.tensor(rois)], [(128, 128)])
    out = decode_detections(logits, deltas, rois, (128, 128), score_threshold=0.1, nms_iou=0.4,
                            max_detections=25)
    assert len(out["scores"]) == 25
    np.testing.assert_allclose(out["scores"], t_scores[0].numpy(), rtol=1e-12)
    np.testing.assert_allclose(out["boxes"], t_boxes[0].numpy(), rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(out["labels"], t_labels[0].numpy() - 1)  # digits, not classes
