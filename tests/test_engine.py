"""The shared ascent engine of the universal attacks (``upi_lightning.attacks.engine``)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from tests.helpers import HostReads
from upi_lightning.attacks.engine import fit_universal, prepare_batch, step_size_at
from upi_lightning.attacks.objective import UPIObjective
from upi_lightning.attacks.upi_grad import fit_upi_grad
from upi_lightning.errors import UPIError
from upi_lightning.models import SmallCNN
from upi_lightning.saliency import SaliencySettings
from upi_lightning.threat import L2Ball


def test_step_size_schedules_closed_form() -> None:
    assert step_size_at("constant", 0.4, 7, None) == 0.4
    assert step_size_at("cosine", 0.4, 0, 10) == 0.4
    assert math.isclose(step_size_at("cosine", 0.4, 5, 10), 0.2)
    assert [round(step_size_at("step", 1.0, t, 8), 6) for t in range(8)] == [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]
    with pytest.raises(UPIError, match="constant"):
        step_size_at("cosine", 0.4, 0, None)


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients"])
def test_chunked_fit_takes_the_steps_of_the_whole_batch(method: str) -> None:
    torch.manual_seed(0)
    model = SmallCNN((1, 8, 8), num_classes=3, activation="softplus", beta=5.0)
    x = torch.rand(5, 1, 8, 8)
    y = torch.randint(0, 3, (5,))
    saliency = SaliencySettings(method=method, n_steps=3, n_samples=3)
    objective = UPIObjective(saliency=saliency, surrogate_beta=None, sigma=0.05, n_noise=2)  # the noise must match
    fits = [
        fit_upi_grad(model, [(x, y)], L2Ball(1.0), objective=objective, epochs=3, chunk_size=chunk)
        for chunk in (None, 2, 1)
    ]
    whole = fits[0]
    assert whole.grad_norms[0] > 0
    for chunked in fits[1:]:
        torch.testing.assert_close(chunked.delta, whole.delta)
        assert chunked.history == pytest.approx(whole.history, rel=1e-4)
        assert chunked.grad_norms == pytest.approx(whole.grad_norms, rel=1e-4)
    with pytest.raises(UPIError, match="chunk_size"):
        fit_upi_grad(model, [(x, y)], L2Ball(1.0), objective=objective, chunk_size=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_step_whose_objective_is_not_finite_stops_the_fit_with_its_step(bad: float) -> None:
    calls: list[None] = []

    def objective(x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        calls.append(None)
        value = (x + delta).flatten(1).sum(dim=1)
        return value if len(calls) == 1 else value * bad  # finite at the first step only

    batch = (torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(UPIError, match="NaN/inf at step 1"):
        fit_universal(nn.Identity(), [batch, batch], objective, L2Ball(1.0), epochs=1)


def test_a_step_reads_the_device_once_after_its_backward_pass() -> None:
    def objective(x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return (x + delta).pow(2).flatten(1).sum(dim=1)

    batch = (torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long))
    with HostReads() as reads:
        fit_universal(nn.Identity(), [batch] * 3, objective, L2Ball(1.0), epochs=1)
    # per step: the pixel-range check of the batch, then the step's figures; the first step checks its gradient
    assert reads.events == ["tolist", "__bool__", "tolist"] + ["tolist", "tolist"] * 2


@pytest.mark.parametrize(
    ("labels", "got"),
    [
        (torch.zeros(4), "torch.float32 of shape (4,)"),
        (torch.zeros(4, dtype=torch.bool), "torch.bool of shape (4,)"),
        (torch.zeros(3, dtype=torch.long), "torch.int64 of shape (3,)"),
        ([0, 1, 2, 3], "[0, 1, 2, 3]"),
    ],
)
def test_bad_labels_are_refused_naming_their_dtype_and_shape(labels: object, got: str) -> None:
    with pytest.raises(UPIError, match=re.escape(f"labels must be an integer tensor of shape (4,), got {got}.")):
        prepare_batch((torch.rand(4, 1, 2, 2), labels), torch.device("cpu"))
