"""Make a model accept another input resolution, so resolution can be searched for
transformers as it is for CNNs.

CNNs that end in adaptive pooling accept any resolution as they are. A torchvision ViT has
one learned position embedding per patch of its training grid and checks the input size,
so it needs `image_size` updated and the grid part of `encoder.pos_embedding` resampled
(bicubic, as torchvision's `interpolate_embeddings` does for checkpoints). A torchvision
Swin needs nothing: its relative position bias depends only on the window, window
attention pads feature maps to whole windows and patch merging pads odd sizes. Limits for
Swin: resolutions must be multiples of the patch size (otherwise the patch conv would drop
the edge pixels silently), and where a feature map is not a whole number of windows the
zero padding tokens take part in attention (torchvision does not mask them), so accuracy
there must be measured, not assumed.
"""

from __future__ import annotations

import copy
import math

from torch import nn
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings


def _check_multiple(model: nn.Module, resolution: int, patch: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < patch \
            or resolution % patch:
        raise ValueError(f"resolution: {type(model).__name__} needs a positive multiple of its "
                         f"patch size {patch}, got {resolution!r}")


def _adapt_vit(model: VisionTransformer, resolution: int) -> VisionTransformer:
    _check_multiple(model, resolution, model.patch_size)
    adapted = copy.deepcopy(model)
    old = adapted.encoder.pos_embedding
    state = interpolate_embeddings(resolution, adapted.patch_size,
                                   {"encoder.pos_embedding": old.detach()})
    adapted.encoder.pos_embedding = nn.Parameter(state["encoder.pos_embedding"].contiguous(),
                                                 requires_grad=old.requires_grad)
    adapted.image_size = resolution
    adapted.seq_length = adapted.encoder.pos_embedding.shape[1]
    return adapted


def adapt_resolution(model: nn.Module, resolution: int) -> nn.Module:
    """A deep copy of `model` that accepts `resolution` x `resolution` inputs; `model` is not
    changed. Raises ValueError naming "resolution" for a size the model cannot take, and
    for models it does not know how to adapt (no ViT, Swin or adaptive pooling)."""
    if isinstance(model, VisionTransformer):
        return _adapt_vit(model, resolution)
    if isinstance(model, SwinTransformer):
        _check_multiple(model, resolution, math.lcm(*model.features[0][0].stride))
        return copy.deepcopy(model)
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution: must be a positive int, got {resolution!r}")
    if any(isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) for m in model.modules()):
        return copy.deepcopy(model)
    raise ValueError(f"resolution: cannot adapt {type(model).__name__} (not a torchvision ViT or "
                     "Swin, and no adaptive pooling layer)")
