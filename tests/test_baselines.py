from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.helpers import QuadraticScore, TinyCNN, assert_untouched, make_batches, snapshot
from upi_lightning.attacks import methods
from upi_lightning.attacks.baselines import fit_classification_uap, fit_per_sample_attack, random_universal
from upi_lightning.attacks.objective import OBJECTIVE_NOISE_SEED, UPIObjective
from upi_lightning.attacks.settings import BaselineSettings, Budget, MethodSettings
from upi_lightning.attacks.upi_grad import fit_upi_grad
from upi_lightning.errors import UPIError
from upi_lightning.threat import L2Ball, LinfBall, threat_model

OBJECTIVE = UPIObjective(k=10)


def test_random_universal_draws_are_on_the_sphere_distinct_and_reproducible() -> None:
    draws = random_universal((1, 8, 8), L2Ball(0.5), n_draws=4, seed=3)
    assert len(draws) == 4 and all(d.shape == (1, 8, 8) for d in draws)
    assert all(d.norm().item() == pytest.approx(0.5, rel=1e-6) for d in draws)
    assert not torch.equal(draws[0], draws[1])
    again = random_universal((1, 8, 8), L2Ball(0.5), n_draws=4, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(draws, again, strict=True))
    signs = random_universal((3, 2, 2), LinfBall(0.1), n_draws=2)
    assert all(torch.equal(d.abs(), torch.full((3, 2, 2), 0.1)) for d in signs)
    with pytest.raises(UPIError, match="n_draws"):
        random_universal((1, 2, 2), L2Ball(0.5), n_draws=0)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_per_sample_attack_stays_in_each_ball_and_beats_the_universal_one(norm: str) -> None:
    model = QuadraticScore()
    model.train()
    before = snapshot(model)
    eps = 0.25 if norm == "l2" else 0.04
    batches = make_batches(2, 8)
    x, y = batches[0]
    deltas = fit_per_sample_attack(model, x, y, threat_model(norm, eps), objective=OBJECTIVE, steps=8)
    assert deltas.shape == x.shape and threat_model(norm, eps).contains(deltas, per_sample=True)
    assert_untouched(model, before)
    universal = fit_upi_grad(model, batches, threat_model(norm, eps), objective=OBJECTIVE).delta
    per_sample = OBJECTIVE.per_sample(model, x, y, deltas)
    shared = OBJECTIVE.per_sample(model, x, y, universal)
    assert bool((per_sample >= shared - 1e-3).all()) and per_sample.mean() > shared.mean()


def test_per_sample_attack_keeps_the_best_iterate() -> None:
    model = TinyCNN()
    x, y = make_batches(1, 6, shape=(1, 6, 6))[0]
    objective = UPIObjective(k=5, surrogate_beta=5.0)
    # constant steps as long as the radius bounce around the sphere; the runs share their first steps,
    # so the best iterate of a longer run can only be better
    values = [
        objective.per_sample(
            model,
            x,
            y,
            fit_per_sample_attack(
                model, x, y, L2Ball(1.0), objective=objective, steps=steps, step_size=1.0, schedule="constant"
            ),
        )
        for steps in range(1, 7)
    ]
    assert bool((torch.diff(torch.stack(values), dim=0) >= 0).all())


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1))


def test_classification_uap_raises_the_loss_and_respects_the_clamp() -> None:
    model = Linear()
    model.train()
    before = snapshot(model)
    batches = make_batches(4, 16, low=0.0, high=1.0)
    with torch.no_grad():
        batches = [(x, model(x).argmax(dim=1)) for x, _ in batches]  # labels = predictions: all correct
    result = fit_classification_uap(model, batches, LinfBall(0.1), epochs=3, clamp=1.5)
    assert_untouched(model, before)
    assert LinfBall(0.1).contains(result.delta) and result.info["clamp"] == 1.5
    assert max(result.history) <= 1.5
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    with torch.no_grad():
        attacked = F.cross_entropy(model((x + result.delta).clamp(0, 1)), y)
        draws = random_universal((1, 8, 8), LinfBall(0.1), 5)
        randoms = [F.cross_entropy(model((x + d).clamp(0, 1)), y) for d in draws]
        flipped = (model((x + result.delta).clamp(0, 1)).argmax(dim=1) != y).float().mean()
    assert attacked > max(randoms) and flipped > 0.2
    with pytest.raises(UPIError, match="clamp"):
        fit_classification_uap(model, batches, LinfBall(0.1), clamp=0.0)


def test_per_sample_attack_through_a_surrogate_under_inference_mode() -> None:
    model = TinyCNN()
    x, y = make_batches(1, 4, shape=(1, 6, 6))[0]
    objective = UPIObjective(k=5, surrogate_beta=5.0)
    expected = fit_per_sample_attack(model, x, y, L2Ball(0.5), objective=objective, steps=2)
    with torch.inference_mode():
        deltas = fit_per_sample_attack(model, x.clone(), y.clone(), L2Ball(0.5), objective=objective, steps=2)
    assert torch.allclose(deltas, expected, atol=1e-6)


def test_restarts_never_lower_the_objective_and_the_first_is_the_single_start() -> None:
    model = TinyCNN()
    x, y = make_batches(1, 8, shape=(1, 6, 6))[0]
    objective = UPIObjective(k=5, surrogate_beta=5.0)
    runs = {
        restarts: fit_per_sample_attack(model, x, y, L2Ball(1.0), objective=objective, steps=3, restarts=restarts)
        for restarts in (1, 3)
    }
    one, three = (objective.per_sample(model, x, y, runs[r]) for r in (1, 3))
    assert bool((three >= one - 1e-6).all()) and bool((three > one + 1e-6).any())
    assert torch.equal(runs[1], fit_per_sample_attack(model, x, y, L2Ball(1.0), objective=objective, steps=3))
    with pytest.raises(UPIError, match="restarts must be an integer >= 1"):
        fit_per_sample_attack(model, x, y, L2Ball(1.0), objective=objective, restarts=0)


def test_holding_the_label_leaves_no_flip_where_the_free_attack_flips() -> None:
    model = TinyCNN(seed=1)
    x = make_batches(1, 16, shape=(1, 6, 6), low=0.0, high=1.0)[0][0]
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    objective = UPIObjective(k=5, surrogate_beta=5.0)

    def flips(hold_label: bool) -> int:
        deltas = fit_per_sample_attack(model, x, y, L2Ball(4.0), objective=objective, steps=5, hold_label=hold_label)
        with torch.no_grad():
            return int((model((x + deltas).clamp(0, 1)).argmax(dim=1) != y).sum())

    assert flips(False) > 0  # a large ball: the free attack changes some predictions
    assert flips(True) == 0


def test_the_per_sample_attack_uses_the_top_k_mass_objective_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    model = TinyCNN()
    x, y = make_batches(1, 4, shape=(1, 6, 6))[0]
    seen: dict[str, Any] = {}

    def record(*args: Any, **kwargs: Any) -> Tensor:
        seen.update(kwargs)
        return torch.zeros_like(x)

    monkeypatch.setattr(methods, "fit_per_sample_attack", record)
    budget = Budget("l2", 1.0)
    methods.per_sample_deltas(model, budget, MethodSettings(k=5))(x, y)
    assert seen["objective"].dissimilarity == "l2" and (seen["restarts"], seen["hold_label"]) == (1, False)
    baselines = BaselineSettings(
        per_sample_dissimilarity="topk_mass", per_sample_restarts=2, per_sample_hold_label=True
    )
    methods.per_sample_deltas(model, budget, MethodSettings(k=5, baselines=baselines))(x, y)
    objective: UPIObjective = seen["objective"]
    assert (objective.dissimilarity, objective.k, seen["restarts"], seen["hold_label"]) == ("topk_mass", 5, 2, True)
    # the objective is the clean top-5 mass lost, computed here by hand from the two maps
    delta = 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    clean = objective.clean_maps(model, x, y).flatten(1).numpy()
    net = objective.network(model)
    perturbed = objective.saliency.maps(net, (x + delta).clamp(0, 1), y, clean=x, noise_seed=OBJECTIVE_NOISE_SEED)
    perturbed_flat = perturbed.detach().flatten(1).numpy()
    top = [np.argsort(-b, kind="stable")[:5] for b in clean]
    expected = [1 - a[s].sum() / b[s].sum() for a, b, s in zip(perturbed_flat, clean, top, strict=True)]
    assert np.allclose(objective.per_sample(model, x, y, delta).detach().numpy(), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("per_sample_restarts", 0, "per_sample_restarts=0"),
        ("per_sample_dissimilarity", "l1", "per_sample_dissimilarity='l1'"),
        ("per_sample_steps", 0, "per_sample_steps=0"),
    ],
)
def test_bad_baseline_settings_are_one_line(field: str, value: Any, message: str) -> None:
    with pytest.raises(UPIError, match=re.escape(message)) as error:
        BaselineSettings(**{field: value})
    assert "\n" not in str(error.value)
