"""Reliability suite (issue #8): bad inputs and failures against the public entry points, one case per test.

Every case ends in a clear error (a :class:`~upi_lightning.errors.UPIError` whose message names the
problem, or for the scripts exit code 2 and one ``error:`` line without a traceback) or in a correct
result.

1. NaN / Inf pixels            5. eps <= 0 and huge eps            9. pickles that would run code
2. all-black images            6. unknown norm / method names     10. SIGKILL of train.py, then resume
3. one-sample batches          7. bad perturbation files          11. SIGKILL of attack.py, then resume
4. empty fit data              8. checkpoints of other models     12. same seed, same bits
13. every entry point fails in one line (train.py, attack.py, the studies)

The tiny models, batches and file helpers come from ``tests/helpers.py``; the trained checkpoint is
the module-scoped ``checkpoint`` fixture of ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from studies import transfer_matrix
from tests.helpers import (
    REPO,
    Payload,
    TinyCNN,
    abs_cosine,
    example_perturbation,
    gradient_matrix,
    make_batches,
    numbers,
    scalar_points,
    write_payload,
)
from tests.helpers import SMOOTH_OBJECTIVE as PCA_OBJECTIVE
from upi_lightning.attack_cli import attack_main
from upi_lightning.attacks import evaluate_perturbation, fit_upi_grad, fit_upi_pca, runner
from upi_lightning.attacks.engine import UPIFitResult
from upi_lightning.attacks.methods import fit_method
from upi_lightning.attacks.objective import UPIObjective
from upi_lightning.attacks.settings import ALL_METHODS, AttackSettings, Budget
from upi_lightning.checkpoints import check_model_fits_data, load_classifier
from upi_lightning.cli import train_cli
from upi_lightning.data import MNISTDataModule, SyntheticDataModule
from upi_lightning.errors import CheckpointMismatchError, UPIError, run_reporting_errors
from upi_lightning.noise import make_generator
from upi_lightning.perturbation import FORMAT_VERSION, UniversalPerturbation
from upi_lightning.saliency import SALIENCY_METHODS, SaliencySettings, attribution, saliency_map
from upi_lightning.threat import L2Ball, LinfBall, ThreatModel, threat_model

GRAD_OBJECTIVE = UPIObjective(k=5, surrogate_beta=5.0)  # ReLU maps have no 2nd-order signal: use the surrogate
SHAPE = (1, 6, 6)


def tiny_batches(n_batches: int = 2, batch_size: int = 4, **kwargs: Any) -> list[tuple[Tensor, Tensor]]:
    """Batches of TinyCNN-sized images spanning the whole pixel range."""
    return make_batches(n_batches, batch_size, shape=SHAPE, low=0.0, high=1.0, **kwargs)


def bias_free_relu_net() -> nn.Module:
    """Conv-ReLU-linear without biases: at a black image every activation, and so the gradient, is 0."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3, bias=False)
    ).eval()


def saliency(model: nn.Module, x: Tensor, y: Tensor, method: str) -> Tensor:
    """Maps of one method; SmoothGrad with a fixed generator so two calls see the same noise."""
    extra = {"generator": make_generator(0)} if method == "smoothgrad" else {}
    return saliency_map(model, x, y, method, **extra)


def fit(method: str, model: nn.Module, batches: Any, threat: ThreatModel, **kwargs: Any) -> UPIFitResult:
    """UPI-Grad or UPI-PCA (power solver, a few passes) with the objectives of this module."""
    if method == "upi_grad":
        return fit_upi_grad(model, batches, threat, objective=GRAD_OBJECTIVE, **kwargs)
    return fit_upi_pca(model, batches, threat, objective=PCA_OBJECTIVE, n_iter=4, **kwargs)


FITS = ("upi_grad", "upi_pca")


def cli_error(main: Callable[[], object], capsys: pytest.CaptureFixture[str]) -> str:
    """Run an entry point as its script does; return its stderr after checking the exit code 2 one-liner."""
    with pytest.raises(SystemExit) as exit_info:
        run_reporting_errors(main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    assert "Traceback" not in err
    return err


# ------------------------------------------------------------------ 1. NaN / Inf pixels


def poisoned(bad: float) -> tuple[Tensor, Tensor, Tensor]:
    """A batch with one bad pixel in sample 1, the same batch with that pixel valid, and the labels."""
    x, y = tiny_batches(1, 3)[0]
    clean = x.clone()
    clean[1, 0, 2, 3] = 0.5
    x = clean.clone()
    x[1, 0, 2, 3] = bad
    return x, clean, y


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("entry", ["fit_upi_grad", "fit_upi_pca", "evaluate_perturbation"])
def test_nan_or_inf_pixels_are_refused_by_fits_and_evaluation(entry: str, bad: float) -> None:
    x, _, y = poisoned(bad)
    batches = [*tiny_batches(1, 3), (x, y)]  # the bad batch comes second: refused mid-fit, not only at the start
    calls = {
        "fit_upi_grad": lambda: fit_upi_grad(TinyCNN(), batches, L2Ball(0.5), objective=GRAD_OBJECTIVE),
        "fit_upi_pca": lambda: fit_upi_pca(TinyCNN(), batches, L2Ball(0.5), objective=PCA_OBJECTIVE),
        "evaluate_perturbation": lambda: evaluate_perturbation(
            TinyCNN(), batches, torch.zeros(SHAPE), k=5, only_correct=False
        ),
    }
    with pytest.raises(UPIError, match=r"images must be pixels in \[0, 1\].*got values in \[") as error:
        calls[entry]()
    assert str(bad) in str(error.value)  # the message shows the offending value


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("method", SALIENCY_METHODS)
def test_saliency_maps_refuse_nan_or_inf_images(method: str, bad: float) -> None:
    # ReLU's backward masks NaN, so without the check gradient and SmoothGrad maps came out finite and wrong
    x, clean, y = poisoned(bad)
    with pytest.raises(UPIError, match="NaN or inf"):
        saliency(TinyCNN(), x, y, method)
    assert torch.isfinite(saliency(TinyCNN(), clean, y, method)).all()


def test_evaluate_perturbation_refuses_a_nan_delta() -> None:
    # without the check a NaN delta gave finite stability metrics (only delta_l2/delta_linf were NaN)
    with pytest.raises(UPIError, match="perturbation contains NaN or inf"):
        evaluate_perturbation(TinyCNN(), tiny_batches(), torch.full(SHAPE, math.nan), k=5, only_correct=False)


# ------------------------------------------------------------------ 2. all-black images


@pytest.mark.parametrize("method", SALIENCY_METHODS)
@pytest.mark.parametrize("net", ["tiny_cnn", "bias_free"])
def test_black_images_give_finite_maps_even_from_all_zero_gradients(net: str, method: str) -> None:
    model = TinyCNN() if net == "tiny_cnn" else bias_free_relu_net()
    black, y = torch.zeros(4, *SHAPE), torch.tensor([0, 1, 2, 0])
    maps = saliency(model, black, y, method)
    assert maps.shape == (4, 6, 6) and torch.isfinite(maps).all()
    # x * grad and the path integral from a black baseline vanish at x = 0; so does the gradient of a
    # bias-free ReLU net (every pre-activation is 0). SmoothGrad's noisy copies are not black.
    zero_attribution = method in ("grad_x_input", "integrated_gradients") or (
        net == "bias_free" and method == "gradient"
    )
    assert bool((attribution(model, black, y, method) == 0).all()) == zero_attribution
    expected = torch.zeros(4) if zero_attribution else torch.ones(4)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), expected)  # all-zero maps, not 0/0 = NaN


@pytest.mark.parametrize("net", ["tiny_cnn", "bias_free"])
def test_black_images_fit_and_evaluate_finite_perturbations(net: str) -> None:
    model = TinyCNN() if net == "tiny_cnn" else bias_free_relu_net()
    batches = [(torch.zeros(4, *SHAPE), torch.tensor([0, 1, 2, 0]))]
    for name in FITS:
        result = fit(name, model, batches, L2Ball(0.5))
        assert torch.isfinite(result.delta).all() and L2Ball(0.5).contains(result.delta), name
        assert all(math.isfinite(value) for value in result.history), name
        result.to_perturbation()  # refuses NaN deltas
        metrics = evaluate_perturbation(model, batches, result.delta, k=5, only_correct=False)
        assert all(math.isfinite(value) for value in metrics.values()), (name, metrics)


# ------------------------------------------------------------------ 3. one-sample batches


def test_upi_grad_on_one_sample_equals_the_fit_on_that_sample_twice() -> None:
    model = TinyCNN()
    x, y = tiny_batches(1, 1)[0]
    single = fit_upi_grad(model, [(x, y)], L2Ball(0.5), objective=GRAD_OBJECTIVE, epochs=3)
    assert single.info["steps"] == 3 and len(single.history) == 3
    assert torch.isfinite(single.delta).all() and L2Ball(0.5).contains(single.delta)
    assert single.history[-1] > single.history[0]  # it does ascend
    doubled = fit_upi_grad(
        model, [(x.repeat(2, 1, 1, 1), y.repeat(2))], L2Ball(0.5), objective=GRAD_OBJECTIVE, epochs=3
    )
    torch.testing.assert_close(single.delta, doubled.delta)  # the mean gradient of a duplicate is the same


@pytest.mark.parametrize("solver", ["power", "svd"])
def test_upi_pca_on_one_sample_is_its_own_gradient_row(solver: str) -> None:
    model = TinyCNN()
    batches = tiny_batches(1, 1)
    result = fit_upi_pca(model, batches, L2Ball(0.5), objective=PCA_OBJECTIVE, solver=solver)
    row = gradient_matrix(model, batches, PCA_OBJECTIVE)  # (1, d): M = g g^T has the top eigenvector g / |g|
    assert row.shape == (1, 36) and row.norm() > 0
    assert abs_cosine(result.delta, row[0]) > 0.9999
    assert result.delta.norm().item() == pytest.approx(0.5, rel=1e-5)


# ------------------------------------------------------------------ 4. empty fit data


def empty_loader() -> DataLoader:
    """What an empty split looks like to the fits: a DataLoader that yields no batch."""
    return DataLoader(TensorDataset(torch.zeros(0, *SHAPE), torch.zeros(0, dtype=torch.long)), batch_size=4)


@pytest.mark.parametrize("data", ["list", "loader"])
@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("upi_grad", "upi_grad: the fit data yielded no batch."),
        ("upi_pca_power", "upi_pca: the fit data yielded no batch."),
        ("upi_pca_svd", "upi_pca: the fit data yielded no batch."),
        ("uap", "classification_uap: the fit data yielded no batch."),
        ("evaluate", "No sample was evaluated (no batch, or no correctly classified sample)"),
    ],
)
def test_empty_fit_data_is_a_clear_error(entry: str, message: str, data: str) -> None:
    batches = [] if data == "list" else empty_loader()
    model, settings = TinyCNN(), AttackSettings()
    calls = {
        "upi_grad": lambda: fit_upi_grad(model, batches, L2Ball(0.5)),
        "upi_pca_power": lambda: fit_upi_pca(model, batches, L2Ball(0.5)),
        "upi_pca_svd": lambda: fit_upi_pca(model, batches, L2Ball(0.5), solver="svd"),
        "uap": lambda: fit_method("uap", model, batches, Budget("l2", 0.5), settings),
        "evaluate": lambda: evaluate_perturbation(model, batches, torch.zeros(SHAPE)),
    }
    with pytest.raises(UPIError, match=re.escape(message)):
        calls[entry]()


def test_an_empty_attack_split_is_refused_before_any_fit() -> None:
    with pytest.raises(UPIError, match=r"attack_fit_size: the dataset has 1 sample\(s\); splitting it needs"):
        SyntheticDataModule(num_train=64, num_test=1).setup("test")
    with pytest.raises(UPIError, match=r"sample counts must be >= 1 \(or null for all\), got 0"):
        runner.attack_loaders(SyntheticDataModule(num_train=64, num_test=16), AttackSettings(fit_samples=0))


# ------------------------------------------------------------------ 5. eps


@pytest.mark.parametrize("eps", [0.0, -0.5], ids=["zero", "negative"])
@pytest.mark.parametrize("entry", ["fit_upi_grad", "fit_upi_pca", "budget", "perturbation_file"])
def test_eps_zero_or_negative_is_refused(entry: str, eps: float) -> None:
    calls = {
        "fit_upi_grad": lambda: fit_upi_grad(TinyCNN(), tiny_batches(), L2Ball(eps)),
        "fit_upi_pca": lambda: fit_upi_pca(TinyCNN(), tiny_batches(), LinfBall(eps)),
        "budget": lambda: Budget("l2", eps),
        "perturbation_file": lambda: UniversalPerturbation(torch.zeros(SHAPE), "l2", eps),
    }
    with pytest.raises(
        UPIError,
        match=re.escape(
            f"eps is the radius of the perturbation ball in [0, 1] pixel units; it must be > 0, got {eps!r}."
        ),
    ):
        calls[entry]()


def test_negative_eps_on_the_attack_command_line_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--model=torchvision.resnet18", "--data=upi_lightning.data.SyntheticDataModule"]
    err = cli_error(lambda: attack_main([*args, "--attack.budgets=[{norm: l2, eps: -1}]"]), capsys)
    assert err.strip() == (
        "error: eps is the radius of the perturbation ball in [0, 1] pixel units; it must be > 0, got -1.0."
    )


def test_l2_eps_far_beyond_the_pixel_range_still_works() -> None:
    model = TinyCNN(shape=(1, 28, 28))
    batches = make_batches(2, 4, shape=(1, 28, 28), low=0.0, high=1.0)
    x = batches[0][0]
    for name in FITS:
        result = fit(name, model, batches, L2Ball(1000.0))
        delta = result.delta
        assert torch.isfinite(delta).all() and L2Ball(1000.0).contains(delta), name
        perturbed = result.to_perturbation().apply(x)
        assert perturbed.min() >= 0.0 and perturbed.max() <= 1.0, name
        big = delta.abs() >= 1  # pixels pushed past either bound whatever the image: exactly 0 or 1
        assert big.float().mean() > 0.5, name
        assert torch.equal(perturbed[:, big], (delta[big] > 0).float().expand(len(x), -1)), name
        metrics = evaluate_perturbation(model, batches, delta, k=20, only_correct=False)
        assert all(math.isfinite(value) for value in metrics.values()), (name, metrics)
        assert metrics["delta_l2"] == pytest.approx(delta.norm().item(), rel=1e-5)


# ------------------------------------------------------------------ 6. unknown names


@pytest.mark.parametrize("entry", ["fit_upi_grad", "fit_upi_pca", "budget", "perturbation_file"])
def test_unknown_norm_lists_the_valid_norms(entry: str) -> None:
    calls = {
        "fit_upi_grad": lambda: fit_upi_grad(TinyCNN(), tiny_batches(), threat_model("l1", 0.5)),
        "fit_upi_pca": lambda: fit_upi_pca(TinyCNN(), tiny_batches(), threat_model("l1", 0.5)),
        "budget": lambda: Budget("l1", 0.5),
        "perturbation_file": lambda: UniversalPerturbation(torch.zeros(SHAPE), "l1", 0.5),
    }
    with pytest.raises(UPIError, match=re.escape("Unknown norm 'l1': use 'l2' or 'linf'.")):
        calls[entry]()


def test_unknown_attack_or_saliency_method_lists_the_valid_ones() -> None:
    with pytest.raises(UPIError, match=re.escape(f"['nope']: choose from {list(ALL_METHODS)}")):
        AttackSettings(methods=["nope"])
    methods = ", ".join(map(repr, SALIENCY_METHODS))
    with pytest.raises(UPIError, match=re.escape(f"Unknown saliency method 'occlusion': use one of {methods}.")):
        saliency_map(TinyCNN(), torch.rand(2, *SHAPE), method="occlusion")
    with pytest.raises(UPIError, match=re.escape(f"Unknown saliency method 'occlusion': use one of {methods}.")):
        SaliencySettings(method="occlusion")


def test_fit_method_refuses_a_method_it_does_not_fit() -> None:
    for method in ("nope", "random"):  # random and per_sample are baselines, not fitted perturbations
        with pytest.raises(UPIError, match=f"'{method}' is not a fitted universal method"):
            fit_method(method, TinyCNN(), tiny_batches(), Budget(), AttackSettings())


def test_fit_method_error_lists_the_fitted_methods() -> None:
    with pytest.raises(UPIError) as error:
        fit_method("nope", TinyCNN(), tiny_batches(), Budget(), AttackSettings())
    assert all(name in str(error.value) for name in ("upi_grad", "upi_pca", "uap"))


@pytest.mark.parametrize(
    ("arg", "choices"),
    [
        ("--attack.budgets=[{norm: l3, eps: 1.0}]", ["'l2'", "'linf'"]),
        ("--attack.saliency.method=occlusion", [repr(method) for method in SALIENCY_METHODS]),
        ("--attack.methods=[nope]", [repr(method) for method in ALL_METHODS]),
    ],
    ids=["norm", "saliency-method", "attack-method"],
)
def test_unknown_names_on_the_attack_command_line_list_the_choices(
    arg: str, choices: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--model=torchvision.resnet18", "--data=upi_lightning.data.SyntheticDataModule", arg]
    err = cli_error(lambda: attack_main(args), capsys)
    bad = re.search(r"(l3|occlusion|nope)", arg).group(1)
    assert f"Got value: {bad}" in err and all(choice in err for choice in choices), err


# ------------------------------------------------------------------ 7. perturbation files


def test_perturbation_file_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    path = write_payload(tmp_path / "delta.pt")  # a (1, 5, 5) perturbation
    with pytest.raises(
        CheckpointMismatchError,
        match=re.escape(
            "holds a perturbation of shape (1, 5, 5) but the data has images of "
            "shape (3, 5, 5); fit a perturbation for this dataset."
        ),
    ):
        UniversalPerturbation.load(path, expected_shape=(3, 5, 5))
    batch = write_payload(tmp_path / "batch.pt", delta=torch.zeros(2, 1, 5, 5))  # not one (C, H, W) image
    with pytest.raises(CheckpointMismatchError, match=r"holds an invalid perturbation: delta must be .* \(C, H, W\)"):
        UniversalPerturbation.load(batch)


def test_perturbation_file_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    path = write_payload(tmp_path / "delta.pt", format_version=FORMAT_VERSION + 1)
    message = f"has format_version {FORMAT_VERSION + 1}, this version of upi_lightning reads 1..{FORMAT_VERSION}; "
    with pytest.raises(CheckpointMismatchError, match=re.escape(message + "upgrade upi_lightning to load it.")):
        UniversalPerturbation.load(path)


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.99], ids=["empty", "header", "half", "all-but-the-end"])
def test_truncated_perturbation_file_is_refused(tmp_path: Path, keep: float) -> None:
    path = example_perturbation().save(tmp_path / "delta.pt")
    data = path.read_bytes()
    path.write_bytes(data[: int(keep * len(data))])
    with pytest.raises(CheckpointMismatchError, match=r"is not a readable perturbation file \(truncated, corrupt"):
        UniversalPerturbation.load(path)


# ------------------------------------------------------------------ 8. checkpoints of other models or data


@pytest.mark.parametrize(
    "change",
    [{"arch": "cifar_resnet18"}, {"num_classes": 5}, {"input_shape": [3, 28, 28]}],
    ids=["architecture", "classes", "channels"],
)
def test_checkpoint_whose_weights_do_not_fit_its_hyperparameters_is_refused(
    checkpoint: Path, tmp_path: Path, change: dict[str, Any]
) -> None:
    content = torch.load(checkpoint, weights_only=True)
    content["hyper_parameters"].update(change)
    torch.save(content, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointMismatchError, match="is not a Classifier checkpoint this version can rebuild"):
        load_classifier(tmp_path / "other.ckpt")


def test_truncated_checkpoint_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    data = checkpoint.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointMismatchError, match=r"\(truncated, or weights of another architecture\)"):
        load_classifier(tmp_path / "cut.ckpt")


@pytest.mark.parametrize(
    ("data", "found"),
    [({"input_shape": (3, 32, 32)}, "images (3, 32, 32) with 10 classes"), ({"num_classes": 5}, "with 5 classes")],
    ids=["other-images", "other-classes"],
)
def test_checkpoint_of_other_data_is_refused(checkpoint: Path, data: dict[str, Any], found: str) -> None:
    model = load_classifier(checkpoint)
    with pytest.raises(CheckpointMismatchError, match=re.escape("trained on images (1, 28, 28) with 10 classes")) as e:
        check_model_fits_data(model, SyntheticDataModule(**data))
    assert found in str(e.value)
    check_model_fits_data(model, SyntheticDataModule())  # the data it was trained on passes


def test_checkpoint_of_other_data_on_the_attack_command_line_is_one_line(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [f"--ckpt={checkpoint}", "--data=upi_lightning.data.SyntheticDataModule", "--data.num_classes=5"]
    err = cli_error(lambda: attack_main([*args, f"--output={tmp_path}"]), capsys)
    assert err.strip() == (
        "error: The checkpoint was trained on images (1, 28, 28) with 10 classes, but the data has images "
        "(1, 28, 28) with 5 classes; attack it with the data it was trained on."
    )
    assert not any(tmp_path.iterdir())  # refused before writing anything


# ------------------------------------------------------------------ 9. pickles that would run code


def write_malicious(path: Path, marker: Path, container: str) -> Path:
    """A file whose unpickling creates ``marker``: torch's zip format or a bare pickle."""
    payload = {"format": "upi_lightning.universal_perturbation", "state_dict": Payload(marker), "delta": 0}
    if container == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload does work when unpickled unsafely
    assert marker.exists()
    marker.unlink()
    return path


@pytest.mark.parametrize("container", ["zip", "pickle"])
@pytest.mark.parametrize("loader", ["load_classifier", "UniversalPerturbation.load"])
def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path: Path, loader: str, container: str) -> None:
    marker = tmp_path / "pwned.txt"
    path = write_malicious(tmp_path / "evil.ckpt", marker, container)
    load = load_classifier if loader == "load_classifier" else UniversalPerturbation.load
    message = (
        "holds objects that safe (weights_only) loading refuses"
        if loader == "load_classifier"
        else (
            "is not a readable perturbation file (truncated, corrupt, or containing objects that weights_only "
            "loading refuses)"
        )
    )
    with pytest.raises(CheckpointMismatchError, match=re.escape(message)):
        load(path)
    assert not marker.exists()


def test_attack_py_refuses_a_malicious_checkpoint_in_one_line(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    path = write_malicious(tmp_path / "evil.ckpt", marker, "zip")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "attack.py"),
            f"--ckpt={path}",
            "--data=upi_lightning.data.SyntheticDataModule",
            f"--output={tmp_path / 'out'}",
            "--trainer.accelerator=cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"error: {path} holds objects that safe (weights_only) loading refuses")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 10. SIGKILL of train.py, then resume


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (safe loading), ``None`` while it is absent or being replaced."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return None


def wait_for(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], log: Path, what: str, timeout: float = 90.0
) -> None:
    """Poll ``ready()`` until it holds; fail if the process exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the process exited with {proc.returncode} before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` (if still running) and reap it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def assert_same_state(actual: Any, saved: Any, where: str = "") -> None:
    """Recursive equality of (optimizer / model) states: tensors bit for bit, the rest with ``==``."""
    if isinstance(saved, Tensor):
        assert isinstance(actual, Tensor) and torch.equal(actual.cpu(), saved), where
    elif isinstance(saved, dict):
        assert isinstance(actual, dict) and set(actual) == set(saved), (where, set(actual) ^ set(saved))
        for key, value in saved.items():
            assert_same_state(actual[key], value, f"{where}.{key}")
    elif isinstance(saved, list | tuple):
        assert isinstance(actual, list | tuple) and len(actual) == len(saved), where
        for index, (item, value) in enumerate(zip(actual, saved, strict=True)):
            assert_same_state(item, value, f"{where}[{index}]")
    else:
        assert actual == saved, (where, actual, saved)


class ExpectResumedFrom(Callback):
    """Compare the restored model and optimizer with a checkpoint at ``on_train_start``; note the first step."""

    def __init__(self, saved: dict[str, Any]) -> None:
        self.saved = saved
        self.start: tuple[int, int] | None = None
        self.first_batch_step: int | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert_same_state(trainer.optimizers[0].state_dict(), self.saved["optimizer_states"][0], "optimizer")
        assert_same_state(pl_module.state_dict(), self.saved["state_dict"], "model")
        self.start = (trainer.global_step, trainer.current_epoch)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.first_batch_step is None:
            self.first_batch_step = trainer.global_step


EVERY = 5  # checkpoint every EVERY training steps
BATCH = 4
NUM_TRAIN = 1024  # the quickstart's 2048 halved: 10% validation, then STEPS_PER_EPOCH batches of BATCH
STEPS_PER_EPOCH = math.ceil((NUM_TRAIN - round(0.1 * NUM_TRAIN)) / BATCH)


def mid_epoch_step(saved: dict[str, Any] | None) -> bool:
    """Whether ``saved`` is a checkpoint of the every-EVERY-steps trigger, taken in the middle of an epoch."""
    step = -1 if saved is None else saved["global_step"]
    return step > 0 and step % EVERY == 0 and step % STEPS_PER_EPOCH != 0


def quickstart_args(save_dir: Path, version: str) -> list[str]:
    """configs/quickstart.yaml on the CPU with many short steps per epoch and a checkpoint every EVERY steps."""
    return [
        f"--config={REPO / 'configs' / 'quickstart.yaml'}",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.logger.init_args.version={version}",
        f"--data.init_args.num_train={NUM_TRAIN}",
        f"--data.init_args.batch_size={BATCH}",
        f"--last_checkpoint.every_n_train_steps={EVERY}",
    ]


@pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch ended")
@pytest.mark.filterwarnings("ignore:.*dirpath has changed")
def test_train_py_killed_mid_epoch_resumes_from_last_ckpt(tmp_path: Path) -> None:
    last = tmp_path / "quickstart" / "killed" / "checkpoints" / "last.ckpt"
    log = tmp_path / "train.log"
    with log.open("wb") as output:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), "fit", *quickstart_args(tmp_path, "killed")],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        try:
            # last.ckpt monitors nothing, so it is written every EVERY steps from the start: kill in epoch 0
            wait_for(proc, lambda: mid_epoch_step(read_checkpoint(last)), log, "a mid-epoch last.ckpt")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            kill(proc)
    assert proc.returncode == -signal.SIGKILL

    saved = read_checkpoint(last)
    assert saved is not None, "SIGKILL left an unreadable last.ckpt"
    step = saved["global_step"]
    assert mid_epoch_step(saved) and saved["epoch"] == step // STEPS_PER_EPOCH, step
    assert all(state["step"] == step for state in saved["optimizer_states"][0]["state"].values())  # Adam's counter

    cli = train_cli([*quickstart_args(tmp_path, "resumed"), f"--trainer.max_steps={step + EVERY}"], run=False)
    expect = ExpectResumedFrom(saved)
    cli.trainer.callbacks.append(expect)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=last, weights_only=True)

    assert expect.start == (step, step // STEPS_PER_EPOCH) and expect.first_batch_step == step
    assert cli.trainer.global_step == step + EVERY
    resumed = read_checkpoint(tmp_path / "quickstart" / "resumed" / "checkpoints" / "last.ckpt")
    assert resumed is not None and resumed["global_step"] == step + EVERY
    # a restart would have counted EVERY Adam steps, a resume counts on from the saved ones
    assert all(state["step"] == step + EVERY for state in resumed["optimizer_states"][0]["state"].values())


# ------------------------------------------------------------------ 11. SIGKILL of attack.py, then resume

FINAL_PERTURBATION = re.compile(r"^(upi_grad|upi_pca|uap)_(l2|linf)_eps[0-9.e+-]+\.pt$")
TEMPORARY = re.compile(r"^\..+\.tmp$")  # upi_lightning.io.atomic_write: hidden, never a final name


def test_attack_py_killed_mid_fit_leaves_complete_files_and_no_report(checkpoint: Path, tmp_path: Path) -> None:
    output = tmp_path / "attack"
    log = tmp_path / "attack.log"
    args = [
        f"--config={REPO / 'configs' / 'attack_quickstart.yaml'}",
        f"--ckpt={checkpoint}",
        f"--output={output}",
        "--trainer.accelerator=cpu",
        "--attack.fit_samples=64",
        "--attack.eval_samples=64",
        "--attack.batch_size=32",
        "--attack.upi_grad.epochs=1",
        "--attack.upi_pca.n_iter=100",  # a long UPI-PCA fit to be killed in
    ]
    with log.open("wb") as stream:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "attack.py"), *args], stdout=stream, stderr=stream, cwd=tmp_path
        )
        try:
            # the second power pass of UPI-PCA has begun: UPI-Grad (first method) is saved, UPI-PCA is mid-fit
            wait_for(proc, lambda: "upi_pca pass 2" in log.read_text(errors="replace"), log, "UPI-PCA pass 2")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            kill(proc)
    assert proc.returncode == -signal.SIGKILL

    assert not (output / "report.json").exists() and not (output / "report.md").exists()
    files = [path for path in output.rglob("*") if path.is_file()]
    final = [path for path in files if not TEMPORARY.match(path.name)]
    saved = [output / "run.json", output / "results" / "upi_grad_l2_eps1.json"]
    for path in saved:
        json.loads(path.read_text())  # complete
    final = [path for path in final if path not in saved]
    assert all(path.parent == output / "perturbations" and FINAL_PERTURBATION.match(path.name) for path in final), files
    assert output / "perturbations" / "upi_grad_l2_eps1.pt" in final
    for path in final:  # every final-looking file is complete
        perturbation = UniversalPerturbation.load(path, expected_shape=(1, 28, 28))
        assert perturbation.metadata["ckpt"] == str(checkpoint) and perturbation.norm in ("l2", "linf")
        assert threat_model(perturbation.norm, perturbation.eps).contains(perturbation.delta)


def attack_sweep_args(checkpoint: Path, output: Path) -> list[str]:
    """configs/attack_quickstart.yaml at tiny sizes: 2 budgets x 5 methods, a few seconds in all."""
    return [
        f"--config={REPO / 'configs' / 'attack_quickstart.yaml'}",
        f"--ckpt={checkpoint}",
        f"--output={output}",
        "--trainer.accelerator=cpu",
        "--attack.fit_samples=64",
        "--attack.eval_samples=64",
        "--attack.batch_size=32",
        "--attack.upi_grad.epochs=1",
        "--attack.upi_pca.n_iter=3",
    ]


def run_lines(log: Path, marker: str) -> list[str]:
    """``"[<budget>] <method>"`` of every per-method line of ``attack.py`` whose text holds ``marker``."""
    lines = log.read_text(errors="replace").splitlines()
    return [" ".join(line.split()[:2]) for line in lines if line.startswith("[") and marker in line]


def test_attack_py_sweep_killed_then_rerun_finishes_with_the_report_of_an_uninterrupted_run(
    checkpoint: Path, tmp_path: Path
) -> None:
    output, logs = tmp_path / "killed", [tmp_path / "first.log", tmp_path / "second.log"]
    command = [sys.executable, str(REPO / "attack.py"), *attack_sweep_args(checkpoint, output)]
    with logs[0].open("wb") as stream:
        proc = subprocess.Popen(command, stdout=stream, stderr=subprocess.DEVNULL, cwd=tmp_path)
        try:
            results = output / "results"
            wait_for(proc, lambda: len(list(results.glob("*.json"))) >= 3, logs[0], "3 saved results")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            kill(proc)
    assert proc.returncode == -signal.SIGKILL and not (output / "report.json").exists()
    saved = {path.name: path.stat().st_mtime_ns for path in results.glob("*.json")}
    order = [f"[{norm}_eps{eps}] {method}" for norm, eps in (("l2", 1), ("linf", 0.05)) for method in ALL_METHODS]
    done = order[: len(saved)]  # methods run in order: the saved ones are a prefix, the next one was in progress
    assert sorted(saved) == sorted(f"{line.split()[1]}_{line[1:].split(']')[0]}.json" for line in done)

    with logs[1].open("wb") as stream:
        subprocess.run(command, stdout=stream, stderr=subprocess.DEVNULL, cwd=tmp_path, check=True, timeout=120)
    assert run_lines(logs[1], "done before") == done  # read back, not refitted
    assert run_lines(logs[1], "relative_l2=") == order[len(saved) :]  # only the one in progress is fitted again
    assert {path.name: path.stat().st_mtime_ns for path in results.glob("*.json") if path.name in saved} == saved

    uninterrupted = attack_main([*attack_sweep_args(checkpoint, tmp_path / "whole"), "--progress=false"])
    resumed = json.loads((output / "report.json").read_text())
    assert numbers(resumed["results"]) == numbers(uninterrupted["results"])  # same numbers, timings aside
    assert len(resumed["results"]) == len(order)
    assert len(list((output / "tensorboard").iterdir())) == 1  # one event file: the old attempt's are gone
    assert scalar_points(output / "tensorboard") == scalar_points(tmp_path / "whole" / "tensorboard")


def child_processes(pid: int) -> list[int]:
    """The process ids of the children of ``pid`` (Linux ``/proc``)."""
    return [
        int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()
    ]


@pytest.mark.parametrize("signal_to_child", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_lost_process_of_a_two_process_attack_ends_the_survivor_in_one_line(
    checkpoint: Path, tmp_path: Path, signal_to_child: signal.Signals
) -> None:
    output, log = tmp_path / "attack", tmp_path / "attack.log"
    args = [*attack_sweep_args(checkpoint, output), "--attack.methods=[upi_pca]", "--attack.upi_pca.n_iter=1000"]
    args += ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.timeout=5"]
    with log.open("wb") as stream:  # rank 0 is this process, rank 1 its child (the ddp launcher re-runs attack.py)
        proc = subprocess.Popen([sys.executable, str(REPO / "attack.py"), *args], stderr=stream, cwd=tmp_path)
        children: list[int] = []
        try:
            wait_for(proc, lambda: "upi_pca pass 2" in log.read_text(errors="replace"), log, "UPI-PCA pass 2")
            children = child_processes(proc.pid)
            os.kill(children[0], signal_to_child)
            proc.wait(timeout=60)  # the survivor stops by itself: at once (killed) or after the 5 s timeout (hung)
        finally:
            kill(proc)
            for child in children:
                os.kill(child, signal.SIGKILL)
    stderr = log.read_text(errors="replace")
    assert "Traceback" not in stderr and not (output / "report.json").exists(), stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "error" in line.lower() or "terminated" in line]
    if proc.returncode == -signal.SIGKILL:  # Lightning's watch over the child (every 5 s) was faster than a collective
        assert signal_to_child == signal.SIGKILL and len(lines) == 1, lines
        assert f"Child process with PID {children[0]} terminated with code -9. Forcefully terminating" in lines[0]
    else:
        assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, lines)
        assert lines[0].startswith("error: process 0 of 2 lost another process"), lines


# ------------------------------------------------------------------ 12. determinism


@pytest.mark.parametrize("method", ["upi_grad", "upi_pca"])
def test_same_seed_same_perturbation_bit_for_bit_other_seed_another(method: str) -> None:
    model, batches = TinyCNN(), tiny_batches(3, 4)
    first, again, other = (fit(method, model, batches, L2Ball(0.5), seed=seed).delta for seed in (0, 0, 1))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other, atol=1e-3)  # seeds the random start / smoothing noise and power start
    assert first.norm().item() == pytest.approx(0.5, rel=1e-5)


# ------------------------------------------------------------------ 13. every entry point fails in one line

QUICKSTART = REPO / "configs" / "quickstart.yaml"


@pytest.mark.parametrize("kind", ["missing", "truncated", "malicious"])
@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
def test_train_py_refuses_a_bad_ckpt_path_in_one_line(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], subcommand: str, kind: str
) -> None:
    marker, path = tmp_path / "pwned.txt", tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        path.write_bytes(checkpoint.read_bytes()[:100_000])
    elif kind == "malicious":
        write_malicious(path, marker, "zip")
    err = cli_error(lambda: train_cli([subcommand, f"--config={QUICKSTART}", f"--ckpt_path={path}"]), capsys)
    expected = {
        "missing": f"No checkpoint at {path}; pass --ckpt_path",
        "truncated": f"{path} is not a Classifier checkpoint this version can rebuild (truncated",
        "malicious": f"{path} holds objects that safe (weights_only) loading refuses",
    }[kind]
    assert expected in err and not marker.exists()


def test_a_dataset_neither_on_disk_nor_downloadable_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def offline(root: str, train: bool, download: bool) -> None:  # torchvision's message, without network
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz:\nTried https://ossci-datasets.s3.amazonaws.com/mnist/, "
            "got:\n<urlopen error [Errno -2] Name or service not known>\n"
        )

    monkeypatch.setattr(MNISTDataModule, "dataset_cls", staticmethod(offline))
    err = cli_error(
        lambda: train_cli(["fit", "--data=upi_lightning.data.MNISTDataModule", f"--data.root={tmp_path}"]), capsys
    )
    assert f"error: MNIST not found under {tmp_path.resolve()} (download=True needs network access" in err
    assert "urlopen" not in err


def test_a_torchvision_model_that_cannot_take_the_images_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data=upi_lightning.data.SyntheticDataModule", "--data.num_train=64", "--data.num_test=32"]
    err = cli_error(lambda: attack_main(["--model=torchvision.resnet18", *data, f"--output={tmp_path}"]), capsys)
    assert "error: torchvision.resnet18 cannot classify the images of SyntheticDataModule (shape (1, 28, 28))" in err
    assert not any(tmp_path.iterdir())  # refused before writing anything


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (["a", "b"], "error: --model takes NAME=CKPT, got 'a'."),
        (["a=/no.ckpt", "b=/no.ckpt"], "No checkpoint at /no.ckpt"),
    ],
    ids=["not-name-equals-ckpt", "missing-checkpoint"],
)
def test_the_transfer_matrix_study_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], models: list[str], message: str
) -> None:
    args = [f"--model={model}" for model in models] + [f"--output={tmp_path}"]
    assert message in cli_error(lambda: transfer_matrix.main(args), capsys)
