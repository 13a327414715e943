"""Model-mode and autograd contexts (``upi_lightning.model_modes``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from upi_lightning.model_modes import gradients_enabled, twice_differentiable


def test_gradients_enabled_context() -> None:
    with torch.inference_mode(), gradients_enabled():
        assert torch.is_grad_enabled()
        assert not torch.is_inference_mode_enabled()
    with torch.no_grad(), gradients_enabled():
        assert torch.is_grad_enabled()


def test_attention_is_twice_differentiable_inside_the_context() -> None:
    x = torch.rand(3, 4, 8, requires_grad=True)

    def second_order(enabled: bool) -> torch.Tensor:
        with twice_differentiable(enabled):
            q = x.unsqueeze(1)
            out = F.scaled_dot_product_attention(q, q, q).sum()
        (grad,) = torch.autograd.grad(out, x, create_graph=True)
        return torch.autograd.grad(grad.pow(2).sum(), x)[0]

    assert second_order(True).abs().max() > 0  # the fused CPU kernel's backward has no derivative (torch 2.14)
