from __future__ import annotations

import json
import pickle
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import Payload, custom_scalar_layout, numbers, scalar_points
from upi_lightning.attack_cli import attack_main
from upi_lightning.attacks import runner
from upi_lightning.attacks.run_folder import identity_difference
from upi_lightning.attacks.settings import ALL_METHODS, AttackSettings, Budget, UPIGradSettings
from upi_lightning.data import SyntheticDataModule
from upi_lightning.errors import CheckpointMismatchError, UPIError
from upi_lightning.module import Classifier
from upi_lightning.perturbation import UniversalPerturbation
from upi_lightning.plots.output import FILE_DPI
from upi_lightning.tensorboard_layout import DASHBOARD_METRICS

DATA = ["--data=upi_lightning.data.SyntheticDataModule", "--data.num_train=512", "--data.num_test=128"]
SMALL = [
    "--attack.budgets=[{norm: l2, eps: 1.0}]",
    "--attack.fit_samples=32",
    "--attack.eval_samples=32",
    "--attack.batch_size=16",
    "--attack.k=20",
    "--attack.figure_images=3",
    "--attack.upi_grad.epochs=1",
    "--attack.upi_pca.n_iter=2",
    "--attack.baselines.random_draws=2",
    "--attack.baselines.per_sample_steps=2",
    "--attack.baselines.uap_epochs=1",
    "--progress=false",
]


def test_attack_writes_report_figures_perturbations_and_tensorboard(checkpoint: Path, tmp_path: Path) -> None:
    report = attack_main([f"--ckpt={checkpoint}", *DATA, *SMALL, f"--output={tmp_path}"])
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["complete"] and on_disk["results"] == json.loads(json.dumps(report["results"]))
    assert [row["method"] for row in report["results"]] == list(ALL_METHODS)
    for row in report["results"]:
        metrics = row["metrics"]
        assert 0 < metrics["n_samples"] <= 32 and 0 <= metrics["topk_intersection"] <= 1
        assert metrics["delta_l2"] <= 1.0 + 1e-5
    random_row = next(row for row in report["results"] if row["method"] == "random")
    assert random_row["metrics"]["n_draws"] == 2 and "relative_l2_std" in random_row["metrics"]
    table = (tmp_path / "report.md").read_text()
    assert "## l2 eps = 1" in table and table.count("\n| ") == 7  # header, separator, 5 methods
    assert "![maps](figure_gradient_l2_eps1.png)" in table
    for method in ("upi_grad", "upi_pca", "uap"):
        perturbation = UniversalPerturbation.load(tmp_path / "perturbations" / f"{method}_l2_eps1.pt", (1, 28, 28))
        assert perturbation.metadata["ckpt"] == str(checkpoint) and perturbation.norm == "l2"
    assert (tmp_path / "figure_gradient_l2_eps1.png").stat().st_size > 20_000
    assert (tmp_path / "figure_gradient_l2_eps1.pdf").read_bytes().startswith(b"%PDF")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    # the stability metrics of every method, nothing else (counts, spreads, norms stay in report.json)
    expected = {f"l2/{metric}/{method}" for metric in DASHBOARD_METRICS for method in ALL_METHODS}
    assert set(events.Tags()["scalars"]) == expected
    assert events.Scalars("l2/relative_l2/upi_grad")[0].step == 0  # the first (only) eps of l2
    assert custom_scalar_layout(tmp_path / "tensorboard")["L2: step 0 = ε 1"]["relative_l2"] == [
        f"l2/relative_l2/{method}" for method in ALL_METHODS
    ]
    images = set(events.Tags()["images"])
    assert {
        "figure/l2_eps1",
        *(f"perturbation/{m}/l2_eps1" for m in ("upi_grad", "upi_pca", "random", "uap")),
    } == images
    assert not list(tmp_path.rglob("*.tmp"))


def test_same_seed_gives_the_same_perturbation(checkpoint: Path, tmp_path: Path) -> None:
    args = [f"--ckpt={checkpoint}", *DATA, *SMALL, "--attack.methods=[upi_grad]"]
    attack_main([*args, f"--output={tmp_path / 'a'}"])
    attack_main([*args, f"--output={tmp_path / 'b'}"])
    first, second = (
        UniversalPerturbation.load(tmp_path / run / "perturbations" / "upi_grad_l2_eps1.pt") for run in "ab"
    )
    assert torch.equal(first.delta, second.delta)


def test_a_fit_does_not_depend_on_the_methods_and_budgets_run_before_it(checkpoint: Path, tmp_path: Path) -> None:
    args = [f"--ckpt={checkpoint}", *DATA, *SMALL]
    attack_main([*args, "--attack.methods=[uap]", f"--output={tmp_path / 'alone'}"])
    after_others = [
        "--attack.methods=[upi_grad, uap]",
        "--attack.budgets=[{norm: linf, eps: 0.1}, {norm: l2, eps: 1.0}]",
    ]
    attack_main([*args, *after_others, f"--output={tmp_path / 'after'}"])
    alone, after = (
        UniversalPerturbation.load(tmp_path / run / "perturbations" / "uap_l2_eps1.pt") for run in ("alone", "after")
    )
    assert torch.equal(alone.delta, after.delta)


def test_interrupted_attack_leaves_no_report(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fit = runner.fit_method
    calls = []

    def fit_then_interrupt(method: str, *args: object, **kwargs: object) -> object:
        calls.append(method)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fit(method, *args, **kwargs)

    monkeypatch.setattr(runner, "fit_method", fit_then_interrupt)
    with pytest.raises(SystemExit) as exit_info:
        attack_main(
            [f"--ckpt={checkpoint}", *DATA, *SMALL, "--attack.methods=[upi_grad, upi_pca]", f"--output={tmp_path}"]
        )
    assert exit_info.value.code == 130
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "report.md").exists()
    assert [p.name for p in (tmp_path / "perturbations").iterdir()] == ["upi_grad_l2_eps1.pt"]
    UniversalPerturbation.load(tmp_path / "perturbations" / "upi_grad_l2_eps1.pt")  # complete


def test_checkpoint_of_other_data_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    other = ["--data=upi_lightning.data.SyntheticDataModule", "--data.input_shape=[3, 32, 32]"]
    with pytest.raises(CheckpointMismatchError, match=r"trained on images \(1, 28, 28\).*\(3, 32, 32\)"):
        attack_main([f"--ckpt={checkpoint}", *other, *SMALL, f"--output={tmp_path}"])


def test_checkpoint_with_weights_of_another_architecture_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    content = torch.load(checkpoint, weights_only=True)
    content["hyper_parameters"]["arch"] = "cifar_resnet18"
    torch.save(content, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointMismatchError, match="another architecture"):
        attack_main([f"--ckpt={tmp_path / 'other.ckpt'}", *DATA, *SMALL, f"--output={tmp_path / 'out'}"])


def test_pickled_code_in_a_checkpoint_is_refused_not_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.ckpt"
    marker = tmp_path / "pwned.txt"
    path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
    with pytest.raises(CheckpointMismatchError):
        attack_main([f"--ckpt={path}", *DATA, *SMALL, f"--output={tmp_path / 'out'}"])
    assert "pwned" not in capsys.readouterr().out
    assert not marker.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ckpt=/nonexistent.ckpt"], "No checkpoint at /nonexistent.ckpt"),
        ([], "exactly one of --ckpt"),
        (["--model=torchvision.resnet18", "--attack.budgets=[{norm: l3, eps: 1.0}]"], "norm"),
        (["--model=torchvision.resnet18", "--attack.budgets=[{norm: l2, eps: 0}]"], "eps"),
        (["--model=torchvision.resnet18", "--attack.methods=[nope]"], "methods"),
    ],
    ids=["missing-ckpt", "no-model", "bad-norm", "zero-eps", "unknown-method"],
)
def test_bad_attack_arguments_are_clear(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises((UPIError, SystemExit)) as error:
        attack_main([*DATA, *args, f"--output={tmp_path}"])
    text = str(error.value) if isinstance(error.value, UPIError) else capsys.readouterr().err
    assert message in text and "Traceback" not in text


def test_fit_method_uses_the_scaled_step(checkpoint: Path) -> None:
    model = Classifier.load_from_checkpoint(checkpoint, weights_only=True).eval()
    settings = AttackSettings(upi_grad=UPIGradSettings(epochs=1, step_scale=0.5, surrogate_beta=None))
    batches = [(torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,)))]
    result = runner.fit_method("upi_grad", model, batches, Budget("linf", 0.04), settings)
    assert result.info["step_size"] == pytest.approx(0.02) and result.info["norm"] == "linf"
    assert result.delta.abs().max() <= 0.04 + 1e-7


@pytest.mark.parametrize("fit_split", ["attack_fit", "train"])
def test_fit_loader_draws_from_the_chosen_split_and_eval_stays_held_out(fit_split: str) -> None:
    datamodule = SyntheticDataModule(num_train=96, num_test=40, input_shape=(1, 6, 6))
    settings = AttackSettings(fit_split=fit_split, fit_samples=None, eval_samples=None, batch_size=16)
    fit, held_out = runner.attack_loaders(datamodule, settings)
    expected = {"attack_fit": 20, "train": len(datamodule.splits["train"])}[fit_split]
    assert len(fit.dataset) == expected and len(held_out.dataset) == 20
    fit_images = {tuple(x.flatten().tolist()) for x, _ in fit.dataset}
    split_images = {tuple(x.flatten().tolist()) for x, _ in datamodule.splits[fit_split]}
    assert fit_images == split_images


def test_sweep_charts_and_transfer_rows(checkpoint: Path, tmp_path: Path) -> None:
    """Two L2 radii give a sweep chart; evaluating on the source checkpoint itself reproduces its own numbers."""
    args = [f"--ckpt={checkpoint}", *DATA, *SMALL, "--attack.budgets=[{norm: l2, eps: 0.5}, {norm: l2, eps: 1.0}]"]
    args += ["--attack.methods=[upi_grad, random]", f"--eval_ckpt={checkpoint}", f"--output={tmp_path}"]
    report = attack_main(args)
    name = f"small_cnn ({checkpoint})"
    assert [(row["method"], row["eps"], row["eval_model"]) for row in report["transfer"]] == [
        (method, eps, name) for eps in (0.5, 1.0) for method in ("upi_grad", "random")
    ]
    for row, transferred in zip(report["results"], report["transfer"], strict=True):  # same model: same numbers
        assert transferred["metrics"] == pytest.approx(row["metrics"], rel=1e-6, abs=1e-7)
    table = (tmp_path / "report.md").read_text()
    assert "## Sweep over l2 eps" in table and "![sweep](sweep_gradient_l2.png)" in table and f"`{name}`" in table
    ratio = report["results"][0]["metrics"]["relative_l2"] / report["results"][1]["metrics"]["relative_l2"]
    assert f"({ratio:.2f}x)" in table
    with Image.open(tmp_path / "sweep_gradient_l2.png") as image:  # 3 x 2 charts of 3.4 x 2.5 in, legend, title
        assert image.size == (round(3 * 3.4 * FILE_DPI), round((2 * 2.5 + 0.9) * FILE_DPI))
    assert (tmp_path / "sweep_gradient_l2.pdf").is_file()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert "sweep/l2" in events.Tags()["images"]


def test_an_eval_checkpoint_of_other_data_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    data = ["--data=upi_lightning.data.SyntheticDataModule", "--data.num_classes=5"]
    with pytest.raises(CheckpointMismatchError, match="with 10 classes, but the data has"):
        attack_main([f"--ckpt={checkpoint}", *DATA, *SMALL, f"--eval_ckpt={checkpoint}", f"--output={tmp_path}", *data])


def test_a_rerun_after_an_interruption_fits_only_what_is_missing_and_reports_the_same(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [
        f"--ckpt={checkpoint}",
        *DATA,
        *SMALL,
        "--attack.methods=[upi_grad, random, uap]",
        f"--eval_ckpt={checkpoint}",
    ]
    args.append("--attack.budgets=[{norm: l2, eps: 0.5}, {norm: l2, eps: 1.0}]")
    whole = attack_main([*args, f"--output={tmp_path / 'whole'}"])
    fit, fitted = runner.fit_method, []

    def fit_then_interrupt(method: str, model: object, batches: object, budget: Budget, *rest: Any, **kw: Any) -> Any:
        fitted.append((method, budget.eps))
        if len(fitted) == 3:  # in the second budget's upi_grad
            raise KeyboardInterrupt
        return fit(method, model, batches, budget, *rest, **kw)

    monkeypatch.setattr(runner, "fit_method", fit_then_interrupt)
    with pytest.raises(SystemExit):
        attack_main([*args, f"--output={tmp_path / 'resumed'}"])
    saved = sorted(path.name for path in (tmp_path / "resumed" / "results").iterdir())
    assert saved == ["random_l2_eps0.5.json", "uap_l2_eps0.5.json", "upi_grad_l2_eps0.5.json"]
    assert not list((tmp_path / "resumed").glob("tensorboard/*"))  # written at the end only
    fitted.clear()
    resumed = attack_main([*args, f"--output={tmp_path / 'resumed'}"])
    assert fitted == [("upi_grad", 1.0), ("uap", 1.0)]
    assert numbers(resumed["results"]) == numbers(whole["results"])
    assert numbers(resumed["transfer"]) == numbers(whole["transfer"])
    assert json.loads((tmp_path / "resumed" / "report.json").read_text())["results"] == resumed["results"]
    points = scalar_points(tmp_path / "resumed" / "tensorboard")
    assert points == scalar_points(tmp_path / "whole" / "tensorboard")
    assert all(steps == [0, 1] for steps in points.values())  # one point per eps, whatever ran when
    assert len(list((tmp_path / "resumed" / "tensorboard").iterdir())) == 1


def test_a_rerun_of_a_finished_run_fits_nothing_and_keeps_one_tensorboard_point_per_step(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [f"--ckpt={checkpoint}", *DATA, *SMALL, "--attack.methods=[upi_grad, random]", f"--output={tmp_path}"]
    first = attack_main(args)
    monkeypatch.setattr(runner, "fit_method", lambda *args, **kwargs: pytest.fail("refitted a saved method"))
    again = attack_main(args)
    assert numbers(again["results"]) == numbers(first["results"])
    assert all(steps == [0] for steps in scalar_points(tmp_path / "tensorboard").values())
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1


def test_a_run_resumes_under_another_chunk_size(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [f"--ckpt={checkpoint}", *DATA, *SMALL, "--attack.methods=[upi_grad]", f"--output={tmp_path}"]
    first = attack_main(args)
    assert "chunk_size" not in json.dumps(json.loads((tmp_path / "run.json").read_text()))
    monkeypatch.setattr(runner, "fit_method", lambda *args, **kwargs: pytest.fail("refitted a saved method"))
    again = attack_main([*args, "--attack.upi_grad.chunk_size=2"])  # a memory and speed setting, as the device
    assert numbers(again["results"]) == numbers(first["results"])
    run_file = tmp_path / "run.json"  # as the version that kept chunk_size in the identity wrote it
    saved = json.loads(run_file.read_text())
    saved["options"]["attack"]["upi_grad"]["chunk_size"] = 4
    run_file.write_text(json.dumps(saved))
    assert numbers(attack_main([*args, "--attack.upi_grad.chunk_size=2"])["results"]) == numbers(first["results"])


def test_a_run_saved_before_the_target_option_resumes(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [f"--ckpt={checkpoint}", *DATA, *SMALL, "--attack.methods=[upi_grad]", f"--output={tmp_path}"]
    first = attack_main(args)
    run_file = tmp_path / "run.json"  # as the version before attack.target wrote it
    saved = json.loads(run_file.read_text())
    assert saved["options"]["attack"].pop("target") == "label"
    run_file.write_text(json.dumps(saved))
    monkeypatch.setattr(runner, "fit_method", lambda *args, **kwargs: pytest.fail("refitted a saved method"))
    assert numbers(attack_main(args)["results"]) == numbers(first["results"])
    with pytest.raises(UPIError, match=re.escape('options.attack.target: "label" there, "predicted" now')):
        attack_main([*args, "--attack.target=predicted"])


def test_python_api_identities_without_the_target_read_as_label() -> None:
    current = {"description": {}, "settings": asdict(AttackSettings()), "eval": []}
    older = json.loads(json.dumps(current))
    del older["settings"]["target"]
    assert identity_difference(older, current) is None
    predicted = {**current, "settings": asdict(AttackSettings(target="predicted"))}
    assert identity_difference(older, predicted) == 'settings.target: "label" there, "predicted" now'


@pytest.mark.parametrize(
    ("change", "difference"),
    [
        (["--attack.upi_grad.epochs=2"], "options.attack.upi_grad.epochs: 1 there, 2 now"),
        (["--attack.methods=[upi_grad, uap]"], 'options.attack.methods: ["upi_grad"] there, ["upi_grad", "uap"] now'),
        (["--data.num_test=96"], "options.data.init_args.num_test: 128 there, 96 now"),
        (["--model=torchvision.resnet18", "--ckpt=null"], "options.ckpt: "),
        (["--attack.target=predicted"], 'options.attack.target: "label" there, "predicted" now'),
    ],
    ids=["setting", "methods", "data", "model", "target"],
)
def test_a_folder_holding_another_run_is_refused_naming_the_difference(
    checkpoint: Path, tmp_path: Path, change: list[str], difference: str
) -> None:
    args = [f"--ckpt={checkpoint}", *DATA, *SMALL, "--attack.methods=[upi_grad]", f"--output={tmp_path}"]
    attack_main(args)
    before = sorted(path.stat().st_mtime_ns for path in tmp_path.rglob("*"))
    with pytest.raises(UPIError, match=f"{tmp_path} holds another attack run \\({re.escape(difference)}"):
        attack_main([*args, *change])
    assert sorted(path.stat().st_mtime_ns for path in tmp_path.rglob("*")) == before  # nothing touched


def test_another_checkpoint_at_the_same_path_is_another_run(checkpoint: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    shutil.copy(checkpoint, ckpt)
    args = [f"--ckpt={ckpt}", *DATA, *SMALL, "--attack.methods=[random]", f"--output={tmp_path / 'out'}"]
    attack_main(args)
    content = torch.load(ckpt, weights_only=True)
    content["state_dict"] = {key: value + 1 for key, value in content["state_dict"].items()}
    torch.save(content, ckpt)
    with pytest.raises(UPIError, match=re.escape(f"(sha256.{ckpt}: ")):
        attack_main(args)


def test_a_folder_of_other_files_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text("{}")  # e.g. a run of an older version, without run.json
    with pytest.raises(UPIError, match="is not an empty folder and holds no attack run"):
        attack_main([f"--ckpt={checkpoint}", *DATA, *SMALL, f"--output={tmp_path}"])


def test_a_model_that_classifies_no_held_out_sample_correctly_is_refused_before_any_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = SyntheticDataModule(num_train=64, num_test=64)
    always_other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, data.num_classes + 1))
    with torch.no_grad():  # every image gets the extra class, which no label holds
        always_other[1].weight.zero_()
        always_other[1].bias.copy_(torch.nn.functional.one_hot(torch.tensor(data.num_classes)).float())
    monkeypatch.setattr(runner, "fit_method", lambda *args, **kwargs: pytest.fail("fitted before the check"))
    run = runner.AttackRun(always_other, data, AttackSettings(eval_samples=32, batch_size=16), tmp_path / "run")
    with pytest.raises(UPIError, match="classifies none of the 32 held-out samples correctly"):
        run.run()


def test_figure_samples_are_chosen_in_eval_mode_leaving_batch_norm_statistics_alone() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3), torch.nn.BatchNorm1d(3)).train()
    before = model[2].running_mean.clone()
    x = torch.rand(8, 1, 4, 4)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)  # the eval-mode predictions: every sample is correct in eval mode
    model.train()
    images, labels = runner.figure_batch(model, [(x, y)], 8)
    assert len(images) == 8 and torch.equal(labels, y)
    assert torch.equal(model[2].running_mean, before) and model.training
