"""The attack methods by name: ``target: predicted`` against batches relabelled by hand."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import Batch, QuadraticScore, make_batches
from upi_lightning.attacks.methods import PredictedClassBatches, attacked_batches, fit_method
from upi_lightning.attacks.settings import Budget, MethodName, MethodSettings, UPIGradSettings
from upi_lightning.errors import UPIError


def wrongly_labelled_batches(model: QuadraticScore) -> list[Batch]:
    """Three batches of 8 whose labels are all one class off the model's prediction."""
    model.eval()
    batches = []
    for x, _ in make_batches(3, 8):
        with torch.no_grad():
            batches.append((x, (model(x).argmax(dim=1) + 1) % 3))
    return batches


def hand_relabelled(model: QuadraticScore, batches: list[Batch]) -> list[Batch]:
    """``batches`` labelled with the model's predictions, computed here."""
    with torch.no_grad():
        return [(x, model(x).argmax(dim=1)) for x, _ in batches]


def test_predicted_class_batches_relabel_every_pass_in_eval_mode() -> None:
    model = QuadraticScore()
    batches = wrongly_labelled_batches(model)
    model.train()  # its dropout would make training-mode predictions random
    relabelled = PredictedClassBatches(model, batches)
    expected = hand_relabelled(model.eval(), batches)
    model.train()
    for _ in range(2):  # re-iterable, like the DataLoader it wraps
        assert len(relabelled) == 3
        for (x, classes), (x_hand, classes_hand) in zip(relabelled, expected, strict=True):
            assert torch.equal(x, x_hand) and torch.equal(classes, classes_hand)
    assert model.training and attacked_batches(model, batches, "label") is batches


def test_a_one_shot_iterator_is_refused() -> None:
    model = QuadraticScore()
    with pytest.raises(UPIError, match="re-iterable with a length"):
        PredictedClassBatches(model, iter(wrongly_labelled_batches(model)))


@pytest.mark.parametrize("method", ["upi_grad", "uap"])
def test_fitting_the_predicted_class_is_fitting_hand_relabelled_batches(method: MethodName) -> None:
    model = QuadraticScore()
    batches = wrongly_labelled_batches(model)
    upi_grad = UPIGradSettings(epochs=2, surrogate_beta=None)
    predicted = MethodSettings(upi_grad=upi_grad, k=10, target="predicted")
    fitted = fit_method(method, model, batches, Budget("l2", 1.0), predicted).delta
    by_hand = MethodSettings(upi_grad=upi_grad, k=10)
    oracle = fit_method(method, model, hand_relabelled(model, batches), Budget("l2", 1.0), by_hand).delta
    labels = fit_method(method, model, batches, Budget("l2", 1.0), by_hand).delta
    assert torch.equal(fitted, oracle) and not torch.equal(fitted, labels)


def test_an_unknown_target_is_refused() -> None:
    with pytest.raises(UPIError, match="Unknown target 'argmax'"):
        MethodSettings(target="argmax")  # type: ignore[arg-type]
