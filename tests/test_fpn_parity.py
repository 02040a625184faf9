"""The FPN and the ResNet-18-width backbone against torchvision, with the same weights."""
from collections import OrderedDict

import numpy as np
import pytest
from torch_helpers import torch

from minifpn.interop import (
    fpn_from_torchvision,
    fpn_to_torchvision,
    resnet_from_torchvision,
    resnet_to_torchvision,
)
from minifpn.models import FPN, resnet18

tv_ops = pytest.importorskip("torchvision.ops", reason="torchvision is not installed")
tv_fpn = pytest.importorskip("torchvision.ops.feature_pyramid_network")
tv_models = pytest.importorskip("torchvision.models")

WIDTHS = [64, 128, 256, 512]


def pyramid_sizes(h, w):
    """C2..C5 sizes of a ResNet on an h x w image: four ceil-halvings after the stride-4 stem."""
    sizes, (h, w) = [], ((h + 1) // 2, (w + 1) // 2)  # conv1, stride 2
    h, w = (h + 1) // 2, (w + 1) // 2  # max-pool, stride 2
    for stage in range(4):
        if stage:
            h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


def test_pyramid_sizes_of_an_odd_image():
    assert pyramid_sizes(97, 75) == [(25, 19), (13, 10), (7, 5), (4, 3)]
    assert pyramid_sizes(128, 128) == [(32, 32), (16, 16), (8, 8), (4, 4)]


def torchvision_fpn(extra_block, in_channels, d):
    extra = {"maxpool": tv_fpn.LastLevelMaxPool(), "p6p7": tv_fpn.LastLevelP6P7(d, d),
             "p6p7_c5": tv_fpn.LastLevelP6P7(in_channels[-1], d)}[extra_block]
    return tv_ops.FeaturePyramidNetwork(in_channels, d, extra_blocks=extra)


@pytest.mark.parametrize("image_size", [(128, 128), (97, 75), (64, 96)])
@pytest.mark.parametrize("extra_block", ["maxpool", "p6p7", "p6p7_c5"])
def test_fpn_matches_torchvision(image_size, extra_block, rng):
    torch.manual_seed(0)
    d = 32
    theirs = torchvision_fpn(extra_block, WIDTHS, d)
    ours = FPN(WIDTHS, d, extra_block="maxpool" if extra_block == "maxpool" else "p6p7",
               p6p7_from="c5" if extra_block == "p6p7_c5" else "p5")
    assert extra_block != "p6p7_c5" or not ours.extra_blocks.use_P5
    ours.load_state_dict(fpn_from_torchvision(theirs.state_dict()))
    features = [rng.standard_normal((2, c, h, w)).astype(np.float32)
                for c, (h, w) in zip(WIDTHS, pyramid_sizes(*image_size))]
    t_features = [torch.tensor(c, requires_grad=True) for c in features]

    outputs = ours(features)
    t_outputs = list(theirs(OrderedDict((f"c{i}", c) for i, c in enumerate(t_features))).values())
    assert len(outputs) == len(t_outputs) == (5 if extra_block == "maxpool" else 6)
    douts = [rng.standard_normal(o.shape).astype(np.float32) for o in outputs]
    d_features = ours.backward(douts)
    torch.autograd.backward(t_outputs, [torch.tensor(g) for g in douts])

    for name, o, t in zip(ours.output_names, outputs, t_outputs):
        t = t.detach().numpy()
        assert o.shape == t.shape and o.dtype == t.dtype == np.float32, name
        assert np.abs(o - t).max() < 1e-5 * np.abs(t).max(), name
    for k, dc, tc in zip(range(2, 6), d_features, t_features):
        g = tc.grad.numpy()
        assert np.abs(dc - g).max() < 1e-5 * np.abs(g).max(), f"dC{k}"
    t_params = fpn_from_torchvision({n: p.grad for n, p in theirs.named_parameters()})
    assert set(t_params) == {n for n, _ in ours.named_parameters()}
    for name, p in ours.named_parameters():
        g = t_params[name]
        assert np.abs(p.grad - g).max() < 1e-5 * np.abs(g).max(), name


def test_state_dict_converts_both_torchvision_layouts(rng):
    ours = FPN([8, 16, 32, 64], 16, extra_block="p6p7")
    new = fpn_to_torchvision(ours.state_dict(), layout="new")
    old = fpn_to_torchvision(ours.state_dict(), layout="old", as_torch=False)
    assert "inner_blocks.0.0.weight" in new and "layer_blocks.3.0.bias" in new
    assert "inner_blocks.0.weight" in old and "extra_blocks.p7.weight" in old
    theirs = torchvision_fpn("p6p7", [8, 16, 32, 64], 16)
    theirs.load_state_dict(new)  # strict: every key matches torchvision's own
    assert list(ours.state_dict()) == list(fpn_from_torchvision(theirs.state_dict()))
    for key, value in fpn_from_torchvision(old).items():
        np.testing.assert_array_equal(value, ours.state_dict()[key])


def randomize_batch_norm(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)


def torchvision_stages(model, x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    outs = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = layer(x)
        outs.append(x)
    return outs


@pytest.mark.parametrize("image_size", [(64, 64), (97, 75)])
def test_resnet18_backbone_matches_torchvision_in_eval_mode(image_size, rng):
    torch.manual_seed(0)
    theirs = tv_models.resnet18(weights=None).eval()
    randomize_batch_norm(theirs)
    ours = resnet18().eval()
    ours.load_state_dict(resnet_from_torchvision(theirs.state_dict()))
    x = rng.standard_normal((2, 3, *image_size)).astype(np.float32)
    with torch.no_grad():
        expected = torchvision_stages(theirs, torch.tensor(x))
    for k, c, t in zip(range(2, 6), ours(x), expected):
        t = t.numpy()
        assert c.shape == t.shape, f"C{k}"
        assert np.abs(c - t).max() < 1e-5 * np.abs(t).max(), f"C{k}"
    assert set(resnet_to_torchvision(ours.state_dict())) == {
        k for k in theirs.state_dict() if not k.startswith("fc.")}


def test_resnet18_backbone_gradients_match_torch_in_training_mode(rng):
    """In float64: in float32 a ReLU or max-pool decision that flips on a rounding difference
    of 1e-7 reroutes part of the gradient, and through 20 layers that shows as a few 1e-3;
    float64 agrees to 1e-12 and so separates a real error from rounding."""
    torch.manual_seed(1)
    theirs = tv_models.resnet18(weights=None).train().double()
    ours = resnet18().train().to(dtype=np.float64)
    ours.load_state_dict(resnet_from_torchvision(theirs.state_dict()))
    x = rng.standard_normal((2, 3, 64, 64))
    tx = torch.tensor(x, requires_grad=True)
    features, t_features = ours(x), torchvision_stages(theirs, tx)
    douts = [rng.standard_normal(c.shape) for c in features]
    ours.zero_grad()
    dx = ours.backward(douts)
    torch.autograd.backward(t_features, [torch.tensor(g) for g in douts])
    assert np.abs(dx - tx.grad.numpy()).max() < 1e-12 * np.abs(tx.grad.numpy()).max()
    t_grads = {n: p.grad.numpy() for n, p in theirs.named_parameters() if not n.startswith("fc.")}
    for name, p in ours.named_parameters():
        assert np.abs(p.grad - t_grads[name]).max() < 1e-12 * np.abs(t_grads[name]).max(), name
    t_state = theirs.state_dict()
    for name, value in ours.state_dict().items():  # running statistics moved the same way
        np.testing.assert_allclose(value, t_state[name].numpy(), rtol=1e-12, atol=1e-14,
                                   err_msg=name)
