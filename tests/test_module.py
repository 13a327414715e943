from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from tests.helpers import REPO
from upi_lightning.callbacks import RobustAccuracy
from upi_lightning.cli import train_cli
from upi_lightning.data import SyntheticDataModule
from upi_lightning.errors import CheckpointMismatchError, UPIError
from upi_lightning.module import Classifier
from upi_lightning.regularizers import (
    AttributionalAdversarial,
    Consistency,
    GradientConsistency,
    IGNorm,
    IGSumNorm,
    InputGradientNorm,
    InterpretationRegularization,
    PGDAdversarial,
    Regularizer,
    SmoothSurfaceRegularization,
    UPIAdversarial,
)

DATASETS = ("mnist", "cifar10_subset")
MODE_CONFIGS = [
    f"{dataset}_{mode}.yaml"
    for dataset in DATASETS
    for mode in (
        "input_grad",
        "ir",
        "upi_adv",
        "consistency",
        "pgd",
        "ig_norm",
        "ig_sum_norm",
        "gradient_consistency",
        "attributional_adv",
        "ssr",
    )
]


def test_training_lowers_the_loss_and_logs_accuracy(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = SyntheticDataModule(num_train=1024, num_test=128, batch_size=32, separation=0.5)
    model = Classifier(num_classes=dm.num_classes, input_shape=dm.input_shape, mean=dm.mean, std=dm.std, lr=3e-3)
    trainer = pl.Trainer(
        max_epochs=2, default_root_dir=tmp_path, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert metrics["train/loss_epoch"] < 1.0 and metrics["val/acc"] > 0.5
    (result,) = trainer.test(model, dm, verbose=False)
    assert 0.5 < result["test/acc"] <= 1.0


@pytest.mark.parametrize("schedule", ["none", "cosine", "step", "onecycle"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizers_and_schedules(tmp_path: Path, optimizer: str, schedule: str) -> None:
    model = Classifier(optimizer=optimizer, lr_schedule=schedule, lr=0.01, mean=[0.5], std=[0.25])
    trainer = pl.Trainer(
        fast_dev_run=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, SyntheticDataModule(num_train=128, num_test=32, batch_size=16))


def test_bad_learning_rate_is_refused() -> None:
    with pytest.raises(UPIError, match="lr must be > 0"):
        Classifier(lr=0.0)


def test_ddp_spawn_fit_on_two_cpu_processes(tmp_path: Path) -> None:
    dm = SyntheticDataModule(num_train=256, num_test=64, batch_size=32)
    model = Classifier(num_classes=dm.num_classes, input_shape=dm.input_shape, mean=dm.mean, std=dm.std)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    # ddp_spawn returns only weights and callback_metrics to this process; files are written by rank 0
    assert trainer.state.finished and "val/acc" in trainer.callback_metrics
    assert [p.name for p in tmp_path.rglob("*.ckpt")] == ["epoch=0-step=3.ckpt"]


# ---- training modes (upi_lightning.regularizers) ---------------------------------------------------------


def tiny_data() -> SyntheticDataModule:
    return SyntheticDataModule(num_train=128, num_test=32, batch_size=16)


def classifier(dm: SyntheticDataModule, regularizers: list[Regularizer], **kwargs: object) -> Classifier:
    return Classifier(
        num_classes=dm.num_classes,
        input_shape=dm.input_shape,
        mean=dm.mean,
        std=dm.std,
        activation="softplus",
        regularizers=regularizers,
        **kwargs,
    )


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained small-CNN checkpoint for the synthetic 1 x 28 x 28 data (IR's teacher)."""
    dm = tiny_data()
    teacher = Classifier(num_classes=dm.num_classes, input_shape=dm.input_shape, mean=dm.mean, std=dm.std)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(teacher)
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


MODES: dict[str, Callable[[Path], list[Regularizer]]] = {
    "input_gradient": lambda teacher: [InputGradientNorm(1.0)],
    "ir": lambda teacher: [InterpretationRegularization(str(teacher), n_samples=4)],
    "upi_adversarial": lambda teacher: [UPIAdversarial(1.0, eps=1.0, every_n_steps=1)],
    "consistency": lambda teacher: [Consistency(1.0, eps=0.1)],
    "pgd": lambda teacher: [PGDAdversarial(eps=0.1, steps=2)],
}


class DumpRegularizerState(pl.Callback):
    """Each rank writes its regularizers' state to ``folder/state_rank<r>.pt`` at the end of training."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        states = [regularizer.state_dict() for regularizer in pl_module.regularizers]
        torch.save(states, self.folder / f"state_rank{trainer.global_rank}.pt")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_training_mode_fits_under_two_process_ddp(tmp_path: Path, teacher_ckpt: Path, mode: str) -> None:
    dm = tiny_data()
    model = classifier(dm, MODES[mode](teacher_ckpt))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",  # unused parameters would raise: find_unused_parameters stays False
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[DumpRegularizerState(tmp_path), RobustAccuracy(stages=("val",), steps=2, max_batches=1)],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert trainer.state.finished and torch.isfinite(metrics["train/loss_epoch"])
    assert f"train/{model.regularizers[0].name}" in metrics and "val/robust_acc_linf_0.1" in metrics
    rank0, rank1 = (torch.load(tmp_path / f"state_rank{rank}.pt", weights_only=True) for rank in (0, 1))
    if mode == "upi_adversarial":  # every rank trained against the same delta, updated at each of 3 steps
        assert rank0[0]["updates"] == rank1[0]["updates"] == 3
        assert torch.equal(rank0[0]["delta"], rank1[0]["delta"]) and rank0[0]["delta"].abs().sum() > 0


def literature_defenses() -> list[Regularizer]:
    """IG-NORM, IG-SUM-NORM, gradient consistency, attributional adversarial training and SSR, at tiny settings."""
    return [
        IGNorm(0.5, eps=0.1, steps=1, ig_steps=2, attack_ig_steps=2),
        IGSumNorm(eps=0.1, steps=1, ig_steps=2, attack_ig_steps=2),
        GradientConsistency(eps=0.05),
        AttributionalAdversarial(eps=0.1, steps=1, method="integrated_gradients", n_steps=2),
        SmoothSurfaceRegularization(),
    ]


def test_the_literature_defenses_fit_together_under_ddp_and_resume(tmp_path: Path) -> None:
    dm = tiny_data()
    common = {
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "default_root_dir": tmp_path,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    # every term is summed into one loss: unused parameters would raise (find_unused_parameters is False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", **common)
    trainer.fit(classifier(dm, literature_defenses()), dm)
    metrics = trainer.callback_metrics
    names = ["ig_norm", "ig_sum_norm", "gradient_consistency", "attributional_adversarial", "ssr"]
    assert trainer.state.finished and all(torch.isfinite(metrics[f"train/{name}"]) for name in names)
    (path,) = tmp_path.rglob("*.ckpt")
    restored = Classifier.load_from_checkpoint(path, weights_only=True)
    assert [r.config() for r in restored.regularizers] == [r.config() for r in literature_defenses()]
    resumed = pl.Trainer(**{**common, "max_epochs": 2, "enable_checkpointing": False})
    resumed.fit(classifier(dm, literature_defenses()), dm, ckpt_path=path)
    assert resumed.global_step == 4 and torch.isfinite(resumed.callback_metrics["train/loss_epoch"])


class RecordDelta(pl.Callback):
    """Keep a copy of the UPI delta after every training step (keyed by ``global_step``)."""

    def __init__(self) -> None:
        self.deltas: dict[int, Tensor] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self.deltas[trainer.global_step] = pl_module.regularizers[0].delta.clone()


class ExpectRestoredDelta(pl.Callback):
    def __init__(self, delta: Tensor, train_steps: int) -> None:
        self.delta, self.train_steps = delta, train_steps
        self.checked = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        regularizer = pl_module.regularizers[0]
        assert torch.equal(regularizer.delta, self.delta) and regularizer.train_steps == self.train_steps
        self.checked = True


def test_a_mid_training_checkpoint_restores_the_regularizer_state(tmp_path: Path) -> None:
    dm = tiny_data()

    def make() -> Classifier:
        return classifier(dm, [UPIAdversarial(1.0, eps=1.0, every_n_steps=1), InputGradientNorm(0.5)])

    record = RecordDelta()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    common = {
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "default_root_dir": tmp_path,  # the resumed Trainer checkpoints there, not into the working directory
    }
    pl.Trainer(max_steps=3, callbacks=[record, checkpoints], **common).fit(make(), dm)
    path = tmp_path / "step=2.ckpt"
    # load_from_checkpoint rebuilds the regularizers from the hyperparameters and restores their state
    restored = Classifier.load_from_checkpoint(path, weights_only=True)
    upi = restored.regularizers[0]
    assert isinstance(upi, UPIAdversarial) and isinstance(restored.regularizers[1], InputGradientNorm)
    assert torch.equal(upi.delta, record.deltas[2]) and (upi.train_steps, upi.updates) == (2, 2)
    assert not torch.equal(record.deltas[2], record.deltas[3])
    # resuming training continues from that state
    expect = ExpectRestoredDelta(record.deltas[2], 2)
    pl.Trainer(max_steps=4, callbacks=[expect], **common).fit(make(), dm, ckpt_path=path)
    assert expect.checked
    # the regularizer state is not in state_dict: a plain classifier loads the weights strictly
    checkpoint = torch.load(path, weights_only=True)
    plain = Classifier(num_classes=dm.num_classes, input_shape=dm.input_shape, mean=dm.mean, std=dm.std)
    plain.load_state_dict(checkpoint["state_dict"], strict=True)
    plain.on_load_checkpoint(checkpoint)  # a model without regularizers ignores their state
    with pytest.raises(CheckpointMismatchError, match="regularizers"):
        classifier(dm, [Consistency()]).on_load_checkpoint(checkpoint)


def test_a_training_mode_is_chosen_in_yaml_and_the_checkpoint_rebuilds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    config = tmp_path / "modes.yaml"
    config.write_text(
        "model:\n"
        "  activation: softplus\n"
        "  regularizers:\n"
        "    - class_path: upi_lightning.regularizers.UPIAdversarial\n"
        "      init_args: {weight: 2.0, norm: linf, eps: 0.05, objective: {dissimilarity: cosine}}\n"
        "    - class_path: upi_lightning.regularizers.PGDAdversarial\n"
        "      init_args: {weight: 0.5, eps: 0.05, steps: 1}\n"
    )
    cli = train_cli(
        [
            "fit",
            "--config",
            str(config),
            "--data=upi_lightning.data.SyntheticDataModule",
            "--data.num_train=128",
            "--data.num_test=32",
            "--data.batch_size=16",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ]
    )
    assert [type(r) for r in cli.model.regularizers] == [UPIAdversarial, PGDAdversarial]
    last = Path(cli.last_checkpoint_path)
    restored = Classifier.load_from_checkpoint(last, weights_only=True)
    assert restored.hparams.regularizers == cli.model.hparams.regularizers
    assert restored.regularizers[0].attack_objective.dissimilarity == "cosine"
    assert torch.equal(restored.regularizers[0].delta, cli.model.regularizers[0].delta.cpu())
    events = list(last.parents[1].glob("events.out.tfevents.*"))
    assert events and any(b"train/upi_delta" in event.read_bytes() for event in events)


def printed_config(config: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """What ``train.py fit --config configs/<config> --print_config`` prints (it must exit cleanly)."""
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as exit_info:
        train_cli(["fit", "--config", str(REPO / "configs" / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


UPI_ADVERSARIAL_VARIANTS = [
    "mnist_upi_adv_relu.yaml",
    "mnist_upi_adv_l2.yaml",
    "mnist_upi_adv_every_step.yaml",
    "cifar10_subset_upi_adv_relu.yaml",
]
"""The UPI-adversarial configurations measured against the default one (docs/RESULTS.md, issue 15)."""


@pytest.mark.parametrize("config", [*MODE_CONFIGS, *UPI_ADVERSARIAL_VARIANTS])
def test_mode_configs_parse_and_print(
    config: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "upi_lightning.regularizers." in printed_config(config, capsys, monkeypatch)


@pytest.mark.parametrize("dataset", DATASETS)
def test_softplus_configs_train_a_softplus_network(
    dataset: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    printed = printed_config(f"{dataset}_softplus.yaml", capsys, monkeypatch)
    assert "activation: softplus" in printed and "softplus_beta: 10.0" in printed


def test_the_mnist_upi_adversarial_config_trains_a_softplus_network_on_the_cosine_and_cross_entropy(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    printed = printed_config("mnist_upi_adv.yaml", capsys, monkeypatch)
    assert "activation: softplus" in printed and "dissimilarity: cosine" in printed
    assert "adversarial_ce: 1.0" in printed


def test_nesterov_without_momentum_is_refused() -> None:
    with pytest.raises(UPIError, match="nesterov needs momentum > 0"):
        Classifier(optimizer="sgd", momentum=0.0, nesterov=True)
