from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from tests.helpers import (
    QuadraticScore,
    TinyCNN,
    assert_untouched,
    count_clean_maps,
    make_batches,
    run_ranks,
    snapshot,
    split_batches,
)
from upi_lightning.attacks.objective import UPIObjective
from upi_lightning.attacks.upi_grad import fit_upi_grad, mean_objective
from upi_lightning.errors import UPIError
from upi_lightning.noise import make_generator
from upi_lightning.perturbation import UniversalPerturbation
from upi_lightning.threat import L2Ball, threat_model

EPS = 0.25
OBJECTIVE = UPIObjective(k=10)


def test_upi_grad_finds_the_known_direction_and_beats_random(tmp_path: Path) -> None:
    model = QuadraticScore()
    model.train()
    before = snapshot(model)
    batches = make_batches(4, 16)
    steps: list[tuple[int, float]] = []
    result = fit_upi_grad(
        model,
        batches,
        L2Ball(EPS),
        objective=OBJECTIVE,
        epochs=3,
        on_step=lambda step, delta, value: steps.append((step, value)),
    )
    assert_untouched(model, before)
    assert [s for s, _ in steps] == list(range(12)) and [v for _, v in steps] == result.history
    assert result.delta.shape == (1, 8, 8) and result.info["steps"] == 12
    assert sum(result.history[-3:]) > 3 * sum(result.history[:3])
    cosine = F.cosine_similarity(result.delta.flatten(), model.u.detach(), dim=0).abs().item()
    assert cosine > 0.9
    randoms = [L2Ball(EPS).random_on_sphere((1, 8, 8), make_generator(seed)) for seed in range(10)]
    values = mean_objective(model, batches, OBJECTIVE, [result.delta, *randoms])
    assert values[0] > 1.5 * max(values[1:])
    saved = result.to_perturbation(model="quadratic").save(tmp_path / "upi.pt")
    loaded = UniversalPerturbation.load(saved, expected_shape=(1, 8, 8))
    assert torch.equal(loaded.delta, result.delta) and loaded.norm == "l2" and loaded.eps == EPS
    assert loaded.metadata["method"] == "upi_grad" and loaded.metadata["model"] == "quadratic"
    assert loaded.metadata["history"] == result.history and loaded.metadata["objective"]["k"] == 10


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_delta_never_leaves_the_ball(norm: str) -> None:
    eps = EPS if norm == "l2" else 0.05
    inside: list[bool] = []
    result = fit_upi_grad(
        QuadraticScore(),
        make_batches(3, 8),
        threat_model(norm, eps),
        objective=OBJECTIVE,
        epochs=2,
        step_size=eps,  # large steps: the projection has to work
        schedule="constant",
        on_step=lambda step, delta, value: inside.append(threat_model(norm, eps).contains(delta)),
    )
    assert len(inside) == 6 and all(inside)
    if norm == "linf":
        assert (result.delta.abs() > eps * 0.999).float().mean() > 0.9  # sign steps reach the vertices


def test_zero_start_stays_at_zero_without_smoothing() -> None:
    with pytest.warns(UserWarning, match="exactly zero at the first step"):
        result = fit_upi_grad(QuadraticScore(), make_batches(2, 4), L2Ball(EPS), objective=OBJECTIVE, init="zero")
    assert torch.equal(result.delta, torch.zeros(1, 8, 8))
    warm = 5 * torch.ones(1, 8, 8)
    result = fit_upi_grad(QuadraticScore(), make_batches(2, 4), L2Ball(EPS), objective=OBJECTIVE, init=warm, epochs=1)
    assert L2Ball(EPS).contains(result.delta) and result.delta.norm() > 0.9 * EPS


def test_default_objective_moves_a_relu_model_and_no_surrogate_warns() -> None:
    model = TinyCNN()
    batches = make_batches(2, 6, shape=(1, 6, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default objective (a softplus surrogate) has a gradient
        result = fit_upi_grad(model, batches, L2Ball(0.5), epochs=1)
    assert result.info["network"] == "softplus surrogate (beta=10)"
    start = L2Ball(0.5).random_start((1, 6, 6), make_generator(0), torch.device("cpu"))
    assert not torch.allclose(result.delta, start)
    with pytest.warns(UserWarning, match=r"surrogate_beta=10, the default\) or smooth the objective"):
        stuck = fit_upi_grad(model, batches, L2Ball(0.5), objective=UPIObjective(surrogate_beta=None), epochs=1)
    assert stuck.info["network"] == "the model itself (surrogate_beta=None)"
    assert torch.allclose(stuck.delta, start)


def test_model_is_untouched_and_fit_works_under_inference_mode() -> None:
    model = TinyCNN()
    model.train()
    before = snapshot(model)
    batches = make_batches(2, 6, shape=(1, 6, 6))
    objective = UPIObjective(k=5, surrogate_beta=5.0)
    expected = fit_upi_grad(model, batches, L2Ball(0.5), objective=objective)
    assert_untouched(model, before)
    assert expected.history[0] != expected.history[-1]
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            inference_batches = [(x.clone(), y.clone()) for x, y in batches]
            result = fit_upi_grad(model, inference_batches, L2Ball(0.5), objective=objective)
        assert torch.allclose(result.delta, expected.delta, atol=1e-6)
        assert not result.delta.is_inference()
    assert_untouched(model, before)


def test_reduce_hook_two_ranks_equal_one_process_on_all_data() -> None:
    model = TinyCNN()  # generic per-sample gradients (those of QuadraticScore are all parallel to u)
    batches = make_batches(3, 8, shape=(1, 6, 6))
    shards = split_batches(batches)
    objective = UPIObjective(k=5, surrogate_beta=5.0)
    kwargs = {"objective": objective, "epochs": 2}
    single = fit_upi_grad(model, batches, L2Ball(0.5), **kwargs)
    ranks = run_ranks(lambda rank, reduce: fit_upi_grad(model, shards[rank], L2Ball(0.5), reduce=reduce, **kwargs))
    assert torch.equal(ranks[0].delta, ranks[1].delta)
    assert ranks[0].history == ranks[1].history
    assert torch.allclose(ranks[0].delta, single.delta, atol=1e-5)
    assert ranks[0].history == pytest.approx(single.history, rel=1e-5)
    # a rank that ignores the others' contribution ends elsewhere: the test can fail
    alone = fit_upi_grad(model, shards[0], L2Ball(0.5), **kwargs)
    assert not torch.allclose(alone.delta, single.delta, atol=1e-3)


def test_one_reduce_call_per_step() -> None:
    calls: list[int] = []

    def reduce(tensor: Tensor) -> Tensor:
        calls.append(tensor.numel())
        return tensor

    fit_upi_grad(QuadraticScore(), make_batches(3, 4), L2Ball(EPS), objective=OBJECTIVE, reduce=reduce)
    assert calls == [64 + 2] * 6


@pytest.mark.parametrize(
    ("batches", "kwargs", "match"),
    [
        (make_batches(1, 2), {"eps": 0.0}, "eps"),
        (make_batches(1, 2), {"norm": "l1"}, "norm"),
        (make_batches(1, 2), {"schedule": "linear"}, "schedule"),
        (make_batches(1, 2), {"epochs": 0}, "epochs"),
        (make_batches(1, 2), {"init": "ones"}, "init"),
        ([(torch.full((2, 1, 8, 8), 255.0), torch.zeros(2, dtype=torch.long))], {}, r"\[0, 1\]"),
        ([(torch.full((2, 1, 8, 8), float("nan")), torch.zeros(2, dtype=torch.long))], {}, r"\[0, 1\]"),
        ([(torch.rand(2, 1, 8, 8), torch.zeros(3, dtype=torch.long))], {}, "labels"),
        ([*make_batches(1, 2), *make_batches(1, 2, shape=(1, 4, 4))], {}, "shape"),
        (iter(make_batches(2, 2)), {"epochs": 2}, "one-shot"),
        ([], {"schedule": "constant"}, "no batch"),
    ],
)
def test_bad_inputs_are_refused(batches: object, kwargs: dict[str, object], match: str) -> None:
    settings = {"norm": "l2", "eps": EPS, "objective": OBJECTIVE, **kwargs}
    with pytest.raises(UPIError, match=match):
        threat = threat_model(settings.pop("norm"), settings.pop("eps"))
        fit_upi_grad(QuadraticScore(), batches, threat, **settings)


def test_clean_maps_are_computed_once_per_sample_and_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    model = TinyCNN()
    batches = make_batches(3, 4, shape=(1, 6, 6))
    objective = UPIObjective(k=5, surrogate_beta=5.0)
    sizes = count_clean_maps(objective, monkeypatch)
    shuffled = [batches, [(x.flip(0), y.flip(0)) for x, y in reversed(batches)]]  # epoch 2 in another order
    fits = {}
    for cache in (True, False):
        sizes.clear()
        fits[cache] = fit_upi_grad(
            model, _EpochOrder(shuffled), L2Ball(0.5), objective=objective, epochs=2, cache_clean_maps=cache
        )
        assert sum(sizes) == (12 if cache else 24)
    torch.testing.assert_close(fits[True].delta, fits[False].delta)
    assert fits[True].history == pytest.approx(fits[False].history)


class _EpochOrder:
    """A re-iterable that yields the batches of ``orders[k]`` on its k-th pass (like a shuffled loader)."""

    def __init__(self, orders: list[list[tuple[Tensor, Tensor]]]) -> None:
        self.orders, self.passes = orders, 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.orders[self.passes % len(self.orders)]
        self.passes += 1
        return iter(order)

    def __len__(self) -> int:
        return len(self.orders[0])
