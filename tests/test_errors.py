"""Bad input gets a clear error that names what was expected."""
import numpy as np
import pytest

from minifpn import functional as F
from minifpn import nn


def f32(*shape):
    return np.zeros(shape, dtype=np.float32)


def test_wrong_ndim():
    with pytest.raises(ValueError,
                       match=r"conv2d: expected input of shape \(N, C, H, W\).*got shape \(3, 8, 8\)"):
        F.conv2d(f32(3, 8, 8), f32(4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"expected weight of shape \(OC, IC, KH, KW\)"):
        F.conv2d(f32(1, 3, 8, 8), f32(4, 3, 3))
    with pytest.raises(ValueError, match=r"max_pool2d: expected input of shape \(N, C, H, W\)"):
        F.max_pool2d(f32(8, 8), 2)
    with pytest.raises(ValueError, match=r"upsample_nearest: expected input of shape"):
        F.upsample_nearest(f32(1, 8, 8), (16, 16))
    with pytest.raises(ValueError, match=r"batch_norm: expected input of shape"):
        F.batch_norm(f32(2, 3), f32(3), f32(3), f32(3), f32(3), True)


def test_input_channels_must_match_the_weight():
    with pytest.raises(ValueError, match=r"input has 5 channels but weight .*\(4, 3, 3, 3\) expects IC = 3"):
        F.conv2d(f32(1, 5, 8, 8), f32(4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"input has 5 channels but weight"):
        nn.Conv2d(3, 4, 3)(f32(1, 5, 8, 8))
    with pytest.raises(ValueError,
                       match=r"batch_norm: input has 4 channels, expected weight of shape \(4,\)"):
        F.batch_norm(f32(2, 4, 3, 3), f32(3), f32(3), f32(3), f32(3), True)
    with pytest.raises(ValueError, match=r"expected bias of shape \(OC,\) = \(4,\)"):
        F.conv2d(f32(1, 3, 8, 8), f32(4, 3, 3, 3), f32(5))


def test_kernel_larger_than_padded_input():
    with pytest.raises(ValueError, match=r"kernel 5x5 is larger than the padded input 4x4"):
        F.conv2d(f32(1, 3, 4, 4), f32(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"kernel 3x3 is larger than the padded input 2x2"):
        F.max_pool2d(f32(1, 1, 2, 2), 3, 1)
    F.conv2d(f32(1, 3, 4, 4), f32(2, 3, 5, 5), padding=1)  # padded to 6x6: fits


@pytest.mark.parametrize("stride", [0, -1, (1, 0)])
def test_non_positive_stride(stride):
    with pytest.raises(ValueError, match=r"conv2d: stride must be >= 1"):
        F.conv2d(f32(1, 3, 8, 8), f32(4, 3, 3, 3), stride=stride)
    with pytest.raises(ValueError, match=r"max_pool2d: stride must be >= 1"):
        F.max_pool2d(f32(1, 3, 8, 8), 2, stride)


def test_negative_padding_and_bad_pool_padding():
    with pytest.raises(ValueError, match=r"padding must be >= 0"):
        F.conv2d(f32(1, 3, 8, 8), f32(4, 3, 3, 3), padding=-1)
    with pytest.raises(ValueError, match=r"padding \(2, 2\) must be at most half the kernel"):
        F.max_pool2d(f32(1, 3, 8, 8), 3, 1, 2)


def test_mixed_dtypes():
    with pytest.raises(TypeError,
                       match=r"conv2d: all arrays must share one dtype, got input=float32, weight=float64"):
        F.conv2d(f32(1, 3, 8, 8), np.zeros((4, 3, 3, 3)))
    with pytest.raises(TypeError, match=r"add: all arrays must share one dtype"):
        F.add(f32(2, 2), np.zeros((2, 2)))
    with pytest.raises(TypeError, match=r"must be a floating-point array .* got dtype int64"):
        F.conv2d(np.zeros((1, 3, 8, 8), dtype=np.int64), f32(4, 3, 3, 3))


@pytest.mark.parametrize("size", [(-1, 4), (4, 0), -2])
def test_upsample_target_must_be_positive(size):
    with pytest.raises(ValueError, match=r"upsample_nearest: target size must be positive"):
        F.upsample_nearest(f32(1, 1, 2, 2), size)


def test_add_needs_one_shape():
    with pytest.raises(ValueError, match=r"add: a and b must have the same shape, got \(1, 2\) and \(2, 1\)"):
        F.add(f32(1, 2), f32(2, 1))


def test_batch_norm_training_needs_more_than_one_value():
    with pytest.raises(ValueError, match="more than one value per channel"):
        F.batch_norm(f32(1, 3, 1, 1), f32(3), f32(3), f32(3), f32(3), True)
