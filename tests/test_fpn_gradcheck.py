"""Float64 gradient checks of the whole bottom-up ResNet + FPN, for every variant and extra block.

Step h = 1e-6 here (not the ops' 1e-5): a perturbation of an early weight moves thousands of
activations at once, and a larger step more often carries one of them across a ReLU or max-pool
kink, where central differences are not a derivative. Tolerance stays 1e-6.
"""
import numpy as np
import pytest

from minifpn.gradcheck import directional_check, numerical_gradient, rel_error
from minifpn.models import FPN, BasicBlock, ResNet

H_STEP, TOL = 1e-6, 1e-6
CONFIGS = [("fpn", "maxpool"), ("fpn", "p6p7"), ("fpn", None), ("bottom_up", "maxpool"),
           ("no_lateral", "maxpool"), ("p2_only", None)]


def tiny_backbone_and_fpn(variant, extra_block, fuse="sum"):
    backbone = ResNet((4, 4, 6, 8), (1, 1, 1, 1), in_channels=2, stem_kernel=3, seed=1)
    fpn = FPN([4, 4, 6, 8], 3, extra_block=extra_block, variant=variant, fuse=fuse, seed=2)
    return backbone.to(dtype=np.float64), fpn.to(dtype=np.float64)


@pytest.mark.parametrize("variant,extra_block", CONFIGS)
def test_backbone_and_fpn_gradients(variant, extra_block, rng):
    backbone, fpn = tiny_backbone_and_fpn(variant, extra_block)
    x = rng.standard_normal((2, 2, 35, 33))  # odd sizes: C2..C5 are 9x9, 5x5, 3x3, 2x2
    outputs = fpn(backbone(x))
    assert len(outputs) == len(fpn.output_names)
    douts = [rng.standard_normal(o.shape) for o in outputs]
    backbone.zero_grad()
    fpn.zero_grad()
    dx = backbone.backward(fpn.backward(douts))

    def forward_all():
        return np.concatenate([o.ravel() for o in fpn(backbone(x))])

    dout_flat = np.concatenate([d.ravel() for d in douts])
    checked = list(fpn.named_parameters()) + [
        ("backbone.conv1.weight", backbone.conv1.weight),
        ("backbone.layer2.0.downsample.0.weight", backbone.layer2[0].downsample[0].weight),
        ("backbone.layer4.0.bn2.weight", backbone.layer4[0].bn2.weight)]
    errors = {}
    for name, p in checked:
        analytic = p.grad.copy()
        numeric = numerical_gradient(forward_all, p.data, dout_flat, H_STEP)
        errors[name] = rel_error(analytic, numeric)
    for i in range(3):  # the image: 4620 entries, so along random directions
        errors[f"x (direction {i})"] = directional_check(forward_all, x, dx, dout_flat, H_STEP, rng)
    assert max(errors.values()) < TOL, {k: v for k, v in errors.items() if v >= TOL}
    assert len(errors) >= 11


@pytest.mark.parametrize("fuse", ["avg"])
def test_avg_fuse_gradients(fuse, rng):
    _, fpn = tiny_backbone_and_fpn("fpn", "maxpool", fuse)
    features = [rng.standard_normal((2, c, s, s)) for c, s in zip([4, 4, 6, 8], [9, 5, 3, 2])]
    outputs = fpn(features)
    douts = [rng.standard_normal(o.shape) for o in outputs]
    fpn.zero_grad()
    d_features = fpn.backward(douts)

    def forward_all():
        return np.concatenate([o.ravel() for o in fpn(features)])

    flat = np.concatenate([d.ravel() for d in douts])
    for c, dc in zip(features, d_features):
        assert rel_error(dc, numerical_gradient(forward_all, c, flat, H_STEP)) < TOL
    for name, p in fpn.named_parameters():
        g = p.grad.copy()
        assert rel_error(g, numerical_gradient(forward_all, p.data, flat, H_STEP)) < TOL, name


@pytest.mark.parametrize("stride,in_c,out_c", [(1, 3, 3), (2, 3, 4), (1, 2, 4)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_basic_block_gradients(stride, in_c, out_c, training, rng):
    block = BasicBlock(in_c, out_c, stride, rng=rng).to(dtype=np.float64).train(training)
    for m in block.modules():
        if hasattr(m, "running_var"):
            m.running_mean[...] = rng.standard_normal(m.num_features) * 0.1
            m.running_var[...] = rng.uniform(0.5, 2, m.num_features)
    x = rng.standard_normal((2, in_c, 7, 6))
    out = block(x)
    dout = rng.standard_normal(out.shape)
    block.zero_grad()
    dx = block.backward(dout)
    assert (block.downsample is not None) == (stride != 1 or in_c != out_c)
    assert rel_error(dx, numerical_gradient(lambda: block(x), x, dout, H_STEP)) < TOL
    for name, p in block.named_parameters():
        g = p.grad.copy()
        assert rel_error(g, numerical_gradient(lambda: block(x), p.data, dout, H_STEP)) < TOL, name


def test_backbone_accepts_missing_level_gradients(rng):
    backbone = ResNet((4, 4, 6, 8), (1, 1, 1, 1), in_channels=2, stem_kernel=3).to(dtype=np.float64)
    x = rng.standard_normal((2, 2, 35, 33))
    c2, c3, c4, c5 = backbone(x)
    d4 = rng.standard_normal(c4.shape)
    backbone.zero_grad()
    dx = backbone.backward([None, None, d4, None])
    assert not backbone.layer4[0].conv1.weight.grad.any()  # layer4 is above C4: no gradient
    assert backbone.layer3[0].conv1.weight.grad.any()
    for _ in range(3):  # 4620 entries: along random directions
        assert directional_check(lambda: backbone(x)[2], x, dx, d4, H_STEP, rng) < TOL
