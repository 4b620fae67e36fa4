"""How much arithmetic one input costs a model: its multiply-adds, counted on a forward pass.

Used for a student's recorded cost (kdtune.cost) and for the precision `auto` trains it in (kdtune.hardware).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# The layers whose multiply-adds `multiply_adds` counts: dense and convolution layers, and normalisations (one
# scale-and-shift per value at inference); a layer with weights of any other kind makes the count unknown.
CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d,
               nn.InstanceNorm2d, nn.InstanceNorm3d)
COUNTED_LAYERS = (nn.Linear, *CONV_LAYERS, *NORM_LAYERS)


def multiply_adds(model: nn.Module, input_shape: tuple[int, ...]) -> int | None:
    """Multiply-adds of one input (`input_shape`: C x H x W or D) through `model`, counted on its forward pass:
    in_features per output of a Linear layer, (in_channels / groups) x kernel size per output of a convolution,
    one per output of a normalisation. Biases, activations and pooling are not multiply-adds. None when the model
    has weights in a layer of another kind (an embedding, attention, a recurrent layer: a user's family), which
    a count would silently leave out. Build the model on the meta device to count for free."""
    if any(not isinstance(m, COUNTED_LAYERS) and any(True for _ in m.parameters(recurse=False))
           for m in model.modules()):
        return None
    total = 0

    def count(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Linear):
            total += output.numel() * layer.in_features
        elif isinstance(layer, CONV_LAYERS):
            total += output.numel() * (layer.in_channels // layer.groups) * int(np.prod(layer.kernel_size))
        else:
            total += output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, COUNTED_LAYERS)]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return total
