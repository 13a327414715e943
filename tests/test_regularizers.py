from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.regularizer_helpers import (
    CLASSES,
    SHAPE,
    assert_config_rebuilds,
    assert_every_parameter_gets_a_gradient,
    assert_plain_cross_entropy,
    data,
    linear_model,
    loss_and_grads,
    softplus_input_gradient,
    softplus_model,
    training_batch,
)
from upi_lightning.errors import UPIError
from upi_lightning.module import Classifier
from upi_lightning.regularizers import (
    Consistency,
    InputGradientNorm,
    InterpretationRegularization,
    PGDAdversarial,
    Regularizer,
    UPIAdversarial,
    load_teacher,
    regularizer_from_config,
    threshold_beyond_one_std,
)
from upi_lightning.saliency import input_gradient
from upi_lightning.threat import LinfBall

# ---- input-gradient norm ---------------------------------------------------------------------------------


def test_input_gradient_norm_matches_the_analytic_gradient_of_a_linear_model() -> None:
    model, (x, y) = linear_model(), data()
    batch = training_batch(model, x, y)
    loss, grads = loss_and_grads(model, batch, InputGradientNorm(weight=0.7))
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    probabilities = (x.flatten(1) @ weight.T + bias).softmax(dim=1)
    grad_x = (probabilities - F.one_hot(y, CLASSES)) @ weight  # W^T (softmax - onehot), per sample
    expected = F.cross_entropy(x.flatten(1) @ weight.T + bias, y) + 0.7 / 2 * grad_x.pow(2).sum(1).mean()
    torch.testing.assert_close(loss, expected)
    assert_every_parameter_gets_a_gradient(grads)


def test_input_gradient_norm_with_zero_weight_is_plain_cross_entropy() -> None:
    model, (x, y) = linear_model(), data()
    assert_plain_cross_entropy(model, x, y, InputGradientNorm(weight=0.0))


# ---- interpretation regularization -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained, seeded) small-CNN Classifier checkpoint for 1 x 4 x 4 images."""
    torch.manual_seed(5)
    teacher = Classifier(input_shape=SHAPE, num_classes=CLASSES, mean=[0.5], std=[0.25])
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(teacher)
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_threshold_keeps_only_entries_beyond_one_std() -> None:
    attr = torch.tensor([[[[0.0, 1.0], [2.0, 9.0]]]])  # mean 3, std ~4.08: only 9 is beyond
    expected = torch.tensor([[[[0.0, 0.0], [0.0, 9.0]]]])
    torch.testing.assert_close(threshold_beyond_one_std(attr), expected)


def test_interpretation_regularization_matches_a_hand_computation(teacher_ckpt: Path) -> None:
    # sigma = 0 makes the SmoothGrad targets the teacher's plain gradient (deterministic); the student is
    # linear, so its true-class logit gradient is the row W_y
    model, (x, y) = linear_model(), data()
    regularizer = InterpretationRegularization(str(teacher_ckpt), l_cs=3.0, l_gm=0.15, n_samples=2, sigma=0.0)
    batch = training_batch(model, x, y)
    loss, grads = loss_and_grads(model, batch, regularizer)
    teacher = Classifier.load_from_checkpoint(teacher_ckpt, weights_only=True)
    targets = threshold_beyond_one_std(input_gradient(teacher, x, y)).flatten(1)
    student = model[1].weight.detach()[y]
    cosine = (student * targets).sum(1) / (student.norm(dim=1) * targets.norm(dim=1))
    expected = F.cross_entropy(model(x), y) + 3.0 * (1 - cosine.mean()) + 0.15 * student.norm()
    torch.testing.assert_close(loss, expected)
    assert_every_parameter_gets_a_gradient(grads)
    assert regularizer.teacher(x.device).training is False
    assert not any(p.requires_grad for p in regularizer.teacher(x.device).parameters())


def test_interpretation_regularization_with_zero_weights_is_plain_cross_entropy(teacher_ckpt: Path) -> None:
    model, (x, y) = linear_model(), data()
    regularizer = InterpretationRegularization(str(teacher_ckpt), l_cs=0.0, l_gm=0.0, n_samples=2)
    assert_plain_cross_entropy(model, x, y, regularizer)


def test_teacher_targets_are_cached_by_image_content(teacher_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = data(8)
    cached = InterpretationRegularization(str(teacher_ckpt), n_samples=3, sigma=0.0)
    computed: list[int] = []
    original = cached.teacher_targets
    monkeypatch.setattr(cached, "teacher_targets", lambda a, b: computed.append(len(a)) or original(a, b))
    first = cached.targets(x[:5], y[:5])
    mixed = cached.targets(x.flip(0), y.flip(0))  # 3 new images, 5 cached ones in another order
    again = cached.targets(x, y)
    assert computed == [5, 3]
    uncached = InterpretationRegularization(str(teacher_ckpt), n_samples=3, sigma=0.0, cache_targets=False)
    reference = uncached.targets(x, y)
    torch.testing.assert_close(first, reference[:5])
    torch.testing.assert_close(mixed, reference.flip(0))
    torch.testing.assert_close(again, reference)


def test_a_missing_teacher_checkpoint_is_reported(tmp_path: Path) -> None:
    regularizer = InterpretationRegularization(str(tmp_path / "nope.ckpt"))
    with pytest.raises(UPIError, match=r"teacher checkpoint .* not found"):
        regularizer.on_fit_start(Classifier(mean=[0.5], std=[0.25]))


def test_a_teacher_trained_on_other_data_is_reported(teacher_ckpt: Path) -> None:
    regularizer = InterpretationRegularization(str(teacher_ckpt))
    student = Classifier(input_shape=(3, 4, 4), num_classes=CLASSES, mean=[0.5] * 3, std=[0.25] * 3)
    with pytest.raises(UPIError, match=r"trained on images \(1, 4, 4\) with 3 classes.*\(3, 4, 4\)"):
        regularizer.on_fit_start(student)
    regularizer.on_fit_start(Classifier(input_shape=SHAPE, num_classes=CLASSES, mean=[0.5], std=[0.25]))


def test_the_teacher_is_the_network_of_the_classifier_checkpoint(tmp_path: Path) -> None:
    # load_teacher rebuilds the network without the LightningModule: the same network as
    # Classifier.load_from_checkpoint(...).net, with the same draws from the global generator
    torch.manual_seed(7)
    classifier = Classifier(
        arch="mlp",
        input_shape=SHAPE,
        num_classes=CLASSES,
        mean=[0.4],
        std=[0.3],
        activation="softplus",
        softplus_beta=3.0,
    )
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(classifier)
    path = tmp_path / "mlp.ckpt"
    trainer.save_checkpoint(path)
    torch.manual_seed(0)
    expected = Classifier.load_from_checkpoint(path, map_location="cpu", weights_only=True).net
    expected_draw = torch.rand(3)
    torch.manual_seed(0)
    teacher = load_teacher(path)
    assert torch.equal(torch.rand(3), expected_draw)
    assert str(teacher) == str(expected)
    assert teacher.state_dict().keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], tensor), name
    x = data()[0]
    torch.testing.assert_close(teacher.eval()(x), expected.eval()(x), rtol=0, atol=0)
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(UPIError, match="not a Classifier checkpoint"):
        load_teacher(tmp_path / "other.ckpt")


def test_the_regularizers_import_neither_the_classifier_nor_the_cli(teacher_ckpt: Path) -> None:
    # not even to load the IR teacher: upi_lightning.module imports this package, never the reverse
    code = (
        "import sys, torch\n"
        "from upi_lightning.regularizers import InterpretationRegularization\n"
        f"InterpretationRegularization({str(teacher_ckpt)!r}).teacher(torch.device('cpu'))\n"
        "print(sorted(m for m in sys.modules if m in ('upi_lightning.module', 'upi_lightning.cli')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---- UPI-adversarial -------------------------------------------------------------------------------------


def softplus_saliency(model: nn.Sequential, x: Tensor, y: Tensor) -> Tensor:
    """Hand-derived map of the true-class logit: grad_x z_y = W1^T (sigmoid(beta (W1 x + b1)) * W2[y])."""
    heat = softplus_input_gradient(model, x, F.one_hot(y, CLASSES).float()).flatten(1).abs()
    return heat / heat.sum(dim=1, keepdim=True)


def test_upi_adversarial_term_matches_a_hand_computation() -> None:
    model, (x, y) = softplus_model(), data()
    delta = 0.1 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    regularizer = UPIAdversarial(weight=2.0, eps=1.0, every_n_steps=100)
    regularizer.load_state_dict({"delta": delta, "train_steps": 1, "updates": 1, "last_objective": 0.0})
    loss, grads = loss_and_grads(model, training_batch(model, x, y), regularizer)
    with torch.no_grad():
        perturbed = softplus_saliency(model, (x + delta).clamp(0, 1), y)
        clean = softplus_saliency(model, x, y)
        expected = F.cross_entropy(model(x), y) + 2.0 * (perturbed - clean).norm(dim=1).mean()
    torch.testing.assert_close(loss, expected)
    assert_every_parameter_gets_a_gradient(grads)
    assert regularizer.train_steps == 2 and regularizer.updates == 1  # no update off the k-step schedule
    assert torch.equal(regularizer.delta, delta)


def test_upi_adversarial_random_draws_and_adversarial_ce_match_a_hand_computation() -> None:
    model, (x, y) = softplus_model(), data()
    delta = 0.1 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    regularizer = UPIAdversarial(weight=2.0, eps=1.0, every_n_steps=100, random_draws=2, adversarial_ce=0.5)
    regularizer.load_state_dict({"delta": delta, "train_steps": 1, "updates": 1, "last_objective": 0.0})
    perturbations = regularizer.perturbations(x)  # the draws of step 1, the one the call below takes
    assert perturbations.shape == (3, *SHAPE) and torch.equal(perturbations[0], delta)
    torch.testing.assert_close(perturbations[1:].flatten(1).norm(dim=1), torch.ones(2))  # on the L2 sphere
    loss, grads = loss_and_grads(model, training_batch(model, x, y), regularizer)
    with torch.no_grad():
        clean = softplus_saliency(model, x, y)
        change = [(softplus_saliency(model, (x + v).clamp(0, 1), y) - clean).norm(dim=1).mean() for v in perturbations]
        adversarial = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        expected = F.cross_entropy(model(x), y) + 2.0 * torch.stack(change).mean() + 0.5 * adversarial
    torch.testing.assert_close(loss, expected)
    assert_every_parameter_gets_a_gradient(grads)
    diagnostics = regularizer.diagnostics()
    assert float(diagnostics["term_delta"]) == pytest.approx(change[0].item(), rel=1e-5)
    assert float(diagnostics["term_random"]) == pytest.approx((change[1] + change[2]).item() / 2, rel=1e-5)
    assert float(diagnostics["adversarial_ce"]) == pytest.approx(adversarial.item(), rel=1e-5)
    assert not torch.equal(regularizer.perturbations(x)[1:], perturbations[1:])  # fresh draws at every step
    with pytest.raises(UPIError, match="random_draws"):
        UPIAdversarial(random_draws=-1)
    with pytest.raises(UPIError, match="adversarial_ce"):
        UPIAdversarial(adversarial_ce=-0.1)


def test_upi_adversarial_term_batch_size_is_the_term_of_the_first_images() -> None:
    model, (x, y) = softplus_model(), data(n=6)
    options = {"weight": 2.0, "eps": 1.0, "every_n_steps": 2, "random_draws": 1, "adversarial_ce": 0.5}
    subset, oracle, whole = (
        UPIAdversarial(**options, term_batch_size=4),
        UPIAdversarial(**options),
        UPIAdversarial(**options),
    )
    for _ in range(3):  # steps 0 and 2 update delta, on the 4 images only
        term = subset(training_batch(model, x, y))
        torch.testing.assert_close(term, oracle(training_batch(model, x[:4], y[:4])))
        assert not torch.allclose(term, whole(training_batch(model, x, y)))
        torch.testing.assert_close(subset.delta, oracle.delta)
    assert subset.config()["init_args"]["term_batch_size"] == 4
    with pytest.raises(UPIError, match="term_batch_size"):
        UPIAdversarial(term_batch_size=0)


def test_upi_adversarial_diagnostics_say_how_far_delta_moved() -> None:
    model, (x, y) = softplus_model(), data()
    regularizer = UPIAdversarial(weight=1.0, eps=1.0, every_n_steps=1, objective={"surrogate_beta": None})
    regularizer(training_batch(model, x, y))
    first = regularizer.delta.clone()
    regularizer(training_batch(model, x, y))
    diagnostics = regularizer.diagnostics()
    assert diagnostics["delta_step"] == pytest.approx((regularizer.delta - first).norm().item(), rel=1e-5)
    assert diagnostics["delta_norm"] == pytest.approx(regularizer.delta.norm().item(), rel=1e-5)
    assert diagnostics["delta_grad_norm"] > 0 and "objective" in diagnostics


def test_upi_adversarial_updates_delta_every_k_steps_inside_the_ball() -> None:
    model, (x, y) = softplus_model(), data()
    regularizer = UPIAdversarial(weight=1.0, norm="linf", eps=0.05, every_n_steps=2, ascent_steps=2)
    deltas = []
    for _ in range(3):
        regularizer(training_batch(model, x, y))
        deltas.append(regularizer.delta.clone())
    assert regularizer.updates == 2 and regularizer.train_steps == 3  # updated at steps 0 and 2
    assert torch.equal(deltas[0], deltas[1]) and not torch.equal(deltas[1], deltas[2])
    assert all(LinfBall(0.05).contains(delta) for delta in deltas)
    assert model.training  # the UPI-Grad steps restore the training mode
    state = regularizer.state_dict()
    restored = UPIAdversarial(norm="linf", eps=0.05, every_n_steps=2, ascent_steps=2)
    restored.load_state_dict(state)
    assert torch.equal(restored.delta, deltas[-1]) and restored.train_steps == 3 and restored.updates == 2


def test_upi_adversarial_with_zero_weight_is_plain_cross_entropy() -> None:
    model, (x, y) = softplus_model(), data()
    assert_plain_cross_entropy(model, x, y, UPIAdversarial(weight=0.0))


def test_upi_adversarial_surrogate_only_drives_the_delta_update() -> None:
    regularizer = UPIAdversarial(objective={"surrogate_beta": 10.0, "keep_prediction": 1.0})
    assert regularizer.attack_objective.surrogate_beta == 10.0
    assert regularizer.train_objective.surrogate_beta is None and regularizer.train_objective.keep_prediction == 0
    with pytest.raises(UPIError, match="objective"):
        UPIAdversarial(objective={"no_such_setting": 1})


# ---- PGD-based modes -------------------------------------------------------------------------------------


def fgsm_point(model: nn.Sequential, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """One Linf PGD step from x with a step >= eps: x + eps * sign(W^T (softmax - onehot)), clipped."""
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    probabilities = (x.flatten(1) @ weight.T + bias).softmax(dim=1)
    grad = ((probabilities - F.one_hot(y, CLASSES)) @ weight).view_as(x)
    return (x + eps * grad.sign()).clamp(0, 1)


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_pgd_adversarial_mixes_clean_and_adversarial_cross_entropy(weight: float) -> None:
    model, (x, y) = linear_model(), data()
    regularizer = PGDAdversarial(weight=weight, eps=0.1, steps=1, random_start=False)
    loss, grads = loss_and_grads(model, training_batch(model, x, y), regularizer)
    with torch.no_grad():
        adversarial = F.cross_entropy(model(fgsm_point(model, x, y, 0.1)), y)
        expected = (1 - weight) * F.cross_entropy(model(x), y) + weight * adversarial
    torch.testing.assert_close(loss, expected)
    assert_every_parameter_gets_a_gradient(grads)


@pytest.mark.parametrize(("step_size", "full_move"), [(None, 0.1), (0.02, 0.02)])
def test_pgd_radius_and_step_ramp_up_over_the_warmup_steps(step_size: float | None, full_move: float) -> None:
    model, (x, y) = linear_model(), data()
    regularizer = PGDAdversarial(eps=0.1, steps=1, step_size=step_size, random_start=False, warmup_steps=4)
    batch = training_batch(model, x, y)
    for global_step, share in [(0, 0.25), (1, 0.5), (3, 1.0), (10, 1.0)]:
        regularizer.on_train_batch_start(SimpleNamespace(global_step=global_step))
        expected = fgsm_point(model, x, y, share * full_move)  # one sign step of share * (step or eps)
        torch.testing.assert_close(regularizer.adversarial(batch), expected)
    restored = regularizer_from_config(regularizer.config())
    assert restored.warmup_steps == 4 and restored.ramp() == 1.0  # outside a fit: the full radius
    with pytest.raises(UPIError, match="warmup_steps"):
        PGDAdversarial(warmup_steps=-1)


def test_consistency_matches_a_hand_computation_on_the_penultimate_features() -> None:
    # layer=None reads the input of the last nn.Linear: for this linear model, the flattened image
    model, (x, y) = linear_model(), data()
    regularizer = Consistency(weight=0.3, eps=0.1, steps=1, random_start=False)
    regularizer.on_train_batch_start(model)
    loss, grads = loss_and_grads(model, training_batch(model, x, y), regularizer)
    with torch.no_grad():
        x_adv = fgsm_point(model, x, y, 0.1)
        distance = (x - x_adv).flatten(1).pow(2).sum(1).mean()
        expected = F.cross_entropy(model(x), y) + F.cross_entropy(model(x_adv), y) + 0.3 * distance
    torch.testing.assert_close(loss, expected)
    assert_every_parameter_gets_a_gradient(grads)
    assert not model[1]._forward_pre_hooks  # the hook lives for one step only


def test_consistency_reads_a_named_layer_and_both_sides_are_differentiated() -> None:
    model, (x, y) = softplus_model(), data()
    regularizer = Consistency(weight=1.0, layer="2", eps=0.1, steps=2)
    regularizer.on_train_batch_start(model)
    batch = training_batch(model, x, y)
    term = regularizer(batch)
    (grad_x,) = torch.autograd.grad(term, batch.x)  # through phi(x) of the clean pass
    assert term > 0 and grad_x.abs().sum() > 0
    assert not model[2]._forward_hooks
    with pytest.raises(UPIError, match="layer 'nope' not found"):
        Consistency(layer="nope").on_train_batch_start(model)


def test_consistency_without_its_hook_explains_the_problem() -> None:
    model, (x, y) = linear_model(), data()
    with pytest.raises(UPIError, match="on_train_batch_start"):
        Consistency(eps=0.1)(training_batch(model, x, y))


# ---- configs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "regularizer",
    [
        InputGradientNorm(0.5),
        InterpretationRegularization("teacher.ckpt", l_cs=1.0, threshold=False),
        UPIAdversarial(weight=3.0, norm="linf", eps=0.1, objective={"surrogate_beta": 10.0}),
        Consistency(weight=0.2, layer="net.1.classifier.2", steps=2),
        PGDAdversarial(weight=0.5, norm="l2", eps=1.5, steps=7, step_size=0.5),
    ],
    ids=lambda regularizer: type(regularizer).__name__,
)
def test_configs_are_primitive_and_rebuild_the_regularizer(regularizer: Regularizer) -> None:
    assert_config_rebuilds(regularizer)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"class_path": "upi_lightning.regularizers.Nope"}, "Cannot import"),
        ({"class_path": "torch.nn.Linear", "init_args": {}}, "not a subclass"),
        ({"init_args": {}}, "class_path"),
        (
            {"class_path": "upi_lightning.regularizers.PGDAdversarial", "init_args": {"weigth": 1.0}},
            r"PGDAdversarial has no option 'weigth'; its options: weight, norm, eps",
        ),
    ],
)
def test_bad_configs_are_refused(config: dict, message: str) -> None:
    with pytest.raises(UPIError, match=message):
        regularizer_from_config(config)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: InputGradientNorm(-1.0), "weight must be"),
        (lambda: PGDAdversarial(weight=1.5), r"in \[0, 1\]"),
        (lambda: PGDAdversarial(steps=0), "steps must be"),
        (lambda: UPIAdversarial(every_n_steps=0), "every_n_steps"),
        (lambda: UPIAdversarial(eps=-1.0), "eps"),
        (lambda: Consistency(norm="l1"), "Unknown norm"),
        (lambda: InterpretationRegularization("t.ckpt", n_samples=0), "n_samples"),
    ],
)
def test_bad_settings_are_refused(factory: object, message: str) -> None:
    with pytest.raises(UPIError, match=message):
        factory()
