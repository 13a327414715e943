from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.helpers import QuadraticScore, TinyCNN, assert_untouched, make_batches, snapshot
from upi_lightning.attacks.baselines import fit_classification_uap, fit_per_sample_attack, random_universal
from upi_lightning.attacks.objective import UPIObjective
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
