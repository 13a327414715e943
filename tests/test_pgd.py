from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from studies.pgd_reference import textbook_pgd
from upi_lightning.attacks.pgd import pgd_attack, robust_accuracy
from upi_lightning.data import MNISTDataModule
from upi_lightning.errors import UPIError
from upi_lightning.module import Classifier
from upi_lightning.noise import make_generator
from upi_lightning.threat import L2Ball, LinfBall, Norm, perturbation_norm, threat_model


def binary_linear(seed: int = 0) -> nn.Sequential:
    """Logits ``W x + b`` of 2 classes on 1 x 4 x 4 images."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


def margin_direction(model: nn.Sequential, y: torch.Tensor) -> torch.Tensor:
    """``w_y - w_other`` per sample, shaped like the images: CE grows fastest against it."""
    w = model[1].weight.detach()
    return (w[y] - w[1 - y]).view(-1, 1, 4, 4)


def test_linf_pgd_reaches_the_corner_of_the_linear_optimum() -> None:
    # for 2 classes the CE is monotone in the margin (w_y - w_o)^T x, so the Linf optimum is the corner
    # x - eps * sign(w_y - w_o) (x = 0.5 keeps the box [0, 1] inactive)
    model = binary_linear()
    x = torch.full((6, 1, 4, 4), 0.5)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    x_adv = pgd_attack(model, x, y, LinfBall(0.1), steps=10, generator=make_generator(0))
    expected = x - 0.1 * margin_direction(model, y).sign()
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("random_start", [False, True])
def test_l2_pgd_moves_along_the_gradient_to_the_sphere(random_start: bool) -> None:
    model = binary_linear(1)
    x = torch.full((4, 1, 4, 4), 0.5)
    y = torch.tensor([0, 1, 1, 0])
    direction = margin_direction(model, y)
    unit = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    x_adv = pgd_attack(
        model, x, y, L2Ball(0.3), steps=30, step_size=0.3, random_start=random_start, generator=make_generator(0)
    )
    # from x itself the first step lands on the optimum; from a random start the component orthogonal to
    # the gradient shrinks geometrically at every projection onto the sphere
    torch.testing.assert_close(x_adv, x - 0.3 * unit, rtol=0, atol=1e-5)


def test_pgd_ascends_a_given_objective() -> None:
    # objective sum_i c_i^T (x_adv_i - x_i): its Linf maximizer is x + eps * sign(c), whatever the model
    model = binary_linear()
    x = torch.full((3, 1, 4, 4), 0.5)
    c = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    seen: list[bool] = []

    def objective(net: nn.Module, clean: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(not net.training and torch.equal(clean, x))
        return (c * (x_adv - clean)).sum()

    model.train()
    x_adv = pgd_attack(model, x, torch.zeros(3, dtype=torch.long), LinfBall(0.1), steps=3, objective=objective)
    torch.testing.assert_close(x_adv, x + 0.1 * c.sign(), rtol=0, atol=1e-6)
    assert seen == [True] * 3 and model.training


def separable_batches(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of 64 images: one of 10 fixed random templates per class, plus a little noise."""
    templates = torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(10, (count,), generator=generator)
    x = (0.5 + 0.6 * (templates[y] - 0.5) + 0.1 * torch.randn(count, 1, 16, 16, generator=generator)).clamp(0, 1)
    return list(zip(x.split(64), y.split(64), strict=True))


@pytest.fixture(scope="module")
def trained() -> tuple[Classifier, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A small CNN trained (plain PyTorch, a few seconds) to high accuracy, and held-out batches."""
    torch.manual_seed(0)
    model = Classifier(input_shape=(1, 16, 16), mean=[0.5], std=[0.25])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for x, y in separable_batches(640, seed=1) * 2:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    optimizer.zero_grad()
    return model, separable_batches(128, seed=2)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_adversarial_points_stay_in_the_ball_and_the_box_and_leave_the_model_alone(
    trained: tuple[Classifier, list[tuple[torch.Tensor, torch.Tensor]]], norm: str
) -> None:
    model, batches = trained
    x, y = batches[0]
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    eps = 1.0 if norm == "l2" else 0.05
    x_adv = pgd_attack(model, x, y, threat_model(norm, eps), steps=5)
    assert model.training and all(module.training for module in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert not x_adv.requires_grad and x_adv.shape == x.shape
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert bool((perturbation_norm(x_adv - x, norm, per_sample=True) <= eps * (1 + 1e-5)).all())
    assert bool((x_adv != x).any())


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_the_attack_works_for_callers_without_autograd(
    trained: tuple[Classifier, list[tuple[torch.Tensor, torch.Tensor]]], context: type
) -> None:
    model, batches = trained
    x, y = batches[0]
    expected = pgd_attack(model, x, y, LinfBall(0.05), steps=3, generator=make_generator(3))
    with context():
        x_adv = pgd_attack(model, x, y, LinfBall(0.05), steps=3, generator=make_generator(3))
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=0)


def test_robust_accuracy_is_at_most_the_clean_accuracy(
    trained: tuple[Classifier, list[tuple[torch.Tensor, torch.Tensor]]],
) -> None:
    model, batches = trained
    model.eval()
    with torch.no_grad():
        clean = sum((model(x).argmax(1) == y).sum().item() for x, y in batches) / sum(len(y) for _, y in batches)
    weak = robust_accuracy(model, batches, LinfBall(0.01), steps=5)
    strong = robust_accuracy(model, batches, LinfBall(0.1), steps=10)
    assert clean > 0.5 and strong <= weak <= clean and strong < clean


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"norm": "l1", "eps": 0.1, "steps": 1}, "Unknown norm"),
        ({"norm": "l2", "eps": 0.0, "steps": 1}, "eps"),
        ({"norm": "l2", "eps": 0.1, "steps": 0}, "steps must be"),
        ({"norm": "l2", "eps": 0.1, "steps": 1, "step_size": -1.0}, "step_size"),
    ],
)
def test_bad_attack_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(UPIError, match=message):
        threat = threat_model(kwargs.pop("norm"), kwargs.pop("eps"))
        pgd_attack(binary_linear(), torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), threat, **kwargs)


@pytest.fixture(scope="module")
def mnist_model(mnist_root: Path) -> tuple[Classifier, torch.Tensor, torch.Tensor]:
    """The small CNN after 200 Adam steps on MNIST (> 95% accuracy, a few seconds) and 200 test images."""
    dm = MNISTDataModule(root=mnist_root)  # torchvision unpacks the raw files offline
    dm.setup()
    train, test = dm.splits["train"], dm.splits["test"]
    torch.manual_seed(0)
    model = Classifier(input_shape=dm.input_shape, mean=dm.mean, std=dm.std)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(200):
        index = torch.randint(len(train), (64,))
        optimizer.zero_grad()
        F.cross_entropy(model(train.images[index].float() / 255), train.labels[index]).backward()
        optimizer.step()
    model.eval()
    x, y = test.images[:200].float() / 255, test.labels[:200]
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.95
    return model, x, y


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("linf", 0.2), ("l2", 1.5)])
def test_pgd_is_as_strong_as_textbook_pgd_on_mnist(
    mnist_model: tuple[Classifier, torch.Tensor, torch.Tensor], norm: Norm, eps: float
) -> None:
    # issue 14: differentiating through torch.clamp froze every pixel on 0 or 1 (about half of MNIST's
    # after the random start): robust accuracy 0.900 / 0.490 / 0.585 instead of 0.740 / 0.010 / 0.515 here
    model, x, y = mnist_model
    threat = threat_model(norm, eps)
    start = threat.random_start(tuple(x.shape), make_generator(0), per_sample=True)  # pgd_attack's start
    ours = pgd_attack(model, x, y, threat, steps=40, generator=make_generator(0))
    reference = textbook_pgd(model, x, y, threat, 40, start)  # studies/pgd_reference.py, written out
    with torch.no_grad():
        ours_acc, reference_acc = ((model(x_adv).argmax(1) == y).float().mean().item() for x_adv in (ours, reference))
    assert abs(ours_acc - reference_acc) <= 0.02, f"pgd_attack {ours_acc:.3f} vs textbook PGD {reference_acc:.3f}"
