"""Pure forward/backward pairs. Each forward returns ``(out, cache)``; each backward takes
``(dout, cache)`` and returns the gradient of every input and parameter. Nothing here keeps
state, and no backward changes ``dout`` in place."""
from .batch_norm import (
                         batch_norm,
                         batch_norm_backward,
                         frozen_batch_norm,
                         frozen_batch_norm_backward,
                         sync_batch_norm,
                         sync_batch_norm_backward,
)
from .conv import (
                   col2im,
                   conv2d,
                   conv2d_backward,
                   conv2d_simple,
                   conv_output_size,
                   im2col,
                   im2col_strided,
)
from .elementwise import add, add_backward, relu, relu_backward
from .linear import linear, linear_backward
from .losses import (
                     binary_cross_entropy_with_logits,
                     binary_cross_entropy_with_logits_backward,
                     smooth_l1,
                     smooth_l1_backward,
                     softmax,
                     softmax_cross_entropy,
                     softmax_cross_entropy_backward,
)
from .pool import global_avg_pool2d, global_avg_pool2d_backward, max_pool2d, max_pool2d_backward
from .resize import (
                     bilinear_table,
                     interpolation_matrix,
                     resize_bilinear,
                     resize_bilinear_backward,
                     resize_bilinear_simple,
)
from .roi_align import roi_align, roi_align_backward, roi_align_simple
from .upsample import nearest_source_index, upsample_nearest, upsample_nearest_backward

__all__ = [
    "add", "add_backward", "binary_cross_entropy_with_logits",
    "binary_cross_entropy_with_logits_backward", "smooth_l1", "smooth_l1_backward",
    "softmax", "softmax_cross_entropy", "softmax_cross_entropy_backward", "batch_norm", "batch_norm_backward",
    "frozen_batch_norm", "frozen_batch_norm_backward", "sync_batch_norm", "sync_batch_norm_backward",
    "global_avg_pool2d", "global_avg_pool2d_backward",
    "col2im", "conv2d",
    "conv2d_backward", "conv2d_simple", "conv_output_size", "im2col", "linear", "linear_backward",
    "max_pool2d",
    "max_pool2d_backward", "nearest_source_index", "relu", "relu_backward", "roi_align",
    "roi_align_backward", "roi_align_simple",
    "bilinear_table", "interpolation_matrix", "resize_bilinear", "resize_bilinear_backward",
    "resize_bilinear_simple",
    "upsample_nearest", "upsample_nearest_backward",
]
