"""The shapes every op is checked over, shared by the gradient checks and the PyTorch parity
tests: odd and even sizes, strides 1-3, paddings 0-2, kernels 1, 2, 3, 5."""
import itertools

# (N, C, H, W, OC, kernel, stride, padding, bias)
CONV_CASES = [
    (2, 3, H, W, 4, k, s, p, (k + s + p) % 2 == 0)
    for (k, s, p), (H, W) in zip(itertools.product((1, 2, 3, 5), (1, 2, 3), (0, 1, 2)),
                                 itertools.cycle([(7, 6), (9, 5), (8, 8), (5, 11)]))
    if k <= min(H, W) + 2 * p
]

# (shape, kernel, stride, padding); padding at most half the kernel, as PyTorch requires
POOL_CASES = [
    ((2, 3, 7, 6), 3, 2, 1), ((2, 3, 8, 8), 2, 2, 0), ((1, 2, 9, 7), 3, 1, 1),
    ((2, 2, 7, 7), 1, 2, 0), ((2, 2, 8, 6), 1, 2, 0), ((1, 3, 5, 9), 3, 3, 0),
    ((1, 2, 6, 7), (2, 3), (1, 2), (1, 1)),
]

# (shape, target size): the FPN's 2x, odd ResNet-style ceil halving, and arbitrary ratios
UPSAMPLE_CASES = [
    ((2, 3, 4, 5), (8, 10)), ((2, 3, 4, 4), (7, 7)), ((1, 2, 3, 5), (5, 9)),
    ((1, 2, 4, 3), (13, 11)), ((1, 2, 5, 6), (3, 4)), ((2, 1, 3, 3), (3, 3)),
    ((1, 2, 2, 7), (9, 20)), ((1, 1, 1, 1), (4, 3)),
]

# input shapes for batch norm (train and eval)
BATCH_NORM_SHAPES = [(2, 3, 5, 4), (4, 2, 3, 3), (1, 3, 4, 7)]
