"""How the attacks and the maps run a model: eval mode, autograd on, twice-differentiable attention, device, logits.

In ``eval()`` mode each sample's output depends only on its own input (no batch statistics), which is
what lets one backward pass return every per-sample input gradient of a batch. Lightning runs
validation under ``torch.no_grad`` and ``validate``/``test`` under ``torch.inference_mode``; the attacks
need gradients there, so :func:`gradients_enabled` switches both off for their duration.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from upi_lightning.errors import UPIError


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in ``eval()`` mode and restore every submodule's own ``training`` flag on exit.

    A model already in eval mode (Lightning's validation, a benchmark, an attack) is left as it is, and
    only the flags that changed are set back: ``nn.Module`` attribute writes are slow enough that setting
    the 80 flags of a CIFAR ResNet-18 classifier twice cost more than our checks of a saliency map's inputs.
    """
    modes = [(module, module.training) for module in model.modules()]
    if any(training for _, training in modes):
        model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            if module.training != training:
                module.training = training


@contextmanager
def gradients_enabled() -> Iterator[None]:
    """Enable autograd even when the caller runs under ``torch.no_grad`` or ``torch.inference_mode``.

    Tensors created under inference mode remain inference tensors: clone them inside this context
    before they take part in a graph.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


@contextmanager
def twice_differentiable(enabled: bool = True) -> Iterator[None]:
    """Run scaled-dot-product attention on its math kernel, whose backward can be differentiated again.

    The fused kernels (flash, memory-efficient) that vision transformers (timm, Hugging Face,
    torchvision) call have a backward without a derivative of its own, so a saliency map built with
    ``create_graph`` could not be differentiated. A no-op for models without attention; off with
    ``enabled=False``.
    """
    if not enabled:
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def model_device(model: nn.Module) -> torch.device:
    """Return the device of the model's first parameter or buffer (CPU for a model without any)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def attack_device(model: nn.Module) -> torch.device:
    """:func:`model_device` of a model the attacks can run: its floating-point parameters are float32.

    The attacks' images, perturbations and noise are float32; mixed precision (``torch.autocast``,
    ``Trainer(precision="bf16-mixed")``) keeps float32 weights and works.

    Raises:
        UPIError: naming the dtype and the fix, for a model cast to another precision (``bf16-true``...).
    """
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()} - {torch.float32}
    if dtypes:
        names = ", ".join(sorted(str(dtype).removeprefix("torch.") for dtype in dtypes))
        raise UPIError(
            f"the attacks run float32 models, this one has {names} parameters (e.g. Trainer(precision="
            "'bf16-true')): use precision='bf16-mixed' or '32-true', or attack model.float()."
        )
    return model_device(model)


def logits_of(output: Any) -> Tensor:
    """``output`` if it is a tensor, else its ``.logits`` tensor (a model output object).

    Raises:
        UPIError: if ``output`` is neither a tensor nor has a ``logits`` tensor.
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise UPIError(
            f"The model returned a {type(output).__name__}, neither a logits tensor nor an object with a "
            ".logits tensor; make its forward return the logits (N, classes)."
        )
    return logits


def model_logits(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` as logits: the tensor it returns, or the ``.logits`` of its output object (Hugging Face).

    Raises:
        UPIError: naming the type, for any other output (:func:`logits_of`).
    """
    return logits_of(model(x))
