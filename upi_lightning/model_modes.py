"""How the attacks and the maps run a model: in eval mode, with autograd on, on the model's device.

In ``eval()`` mode each sample's output depends only on its own input (no batch statistics), which is
what lets one backward pass return every per-sample input gradient of a batch. Lightning runs
validation under ``torch.no_grad`` and ``validate``/``test`` under ``torch.inference_mode``; the attacks
need gradients there, so :func:`gradients_enabled` switches both off for their duration.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in ``eval()`` mode and restore every submodule's own ``training`` flag on exit."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def gradients_enabled() -> Iterator[None]:
    """Enable autograd even when the caller runs under ``torch.no_grad`` or ``torch.inference_mode``.

    Tensors created under inference mode remain inference tensors: clone them inside this context
    before they take part in a graph.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


def model_device(model: nn.Module) -> torch.device:
    """Return the device of the model's first parameter or buffer (CPU for a model without any)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")
