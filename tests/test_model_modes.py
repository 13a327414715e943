"""Model-mode and autograd contexts (``upi_lightning.model_modes``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from upi_lightning.attacks.objective import UPIObjective
from upi_lightning.attacks.pgd import pgd_attack
from upi_lightning.attacks.upi_grad import fit_upi_grad
from upi_lightning.errors import UPIError
from upi_lightning.model_modes import (
    attack_device,
    evaluation_mode,
    gradients_enabled,
    model_logits,
    twice_differentiable,
)
from upi_lightning.models import Logits
from upi_lightning.saliency import SaliencySettings
from upi_lightning.threat import L2Ball


class CountedDropout(nn.Dropout):
    """Dropout that counts the calls of its ``train`` (``eval()`` calls ``train(False)``)."""

    calls = 0

    def train(self, mode: bool = True) -> CountedDropout:
        CountedDropout.calls += 1
        return super().train(mode)


def test_evaluation_mode_restores_each_flag_and_leaves_an_eval_model_alone() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(CountedDropout(), nn.BatchNorm1d(2)))
    model[1][1].eval()  # a frozen batch norm inside a training model
    flags = [module.training for module in model.modules()]
    with evaluation_mode(model):
        assert not any(module.training for module in model.modules())
    assert [module.training for module in model.modules()] == flags
    model.eval()
    CountedDropout.calls = 0
    with evaluation_mode(model):
        assert not any(module.training for module in model.modules())
    assert CountedDropout.calls == 0  # an eval model is not put in eval mode again
    assert not any(module.training for module in model.modules())


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_the_attacks_refuse_a_model_of_another_precision_naming_the_fix(dtype: torch.dtype) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).to(dtype)
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(UPIError, match=f"float32 models, this one has {name} parameters .*'bf16-mixed'"):
        pgd_attack(model, x, y, L2Ball(0.5), steps=2)
    with pytest.raises(UPIError, match=f"this one has {name} parameters"):
        fit_upi_grad(model, [(x, y)], L2Ball(0.5), objective=UPIObjective(k=4, surrogate_beta=None), epochs=1)


def test_a_float32_model_under_autocast_is_attacked() -> None:
    # mixed precision keeps float32 weights: the attacks run (Trainer(precision="bf16-mixed"))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    assert attack_device(model) == torch.device("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = pgd_attack(model, x, y, L2Ball(0.5), steps=2)
    assert x_adv.dtype == torch.float32 and bool(((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all())


@dataclass
class ModelOutput:
    """A Hugging Face-like output object."""

    logits: torch.Tensor


class ReturnsObject(nn.Module):
    def __init__(self, wrap: Callable[[torch.Tensor], object] = ModelOutput) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Softplus(beta=5.0), nn.Linear(8, 3))
        self.wrap = wrap

    def forward(self, x: torch.Tensor) -> object:
        return self.wrap(self.net(x))


def test_an_unwrapped_model_of_output_objects_is_attacked_as_its_logits_wrapper() -> None:
    model = ReturnsObject()
    wrapped = nn.Sequential(model, Logits())  # the documented way, the oracle
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    objective = UPIObjective(k=8, surrogate_beta=None)
    fitted = [fit_upi_grad(m, [(x, y)], L2Ball(0.5), objective=objective, epochs=2).delta for m in (model, wrapped)]
    assert torch.equal(*fitted)
    adversarial = [pgd_attack(m, x, y, L2Ball(0.5), steps=2, random_start=False) for m in (model, wrapped)]
    assert torch.equal(*adversarial)
    assert torch.equal(SaliencySettings().maps(model, x, y), SaliencySettings().maps(wrapped, x, y))
    assert torch.equal(model_logits(model, x), model.net(x))


def test_a_model_of_other_outputs_is_refused_in_one_line() -> None:
    model, x, y = ReturnsObject(wrap=lambda logits: (logits,)), torch.rand(6, 1, 8, 8), torch.zeros(6, dtype=torch.long)
    for attack in (lambda: SaliencySettings().maps(model, x, y), lambda: pgd_attack(model, x, y, L2Ball(0.5), steps=1)):
        with pytest.raises(UPIError, match="The model returned a tuple, neither a logits tensor nor an object"):
            attack()
