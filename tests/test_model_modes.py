"""Model-mode and autograd contexts (``upi_lightning.model_modes``)."""

from __future__ import annotations

import torch

from upi_lightning.model_modes import gradients_enabled


def test_gradients_enabled_context() -> None:
    with torch.inference_mode(), gradients_enabled():
        assert torch.is_grad_enabled()
        assert not torch.is_inference_mode_enabled()
    with torch.no_grad(), gradients_enabled():
        assert torch.is_grad_enabled()
