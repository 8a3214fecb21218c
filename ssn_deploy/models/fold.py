"""The inference form of a trained U-Net: each BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is a fixed affine map per channel, so it can live in the preceding
convolution's weights and bias: one full pass over the activations fewer per layer, and under
bf16 the normalisation is rounded once into the weights rather than recomputed in fp32 per
voxel (``FloatBatchNorm3d``). ``python benchmarks/backends.py`` measures the torch backend's
whole inference form (folded, channels-last) against the module as trained. In fp32 the
folded model equals the original to rounding (tested on both packaged models).
"""

from __future__ import annotations

import copy
import itertools

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ssn_deploy.models.unet import ResBlock

CONVS = (nn.Conv3d, nn.ConvTranspose3d)


def _fold_pair(conv: nn.Module, norm: nn.Module) -> nn.Module | None:
    """``conv`` with ``norm`` folded in, or None if the pair is not a conv + BatchNorm."""
    if not isinstance(conv, CONVS) or not isinstance(norm, nn.BatchNorm3d):
        return None
    if not norm.track_running_stats or norm.running_mean is None:
        return None  # normalises by batch statistics even in eval mode: not an affine map
    return fuse_conv_bn_eval(conv, norm, transpose=isinstance(conv, nn.ConvTranspose3d))


def _fold_in_place(module: nn.Module) -> int:
    folded = 0
    if isinstance(module, nn.Sequential):  # a Sequential runs its children in order
        names = list(module._modules)
        for first, second in itertools.pairwise(names):
            fused = _fold_pair(module._modules[first], module._modules[second])
            if fused is not None:
                module._modules[first] = fused
                module._modules[second] = nn.Identity()
                folded += 1
    if isinstance(module, ResBlock):  # forward applies norm2 right after conv2
        fused = _fold_pair(module.conv2, module.norm2)
        if fused is not None:
            module.conv2, module.norm2 = fused, nn.Identity()
            folded += 1
    for child in module.children():
        folded += _fold_in_place(child)
    return folded


def fold_batch_norms(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``model`` with every foldable BatchNorm folded, and how many were.

    Only pairs whose order is certain are folded: neighbours in an ``nn.Sequential`` and a
    ``ResBlock``'s ``conv2``/``norm2``; any other BatchNorm is left as it is.
    """
    folded_model = copy.deepcopy(model).eval()
    return folded_model, _fold_in_place(folded_model)
