from __future__ import annotations

import statistics

import pytest
import torch
from torch import Tensor

from tests.helpers import QuadraticScore, assert_untouched, make_batches, snapshot
from upi_lightning.attacks.baselines import random_universal
from upi_lightning.attacks.evaluate import evaluate_draws, evaluate_perturbation
from upi_lightning.errors import UPIError
from upi_lightning.saliency import SaliencySettings, saliency_map
from upi_lightning.threat import L2Ball, LinfBall


def half_correct_batches(model: QuadraticScore) -> list[tuple[Tensor, Tensor]]:
    """Batches whose first half is labelled with the model's prediction and second half wrongly."""
    batches = []
    model.eval()
    for x, _ in make_batches(3, 8):
        with torch.no_grad():
            predicted = model(x).argmax(dim=1)
        batches.append((x, torch.cat([predicted[:4], (predicted[4:] + 1) % 3])))
    return batches


def test_zero_perturbation_is_perfectly_stable() -> None:
    model = QuadraticScore()
    batches = half_correct_batches(model)
    model.train()
    before = snapshot(model)
    results = evaluate_perturbation(model, batches, torch.zeros(1, 8, 8), k=10)
    assert_untouched(model, before)
    assert results["n_samples"] == 12 and results["n_seen"] == 24 and results["clean_accuracy"] == 0.5
    assert results["topk_intersection"] == pytest.approx(1.0)
    assert results["relative_l2"] == pytest.approx(0.0, abs=1e-6)
    assert results["cosine"] == pytest.approx(1.0)
    assert results["flip_rate"] == 0.0 and results["delta_l2"] == 0.0


def test_smoothgrad_maps_of_clean_and_perturbed_images_share_their_noise() -> None:
    model = QuadraticScore()
    batches = half_correct_batches(model)
    smoothgrad = {"saliency": SaliencySettings("smoothgrad", n_samples=4, sigma=0.2), "k": 10}
    unmoved = evaluate_perturbation(model, batches, torch.zeros(1, 8, 8), **smoothgrad)
    assert unmoved["relative_l2"] == 0.0 and unmoved["topk_intersection"] == 1.0  # no floor from the draws
    delta = random_universal((1, 8, 8), L2Ball(2.0), n_draws=1, seed=1)[0]
    moved = evaluate_perturbation(model, batches, delta, **smoothgrad)
    assert moved["relative_l2"] > 0 and evaluate_perturbation(model, batches, delta, **smoothgrad) == moved
    regrouped = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]  # one batch
    assert evaluate_perturbation(model, regrouped, delta, **smoothgrad)["relative_l2"] == pytest.approx(
        moved["relative_l2"], rel=1e-5
    )


def test_metrics_match_a_hand_computation_on_the_correct_samples() -> None:
    model = QuadraticScore()
    batches = half_correct_batches(model)
    delta = random_universal((1, 8, 8), L2Ball(2.0), n_draws=1, seed=1)[0]
    results = evaluate_perturbation(model, batches, delta, k=10)
    x = torch.cat([b[0][:4] for b in batches])
    y = torch.cat([b[1][:4] for b in batches])
    model.eval()
    clean, perturbed = saliency_map(model, x, y), saliency_map(model, (x + delta).clamp(0, 1), y)
    relative = ((perturbed - clean).flatten(1).norm(dim=1) / clean.flatten(1).norm(dim=1)).mean()
    with torch.no_grad():
        flips = (model(x).argmax(1) != model((x + delta).clamp(0, 1)).argmax(1)).float().mean()
    assert results["relative_l2"] == pytest.approx(relative.item(), rel=1e-5)
    assert results["flip_rate"] == pytest.approx(flips.item())
    assert results["delta_l2"] == pytest.approx(2.0, rel=1e-6)
    everything = evaluate_perturbation(model, batches, delta, k=10, only_correct=False)
    assert everything["n_samples"] == 24 and everything["relative_l2"] != results["relative_l2"]


def test_per_sample_deltas_see_only_the_evaluated_samples() -> None:
    model = QuadraticScore()
    batches = half_correct_batches(model)
    delta = random_universal((1, 8, 8), LinfBall(0.1), n_draws=1)[0]
    seen: list[int] = []

    def per_sample(x: Tensor, y: Tensor) -> Tensor:
        seen.append(len(x))
        return delta.expand_as(x).clone()

    assert evaluate_perturbation(model, batches, per_sample, k=10) == pytest.approx(
        evaluate_perturbation(model, batches, delta, k=10)
    )
    assert seen == [4, 4, 4]
    with pytest.raises(UPIError, match="does not fit"):
        evaluate_perturbation(model, batches, lambda x, y: torch.zeros(2, 1, 8, 8), k=10)


def test_no_evaluated_sample_is_an_error() -> None:
    model = QuadraticScore()
    model.eval()
    x, _ = make_batches(1, 4)[0]
    with torch.no_grad():
        wrong = (model(x).argmax(dim=1) + 1) % 3
    with pytest.raises(UPIError, match="No sample"):
        evaluate_perturbation(model, [(x, wrong)], torch.zeros(1, 8, 8), k=10)


def test_evaluate_draws_gives_mean_and_std_and_works_under_inference_mode() -> None:
    model = QuadraticScore()
    batches = half_correct_batches(model)
    deltas = random_universal((1, 8, 8), L2Ball(1.0), n_draws=3, seed=2)
    runs = [evaluate_perturbation(model, batches, d, k=10) for d in deltas]
    with torch.inference_mode():
        summary = evaluate_draws(model, [(x.clone(), y.clone()) for x, y in batches], deltas, k=10)
    values = [run["relative_l2"] for run in runs]
    assert summary["relative_l2"] == pytest.approx(statistics.fmean(values), rel=1e-6)
    assert summary["relative_l2_std"] == pytest.approx(statistics.stdev(values), rel=1e-5)
    assert summary["n_draws"] == 3 and summary["n_samples_std"] == 0.0


def test_predicted_class_maps_are_the_maps_of_hand_relabelled_batches() -> None:
    model = QuadraticScore()
    batches = half_correct_batches(model)
    model.eval()
    with torch.no_grad():
        relabelled = [(x, model(x).argmax(dim=1)) for x, _ in batches]
    delta = random_universal((1, 8, 8), L2Ball(2.0), n_draws=1, seed=1)[0]
    seen: list[Tensor] = []

    def per_sample(x: Tensor, classes: Tensor) -> Tensor:
        seen.append(classes)
        return delta.expand_as(x).clone()

    predicted = evaluate_perturbation(model, batches, per_sample, k=10, only_correct=False, target="predicted")
    oracle = evaluate_perturbation(model, relabelled, delta, k=10, only_correct=False)
    labels = evaluate_perturbation(model, batches, delta, k=10, only_correct=False)
    assert predicted["clean_accuracy"] == labels["clean_accuracy"] == 0.5  # accuracy stays against the labels
    assert {key: value for key, value in predicted.items() if key != "clean_accuracy"} == pytest.approx(
        {key: value for key, value in oracle.items() if key != "clean_accuracy"}
    )
    assert predicted["relative_l2"] != pytest.approx(labels["relative_l2"])
    assert all(torch.equal(a, b) for a, b in zip(seen, [y for _, y in relabelled], strict=True))
    # on the correctly classified samples (the default) the two targets are the same classes
    assert evaluate_perturbation(model, batches, delta, k=10, target="predicted") == evaluate_perturbation(
        model, batches, delta, k=10
    )


def test_an_unknown_target_is_refused() -> None:
    model = QuadraticScore()
    with pytest.raises(UPIError, match="Unknown evaluate_perturbation target 'labels'"):
        evaluate_perturbation(model, half_correct_batches(model), torch.zeros(1, 8, 8), target="labels")  # type: ignore[arg-type]
