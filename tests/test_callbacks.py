"""Callbacks on tiny synthetic runs."""

from __future__ import annotations

import io
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from matplotlib.figure import Figure
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from tests.helpers import REPO, colorbar_images, custom_scalar_layout, grid_axes
from upi_lightning.attacks.pgd import pgd_attack
from upi_lightning.attacks.settings import UPIGradSettings, UPIPCASettings
from upi_lightning.callbacks import RobustAccuracy, SaliencyMonitor, UPIAttack
from upi_lightning.callbacks import upi_attack as upi_attack_module
from upi_lightning.cli import train_cli
from upi_lightning.data import SyntheticDataModule
from upi_lightning.errors import UPIError
from upi_lightning.module import Classifier
from upi_lightning.perturbation import UniversalPerturbation
from upi_lightning.plots import figure_image
from upi_lightning.plots.output import SCREEN_DPI
from upi_lightning.saliency import SaliencySettings
from upi_lightning.tensorboard_layout import DASHBOARD_METRICS
from upi_lightning.threat import threat_model

# ----------------------------------------------------------- SaliencyMonitor

SIDE, CLASSES = 8, 3


class LinearClassifier(LightningModule):
    """Logits ``W vec(x) + b`` (dropout in between): the gradient map of class ``c`` is ``|W_c|``."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(channels * SIDE * SIDE, CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _data(channels: int = 1, n: int = 10) -> tuple[DataLoader, DataLoader, TensorDataset]:
    gen = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.rand(n, channels, SIDE, SIDE, generator=gen), torch.arange(n) % CLASSES)
    return DataLoader(dataset, batch_size=3), DataLoader(dataset, batch_size=3), dataset


def _trainer(tmp_path: Path, monitor: SaliencyMonitor, epochs: int) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        limit_train_batches=2,
        log_every_n_steps=1,
        num_sanity_val_steps=2,
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _logged_images(log_dir: Path, tag: str = "saliency") -> list[tuple[int, np.ndarray]]:
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    if tag not in events.Tags()["images"]:
        return []
    return [
        (event.step, np.asarray(Image.open(io.BytesIO(event.encoded_image_string))).astype(np.float64) / 255)
        for event in events.Images(tag)
    ]


def _figure_size(figure: Figure) -> tuple[int, int, int]:
    """The shape ``(H, W, 3)`` of ``figure`` as a TensorBoard image."""
    width, height = figure.get_size_inches() * SCREEN_DPI
    return round(height), round(width), 3


def test_saliency_monitor_logs_fixed_images_and_their_maps(tmp_path: Path) -> None:
    model = LinearClassifier()
    train, val, dataset = _data()
    monitor = SaliencyMonitor(num_images=4)  # spans two validation batches of 3
    trainer = _trainer(tmp_path, monitor, epochs=2)
    trainer.fit(model, train, val)

    logged = _logged_images(tmp_path)
    assert [step for step, _ in logged] == [1, 3]  # one figure per epoch at its last step, none for the sanity check
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [event.step for event in events.Scalars("val_loss")] == [1, 3]  # beside Lightning's epoch metrics
    figure = monitor.make_figure(model, "epoch 1")  # what the last validation drew: the weights did not change
    np.testing.assert_allclose(logged[-1][1], figure_image(figure).permute(1, 2, 0).numpy(), atol=1e-6)
    assert all(image.shape == _figure_size(figure) for _, image in logged)
    assert figure.get_suptitle() == "LinearClassifier · gradient maps · epoch 1"
    axes = grid_axes(figure, 2, 4)  # images on the first row, their maps on the second
    weight = model.net[2].weight.detach().view(CLASSES, SIDE, SIDE).abs()
    maps = [weight[dataset[i][1]] / weight[dataset[i][1]].sum() for i in range(4)]  # true-class maps, sum 1
    for i in range(4):
        np.testing.assert_array_equal(axes[0][i].images[0].get_array(), dataset.tensors[0][i, 0].numpy())
        np.testing.assert_allclose(axes[1][i].images[0].get_array(), maps[i].numpy(), rtol=1e-5)
        assert axes[1][i].images[0].get_clim() == pytest.approx((0, max(m.max().item() for m in maps)))
    assert [image.get_cmap().name for image in colorbar_images(figure)] == ["inferno"]
    assert torch.equal(monitor.images, dataset.tensors[0][:4])
    assert torch.equal(monitor.labels, dataset.tensors[1][:4])


def test_saliency_monitor_every_n_epochs_and_under_validate(tmp_path: Path) -> None:
    model = LinearClassifier(channels=3)
    train, val, _ = _data(channels=3)
    monitor = SaliencyMonitor(
        num_images=2, every_n_epochs=2, saliency=SaliencySettings("smoothgrad", n_samples=3), tag="maps"
    )
    trainer = _trainer(tmp_path, monitor, epochs=3)
    trainer.fit(model, train, val)
    assert [step for step, _ in _logged_images(tmp_path, "maps")] == [3]  # after epoch index 1 only
    figure = monitor.make_figure(model)
    assert figure.get_suptitle() == "LinearClassifier · smoothgrad maps"
    colour = grid_axes(figure, 2, 2)[0][1].images[0].get_array()
    np.testing.assert_array_equal(colour, monitor.images[1].permute(1, 2, 0).numpy())  # colour images in colour

    validate_dir = tmp_path / "validate"
    monitor = SaliencyMonitor(num_images=2, use_labels=False)
    _trainer(validate_dir, monitor, epochs=1).validate(model, val)  # runs under torch.inference_mode
    (image,) = [image for _, image in _logged_images(validate_dir)]
    assert image.shape == _figure_size(monitor.make_figure(model))
    assert monitor.labels is None
    assert not monitor.images.is_inference()


def test_saliency_monitor_restores_modes_and_checkpoints_its_images(tmp_path: Path) -> None:
    model = LinearClassifier()
    train, val, dataset = _data()
    monitor = SaliencyMonitor(num_images=5)
    trainer = _trainer(tmp_path, monitor, epochs=1)
    trainer.fit(model, train, val)
    model.train()
    model.net[1].eval()
    monitor.make_figure(model)
    assert model.training and model.net[0].training and not model.net[1].training

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"][monitor.state_key]
    restored = SaliencyMonitor(num_images=5)
    restored.load_state_dict(state)
    assert torch.equal(restored.images, dataset.tensors[0][:5])
    assert torch.equal(restored.labels, dataset.tensors[1][:5])
    assert SaliencyMonitor(tag="a").state_key != SaliencyMonitor(tag="b").state_key


def test_saliency_monitor_keeps_the_images_of_a_validation_shorter_than_num_images(tmp_path: Path) -> None:
    model = LinearClassifier()
    train, val, dataset = _data()  # 10 validation images
    monitor = SaliencyMonitor(num_images=12)
    _trainer(tmp_path, monitor, epochs=2).fit(model, train, val)
    assert torch.equal(monitor.images, dataset.tensors[0])  # the first validation's 10, no repeats added later
    first, second = (image for _, image in _logged_images(tmp_path))
    assert first.shape == second.shape
    restored = SaliencyMonitor(num_images=12)
    restored.load_state_dict({"images": dataset.tensors[0][:2], "labels": dataset.tensors[1][:2]})
    _trainer(tmp_path / "resumed", restored, epochs=1).fit(model, train, val)
    assert torch.equal(restored.images, dataset.tensors[0][:2])  # restored images are final too


@pytest.mark.parametrize(
    "kwargs",
    [{"num_images": 0}, {"every_n_epochs": 0}, {"saliency": {"method": "occlusion"}}],
)
def test_saliency_monitor_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(UPIError):
        SaliencyMonitor(**kwargs)


def test_saliency_monitor_rejects_unknown_batches(tmp_path: Path) -> None:
    monitor = SaliencyMonitor()
    trainer = _trainer(tmp_path, monitor, epochs=1)
    with pytest.raises(UPIError, match="image tensor"):
        monitor.on_validation_batch_end(trainer, LinearClassifier(), None, {"image": torch.rand(2)}, 0)
    with pytest.raises(UPIError, match="validation epoch"):
        monitor.make_figure(LinearClassifier())


# ----------------------------------------------------------- UPIAttack


class TinyNet(LightningModule):
    """Conv(-BN)-ReLU-conv-ReLU-dropout-linear classifier of 1 x 28 x 28 images.

    ``frozen``: the training loss is ``0 * CE``, so the weights never change (every parameter still gets a
    gradient, as DDP wants) and runs on 1 or 2 processes attack the very same model.
    """

    def __init__(self, batch_norm: bool = True, frozen: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, 4, 3, stride=2, padding=1)]
        layers += [nn.BatchNorm2d(4)] if batch_norm else []
        layers += [nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Dropout(0.2)]
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 7 * 7, 10))
        self.frozen = frozen

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        return 0.0 * loss if self.frozen else loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("test_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def upi_data() -> SyntheticDataModule:
    """128 training and 64 test images: attack_fit and attack_eval hold 32 each."""
    return SyntheticDataModule(num_train=128, num_test=64, batch_size=16)


def upi_trainer(root: Path, callbacks: list[Callback], devices: int = 1, **kwargs: Any) -> Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": devices,
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "default_root_dir": root,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        **({"strategy": "ddp_spawn"} if devices > 1 else {}),
        **kwargs,
    }
    return Trainer(callbacks=callbacks, **options)


def small_attack(**kwargs: Any) -> UPIAttack:
    """One global batch of 16 to fit, one to evaluate; one UPI-Grad pass, three power passes."""
    options: dict[str, Any] = {
        "methods": ("upi_grad",),
        "fit_batches": 1,
        "eval_batches": 1,
        "batch_size": 16,
        "upi_grad": UPIGradSettings(epochs=1),
        "upi_pca": UPIPCASettings(n_iter=3),
        "k": 20,
        "only_correct": False,  # untrained models: evaluate every sample
        "num_images": 2,
        **kwargs,
    }
    return UPIAttack(**options)


class DumpAttack(Callback):
    """Each rank saves the UPIAttack deltas, counters, metrics and logged ``upi/`` metrics to ``<name>_rank<r>.pt``."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        (attack,) = [callback for callback in trainer.callbacks if isinstance(callback, UPIAttack)]
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("upi/")}
        state = {"deltas": attack.deltas, "attacks": attack.attacks, "metrics": metrics, "all": attack.metrics}
        torch.save(state, self.folder / f"{self.name}_rank{trainer.global_rank}.pt")


def test_upi_attack_under_two_process_ddp_equals_one_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet(batch_norm=False, frozen=True)
    weights = {key: value.clone() for key, value in model.state_dict().items()}

    def attack() -> UPIAttack:  # 2 global batches of 16 fit samples: 8 + 8 per batch on 2 ranks
        # enough power passes to converge: an unconverged iterate amplifies the rounding differences of the
        # two summation orders (3 passes: max |diff| 2e-3 at |cos| 1.0000; converged: 4e-6)
        methods = ("upi_grad", "upi_pca", "random")
        return small_attack(methods=methods, fit_batches=2, eval_batches=2, upi_pca=UPIPCASettings(n_iter=10))

    ddp = upi_trainer(tmp_path, [attack(), DumpAttack(tmp_path, "ddp")], devices=2)
    ddp.fit(model, upi_data())
    model.load_state_dict(weights)
    upi_trainer(tmp_path, [attack(), DumpAttack(tmp_path, "one")]).fit(model, upi_data())
    rank0, rank1, one = (
        torch.load(tmp_path / name, weights_only=True) for name in ("ddp_rank0.pt", "ddp_rank1.pt", "one_rank0.pt")
    )
    assert rank0["attacks"] == rank1["attacks"] == one["attacks"] == 1
    for method in ("upi_grad", "upi_pca", "random"):  # every rank ends with the bit-identical delta
        assert torch.equal(rank0["deltas"][method], rank1["deltas"][method])
    # the same deltas as one process on the same 32 samples; UPI-PCA too, as its smoothing noise is keyed
    # by sample (the same noise whichever process holds the sample)
    for method in ("upi_grad", "upi_pca"):
        assert (rank0["deltas"][method] - one["deltas"][method]).abs().max() < 1e-5, method
    assert torch.equal(rank0["deltas"]["random"], one["deltas"]["random"])
    assert rank0["metrics"] == rank1["metrics"]
    compared = [key for key in one["metrics"] if key.split("/")[1] in ("upi_grad", "upi_pca", "random")]
    compared = [key for key in compared if "seconds" not in key]
    assert len(compared) == 3 * len(DASHBOARD_METRICS)  # logged: the stability metrics
    for key in compared:
        assert rank0["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-6), key
    assert one["all"]["upi_grad"]["n_samples"] == 32  # kept in the callback: counts, norms, clean accuracy
    for method, metrics in one["all"].items():
        for key, value in metrics.items():
            if "seconds" not in key:
                assert rank0["all"][method][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (method, key)


class Snapshot(Callback):
    """At every training epoch end, record the model's tensors, gradients, modes and the random state.

    ``mix_modes`` first puts the dropout layer in eval mode, so the train/eval flags differ per module.
    """

    def __init__(self, mix_modes: bool = False) -> None:
        self.mix_modes = mix_modes
        self.records: list[dict[str, Any]] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mix_modes:
            pl_module.net[-3].eval()
        self.records.append(
            {
                "tensors": {key: value.clone() for key, value in pl_module.state_dict().items()},
                "grads": [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()],
                "requires_grad": [p.requires_grad for p in pl_module.parameters()],
                "modes": [module.training for module in pl_module.modules()],
                "rng": torch.get_rng_state(),
                "grad_enabled": torch.is_grad_enabled(),
            }
        )


def assert_same_records(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, value in before["tensors"].items():  # parameters and BatchNorm statistics, bit for bit
        assert torch.equal(value, after["tensors"][key]), key
    assert any(grad is not None for grad in before["grads"])
    for grad_before, grad_after in zip(before["grads"], after["grads"], strict=True):
        assert (grad_before is None and grad_after is None) or torch.equal(grad_before, grad_after)
    for key in ("requires_grad", "modes", "grad_enabled"):
        assert before[key] == after[key], key
    assert torch.equal(before["rng"], after["rng"])


def test_upi_attack_leaves_the_model_and_training_unchanged(tmp_path: Path) -> None:
    def train(callbacks: list[Callback]) -> TinyNet:
        torch.manual_seed(0)
        model = TinyNet(batch_norm=True)
        # no validation: the attack runs in on_train_epoch_end, with the model in train mode
        upi_trainer(tmp_path, callbacks, max_epochs=3, limit_val_batches=0).fit(model, upi_data())
        return model

    # SmoothGrad maps draw their noise from the global generator: the callback must restore its state
    saliency = SaliencySettings(method="smoothgrad", n_samples=2)
    attack = small_attack(methods=("upi_grad", "upi_pca", "random"), every_n_epochs=2, saliency=saliency)
    before, after = Snapshot(mix_modes=True), Snapshot()
    trained = train([before, attack, after])
    assert attack.attacks == 2 and attack.fit_epoch == 2  # after epoch 1 (every 2nd) and epoch 2 (the last)
    assert sorted(p.name for p in (tmp_path / "upi").iterdir()) == sorted(
        f"{method}_l2_eps1_fit-epoch{epoch}-step{step}.pt"
        for method in ("upi_grad", "upi_pca", "random")
        for epoch, step in ((1, 4), (2, 6))
    )
    assert before.records[0]["modes"] != [True] * len(before.records[0]["modes"])
    for record_before, record_after in zip(before.records, after.records, strict=True):
        assert_same_records(record_before, record_after)
    reference = train([Snapshot(mix_modes=True)])  # same seed, no attack: the same weights, bit for bit
    for key, value in reference.state_dict().items():
        assert torch.equal(value, trained.state_dict()[key]), key


def test_upi_attack_images_sit_beside_its_scalars_in_tensorboard(tmp_path: Path) -> None:
    torch.manual_seed(0)
    logger = TensorBoardLogger(str(tmp_path), name="steps")
    trainer = upi_trainer(tmp_path, [small_attack(stages=("fit", "test"))], max_epochs=2, logger=logger)
    model, data = TinyNet(), upi_data()
    trainer.fit(model, data)
    trainer.test(model, data)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    for tag in ("upi", "test/upi"):
        scalars = [event.step for event in events.Scalars(f"{tag}/upi_grad/relative_l2")]
        assert scalars == [event.step for event in events.Images(f"{tag}/upi_grad/delta")]
    assert scalars == [4]  # test: the global step; fit: each epoch's last step, as Lightning's metrics
    assert [event.step for event in events.Scalars("upi/upi_grad/relative_l2")] == [1, 3]


class ExpectAttackState(Callback):
    def __init__(self, attack: UPIAttack, attacks: int, delta: Tensor) -> None:
        self.attack, self.attacks, self.delta = attack, attacks, delta
        self.checked = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self.attack.attacks == self.attacks and self.attack.fit_epoch == self.attacks - 1
        assert torch.equal(self.attack.deltas["upi_grad"], self.delta)
        self.checked = True


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # no ModelCheckpoint on resume
def test_upi_attack_state_is_checkpointed_and_restored_on_resume(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet(batch_norm=False, frozen=True)
    attack = small_attack(warm_start=True, num_images=0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    upi_trainer(tmp_path, [attack, checkpoints], max_epochs=2, enable_checkpointing=True).fit(model, upi_data())
    assert (attack.attacks, attack.fit_epoch, attack.global_step) == (2, 1, 4)
    assert set(attack.metrics) == {"upi_grad"} and attack.metrics["upi_grad"]["n_samples"] == 16
    first = UniversalPerturbation.load(tmp_path / "upi" / "upi_grad_l2_eps1_fit-epoch0-step2.pt")
    assert first.metadata["metrics"]["n_samples"] == 16 and first.metadata["epoch"] == 0
    path = tmp_path / "ckpt" / "epoch=0.ckpt"
    state = torch.load(path, weights_only=True)["callbacks"][attack.state_key]
    assert (state["attacks"], state["fit_epoch"], state["global_step"]) == (1, 0, 2)
    assert torch.equal(state["deltas"]["upi_grad"], first.delta)
    assert not torch.equal(first.delta, attack.deltas["upi_grad"])  # the warm start moved it further

    resumed = small_attack(warm_start=True, num_images=0)
    expect = ExpectAttackState(resumed, 1, first.delta)
    trainer = upi_trainer(tmp_path / "resumed", [resumed, expect], max_epochs=2)
    trainer.fit(TinyNet(batch_norm=False, frozen=True), upi_data(), ckpt_path=path, weights_only=True)
    assert expect.checked and resumed.attacks == 2
    # the weights never change, so continuing from the restored delta gives the uninterrupted result
    assert torch.equal(resumed.deltas["upi_grad"], attack.deltas["upi_grad"])


class ExpectInferenceMode(Callback):
    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.modes.append(torch.is_inference_mode_enabled())

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.modes.append(torch.is_inference_mode_enabled())


def test_upi_attack_runs_in_test_and_validate_under_inference_mode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    attack = small_attack(methods=("upi_grad", "upi_pca", "random"))
    probe = ExpectInferenceMode()
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = upi_trainer(tmp_path, [probe, attack], logger=logger, limit_test_batches=1)  # inference_mode=True
    (tested,) = trainer.test(model, upi_data(), verbose=False)
    (validated,) = trainer.validate(model, upi_data(), verbose=False)
    assert probe.modes == [True, True] and attack.attacks == 2
    for results, stage in ((tested, "test"), (validated, "val")):
        for method in ("upi_grad", "upi_pca", "random"):
            # the stability metrics and the fit time are logged; the counts stay in the callback and its files
            assert {key for key in results if key.startswith(f"{stage}/upi/{method}/")} == {
                f"{stage}/upi/{method}/{metric}" for metric in (*DASHBOARD_METRICS, "fit_seconds")
            }
            assert results[f"{stage}/upi/{method}/relative_l2"] > 0 and attack.metrics[method]["n_seen"] == 16
    layout = custom_scalar_layout(tmp_path)  # one chart per metric, the methods overlaid, for every stage
    assert list(layout) == ["upi: L2 ε = 1 (fit)", "val/upi: L2 ε = 1 (validate)", "test/upi: L2 ε = 1 (test)"]
    assert layout["test/upi: L2 ε = 1 (test)"]["spearman"] == [
        f"test/upi/{method}/spearman" for method in ("upi_grad", "upi_pca", "random")
    ]
    assert not any(delta.is_inference() for delta in attack.deltas.values())
    for stage in ("test", "validate"):
        saved = UniversalPerturbation.load(tmp_path / "upi" / f"upi_pca_l2_eps1_{stage}-epoch0-step0.pt")
        assert saved.metadata["stage"] == stage and torch.equal(saved.delta, attack.deltas["upi_pca"])
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    tags = set(events.Tags()["images"])
    assert {"test/upi/figure", "val/upi/figure", "test/upi/upi_grad/delta", "val/upi/random/delta"} <= tags
    assert len(_logged_images(tmp_path, "test/upi/upi_pca/delta")) == 1


def test_upi_attack_refuses_data_without_attack_splits(tmp_path: Path) -> None:
    loader = DataLoader(TensorDataset(torch.rand(8, 1, 28, 28), torch.arange(8) % 10), batch_size=4)
    trainer = upi_trainer(tmp_path, [small_attack()], limit_val_batches=0)
    with pytest.raises(UPIError, match="attack_fit_dataloader"):
        trainer.fit(TinyNet(), loader)
    trainer = upi_trainer(tmp_path, [small_attack(stages=("test",))], limit_val_batches=0, max_steps=1)
    trainer.fit(TinyNet(), loader)  # not attacking during fit: any data is fine


@pytest.mark.parametrize(
    "kwargs",
    [
        {"methods": ("uap",)},
        {"methods": ()},
        {"methods": ("upi_grad", "upi_grad")},
        {"stages": ("predict",)},
        {"fit_batches": 0},
        {"batch_size": 0},
        {"every_n_epochs": -1},
        {"every_n_epochs": 0, "at_fit_end": False},
        {"eps": 0.0},
        {"norm": "l1"},
        {"target": "argmax"},
    ],
)
def test_upi_attack_invalid_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(UPIError):
        UPIAttack(**kwargs)


def test_upi_attack_config_parses(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as exit_info:
        train_cli(["fit", "--config", str(REPO / "configs" / "mnist_upi_callback.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "upi_lightning.callbacks.UPIAttack" in printed and "surrogate_beta: 10.0" in printed


# ----------------------------------------------------------- RobustAccuracy


def test_robust_accuracy_callback_logs_during_fit_and_test(tmp_path: Path) -> None:
    dm = SyntheticDataModule(num_train=128, num_test=32, batch_size=16)
    model = Classifier(num_classes=dm.num_classes, input_shape=dm.input_shape, mean=dm.mean, std=dm.std)
    callback = RobustAccuracy(norm="l2", eps=0.5, steps=2, stages=("val", "test"), max_batches=1)
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=2,
        callbacks=[callback],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    assert 0 <= trainer.callback_metrics["val/robust_acc_l2_0.5"] <= 1
    (result,) = trainer.test(model, dm, verbose=False)  # runs under torch.inference_mode
    assert 0 <= result["test/robust_acc_l2_0.5"] <= 1


def test_bad_callback_stages_are_refused() -> None:
    with pytest.raises(UPIError, match="stages"):
        RobustAccuracy(stages=("train",))


# ----------------------------------------------------------- RobustAccuracy and SaliencyMonitor under DDP


def ddp_spawn() -> DDPStrategy:
    """``strategy="ddp_spawn"`` (gloo on CPU) whose collectives time out after 60 s: a hang fails the test."""
    return DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60))


class RankShards(LightningDataModule):
    """Every loader serves ``(images, labels)`` in batches of 8: all of them on one process; on two, rank 0
    gets the first ``split`` samples and rank 1 the rest (run with ``use_distributed_sampler=False``).

    Unequal shards make the mean of the per-rank accuracies differ from the global accuracy.
    """

    def __init__(self, images: Tensor, labels: Tensor, split: int) -> None:
        super().__init__()
        self.dataset, self.split = TensorDataset(images, labels), split

    def loader(self) -> DataLoader:
        indices = list(range(len(self.dataset)))
        if self.trainer is not None and self.trainer.world_size > 1:
            indices = indices[: self.split] if self.trainer.global_rank == 0 else indices[self.split :]
        return DataLoader(Subset(self.dataset, indices), batch_size=8)

    def train_dataloader(self) -> DataLoader:
        return self.loader()

    def val_dataloader(self) -> DataLoader:
        return self.loader()

    def test_dataloader(self) -> DataLoader:
        return self.loader()


class DumpRobust(Callback):
    """Each rank saves the samples it evaluated and its logged robust accuracies to ``<name>_rank<r>.pt``."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.seen = 0

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        self.seen += len(batch[0])

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        self.seen += len(batch[0])

    def dump(self, trainer: Trainer) -> None:
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if "robust_acc" in key}
        state = {"seen": self.seen, "metrics": metrics}
        torch.save(state, self.folder / f"{self.name}_rank{trainer.global_rank}.pt")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.dump(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.dump(trainer)


ROBUST: dict[str, Any] = {"norm": "linf", "eps": 0.01, "steps": 3, "random_start": False}  # deterministic PGD


def robust_data(model: TinyNet) -> tuple[Tensor, Tensor, Tensor]:
    """32 noise images, labels the model's clean predictions on chosen samples (else wrong), and the
    per-sample PGD outcome computed by calling :func:`pgd_attack` directly, batch by batch as the loaders do.

    The clean accuracy is 18/24 on rank 0's shard (samples 0-23) and 2/8 on rank 1's.
    """
    images = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        predicted = model.eval()(images).argmax(dim=1)
    correct = torch.tensor([i % 4 != 0 for i in range(24)] + [i < 2 for i in range(8)])
    labels = torch.where(correct, predicted, (predicted + 1) % 10)
    threat = threat_model(ROBUST["norm"], ROBUST["eps"])
    robust = []
    for x, y in zip(images.split(8), labels.split(8), strict=True):
        adversarial = pgd_attack(model, x, y, threat, steps=ROBUST["steps"], random_start=False)
        with torch.no_grad():
            robust.append(model(adversarial).argmax(dim=1) == y)
    model.train()
    return images, labels, torch.cat(robust)


@pytest.mark.parametrize("stage", ["val", "test"])
def test_robust_accuracy_under_two_process_ddp_is_the_global_figure(tmp_path: Path, stage: str) -> None:
    torch.manual_seed(0)
    model = TinyNet(batch_norm=False, frozen=True)  # no buffers; the weights never change
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    images, labels, robust = robust_data(model)
    expected = robust.float().mean().item()  # sum of correct / sum of count over all 32 samples
    mean_of_means = (robust[:24].float().mean().item() + robust[24:].float().mean().item()) / 2
    assert robust.sum() < 20  # of the 20 clean-correct samples, PGD fools some: the attack matters
    assert abs(mean_of_means - expected) > 0.1, "the shards must tell a global figure from a mean of means"
    key = f"{stage}/robust_acc_linf_0.01"

    def trainer(name: str, devices: int = 1) -> Trainer:
        callbacks = [RobustAccuracy(stages=(stage,), **ROBUST), DumpRobust(tmp_path, name)]
        return upi_trainer(
            tmp_path,
            callbacks,
            devices=devices,
            limit_train_batches=1,  # one optimizer step on each rank (their shards have 3 and 1 batches)
            limit_val_batches=1.0,
            use_distributed_sampler=False,
            **({"strategy": ddp_spawn()} if devices > 1 else {}),
        )

    data = RankShards(images, labels, split=24)
    if stage == "val":
        trainer("ddp", devices=2).fit(model, data)
    else:
        trainer("ddp", devices=2).test(model, data, verbose=False)
    model.load_state_dict(weights)
    rank0, rank1 = (torch.load(tmp_path / f"ddp_rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert (rank0["seen"], rank1["seen"]) == (24, 8)
    assert rank0["metrics"][key] == rank1["metrics"][key] == pytest.approx(expected, abs=1e-7)

    # one process on the same frozen model and the same 32 samples, under fit (no_grad), validate and test
    # (torch.inference_mode), logs the same figure
    one = trainer("one")
    if stage == "val":
        one.fit(model, data)
        assert one.callback_metrics[key].item() == pytest.approx(expected, abs=1e-7)
        (result,) = one.validate(model, data, verbose=False)
    else:
        (result,) = one.test(model, data, verbose=False)
    assert result[key] == pytest.approx(expected, abs=1e-7)
    assert torch.load(tmp_path / "one_rank0.pt", weights_only=True)["seen"] == 32


class FrozenLinear(LinearClassifier):
    """A ``LinearClassifier`` trained on ``0 * CE``: the weights never change (DDP still gets gradients)."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return 0.0 * super().training_step(batch, batch_idx)


class CountingMonitor(SaliencyMonitor):
    """A ``SaliencyMonitor`` that counts the figures it draws; after every validation, each rank saves its
    images, labels and count to ``<name>_rank<r>.pt``."""

    def __init__(self, folder: Path, name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.folder, self.name = folder, name
        self.figures = 0

    def make_figure(self, pl_module: LightningModule, moment: str = "") -> Figure:
        self.figures += 1
        return super().make_figure(pl_module, moment)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state = {"images": self.images, "labels": self.labels, "figures": self.figures}
        torch.save(state, self.folder / f"{self.name}_rank{trainer.global_rank}.pt")


def test_saliency_monitor_under_two_process_ddp_draws_on_rank_zero_what_one_process_draws(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FrozenLinear()
    train, val, dataset = _data()  # 10 samples; the DistributedSampler gives rank 0 samples 0, 2, 4, 6, 8
    shard = [0, 2, 4, 6, 8]

    def trainer(name: str, devices: int = 1) -> Trainer:
        # 6 images asked, 5 in rank 0's shard: the first validation captures 5 and every figure shows them
        monitor = CountingMonitor(tmp_path, name, num_images=6)
        logger = TensorBoardLogger(tmp_path / name, name="", version="")
        return upi_trainer(
            tmp_path,
            [monitor],
            devices=devices,
            max_epochs=2,
            limit_val_batches=1.0,
            log_every_n_steps=1,
            logger=logger,
            **({"strategy": ddp_spawn()} if devices > 1 else {}),
        )

    trainer("ddp", devices=2).fit(model, train, val)
    rank0, rank1 = (torch.load(tmp_path / f"ddp_rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert (rank0["figures"], rank1["figures"]) == (2, 0)  # only rank 0 computes maps and draws
    assert torch.equal(rank0["images"], dataset.tensors[0][shard])  # each rank keeps the start of its shard
    assert torch.equal(rank0["labels"], dataset.tensors[1][shard])
    assert torch.equal(rank1["images"], dataset.tensors[0][1::2])
    assert len(list((tmp_path / "ddp").rglob("events.out.tfevents.*"))) == 1  # rank 1 writes no event file
    logged = _logged_images(tmp_path / "ddp")
    assert [step for step, _ in logged] == [1, 3]
    assert logged[0][1].shape == logged[1][1].shape  # 5 images at every epoch (only the titles differ)

    # one process validating rank 0's shard logs the same figures; its maps are |W_y| / sum |W_y|
    one, loader = trainer("one"), DataLoader(Subset(dataset, shard), batch_size=3)
    one.fit(model, train, loader)
    logged_one = _logged_images(tmp_path / "one")
    assert [step for step, _ in logged_one] == [1, 3]
    for (_, image), (_, image_one) in zip(logged, logged_one, strict=True):
        np.testing.assert_array_equal(image, image_one)
    (monitor,) = [callback for callback in one.callbacks if isinstance(callback, CountingMonitor)]
    one.validate(model, DataLoader(dataset, batch_size=3), verbose=False)  # torch.inference_mode, other data
    assert torch.equal(monitor.images, dataset.tensors[0][shard]) and monitor.figures == 3  # kept its images
    assert [step for step, _ in _logged_images(tmp_path / "one")] == [1, 3, 4]
    figure = monitor.make_figure(model, "epoch 1")
    np.testing.assert_allclose(logged[-1][1], figure_image(figure).permute(1, 2, 0).numpy(), atol=1e-6)
    weight = model.net[2].weight.detach().view(CLASSES, SIDE, SIDE).abs()
    for axes, index in zip(grid_axes(figure, 2, 5)[1], shard, strict=True):
        label = dataset.tensors[1][index]
        np.testing.assert_allclose(axes.images[0].get_array(), (weight[label] / weight[label].sum()).numpy(), rtol=1e-5)


def test_upi_attack_evaluates_the_predicted_class_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    targets: list[str] = []
    evaluate = upi_attack_module.evaluate_perturbation

    def recording(*args: Any, **kwargs: Any) -> dict[str, float]:
        targets.append(kwargs["target"])
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(upi_attack_module, "evaluate_perturbation", recording)
    attack = small_attack(target="predicted")
    upi_trainer(tmp_path, [attack]).fit(TinyNet(frozen=True), upi_data())
    assert attack.settings.target == "predicted" and targets == ["predicted"]  # the fits: tests/test_methods.py
