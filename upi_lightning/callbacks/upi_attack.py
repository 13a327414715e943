"""``UPIAttack``: fit universal perturbations on the model being trained and log what they do to its maps."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.utils.data import Dataset
from typing_extensions import override

from upi_lightning.attacks.baselines import random_universal
from upi_lightning.attacks.engine import Init
from upi_lightning.attacks.evaluate import evaluate_perturbation
from upi_lightning.attacks.methods import fit_method
from upi_lightning.attacks.settings import (
    Budget,
    MethodSettings,
    Target,
    UPIGradSettings,
    UPIPCASettings,
    as_settings,
)
from upi_lightning.callbacks.attack_outputs import attack_figure, log_attack_images, save_attack_perturbations
from upi_lightning.distributed import Reduce, destroy_process_group_at_exit, shard_batches
from upi_lightning.errors import UPIError
from upi_lightning.model_modes import evaluation_mode, gradients_enabled, model_device
from upi_lightning.plots import budget_label
from upi_lightning.saliency import SaliencySettings
from upi_lightning.tensorboard_layout import DASHBOARD_METRICS, Layout, dashboard_metrics, overlay_layout
from upi_lightning.threat import Norm

Batch = tuple[Tensor, Tensor]


CallbackMethod = Literal["upi_grad", "upi_pca", "random"]
CALLBACK_METHODS: tuple[str, ...] = get_args(CallbackMethod)
AttackStage = Literal["fit", "validate", "test"]
ATTACK_STAGES: tuple[str, ...] = get_args(AttackStage)
STAGE_PREFIX = {"fit": "", "validate": "val/", "test": "test/"}
LOGGED = (*DASHBOARD_METRICS, "fit_seconds")
"""What UPIAttack logs of each method."""


class UPIAttack(Callback):
    """Attack the interpretation of the model being trained with universal perturbations, and log the result.

    **When.** During ``trainer.fit``, after every ``every_n_epochs``-th training epoch and after the last
    one (``at_fit_end``; the last epoch is known from ``max_epochs``/``max_steps`` or a stop requested
    before the attack). The attack runs in the validation that ends the epoch when there is one (so that
    epoch's checkpoint holds its result and ``ModelCheckpoint``/``EarlyStopping`` can monitor its
    metrics), else at the end of the training epoch. It also runs at the end of ``trainer.validate`` and
    ``trainer.test``; ``stages`` chooses among ``fit``, ``validate`` and ``test``.

    **What.** Each method of ``methods`` (``upi_grad``, ``upi_pca``, and ``random``, a random perturbation
    on the sphere of the same norm: the baseline to beat) is fitted on the first ``fit_batches`` batches
    of ``batch_size`` samples of the datamodule's ``attack_fit_dataloader()`` dataset and evaluated with
    :func:`~upi_lightning.attacks.evaluate.evaluate_perturbation` (maps of the model itself) on the first
    ``eval_batches`` batches of its ``attack_eval_dataloader()`` dataset (any
    :class:`~upi_lightning.data.ImageDataModule` has both). The stability metrics
    (:data:`~upi_lightning.tensorboard_layout.DASHBOARD_METRICS`) and ``fit_seconds`` are logged with
    ``self.log`` as ``upi/<method>/<metric>`` (``val/upi/...`` in ``validate``, ``test/upi/...`` in
    ``test``), the counts kept in :attr:`metrics`. TensorBoard gets one chart per metric overlaying the
    methods (a custom-scalars layout, written in ``setup`` by the trainer's first ``UPIAttack`` for all),
    each perturbation as the image ``upi/<method>/delta`` and the figure ``upi/figure`` (clean images and
    maps, the maps under each perturbation on one colour scale, the perturbations); global rank 0 saves
    each perturbation (:class:`~upi_lightning.perturbation.UniversalPerturbation`, metrics in its
    metadata) to ``<trainer.log_dir>/upi/<method>_<norm>_eps<eps>_<stage>-epoch<E>-step<S>.pt``.
    ``upi`` is ``prefix``: give each instance its own when attacking several budgets.

    **Several processes.** ``batch_size`` is the global batch: process ``r`` of ``W`` takes samples
    ``r, r + W, ...`` of every global batch (a last batch of fewer than ``W`` samples is dropped), the
    gradients w.r.t. ``delta``, the power-method products and the metric states are summed over
    processes (``trainer.strategy.reduce``, torchmetrics), so every process ends with the bit-identical
    ``delta`` and the same metrics, equal up to float rounding to a one-process run of the same settings
    (exactly so when the objective draws no noise, ``sigma = 0``). Only drawing and saving are
    rank-0-only, and they call no collective.

    **No side effects.** The model runs in eval mode (every submodule's train/eval flag restored), the
    gradients w.r.t. ``delta`` come from ``torch.autograd.grad`` (parameter ``.grad`` untouched), BatchNorm
    statistics are not updated and the global random state is restored, so training continues exactly
    as without the callback. It works under ``trainer.validate``/``trainer.test`` with the default
    ``inference_mode=True``: the attack runs under ``torch.inference_mode(False)`` and
    ``torch.enable_grad()``, with its data loaded inside.

    **Checkpoints.** The last perturbation of each method, the last metrics and the counters
    (``attacks``, ``fit_epoch``, ``global_step``) are the callback state (tensors and primitives only:
    ``weights_only`` loading works) and come back on resume (``ckpt_path=``); with ``warm_start`` UPI-Grad
    continues from the previous perturbation.

    Args:
        methods: which of ``upi_grad``, ``upi_pca``, ``random`` to run.
        norm: ``"l2"`` or ``"linf"``.
        eps: radius of the perturbation ball, pixel units.
        every_n_epochs: attack after training epochs ``n - 1, 2n - 1, ...`` (0-based); 0 = only at the end.
        at_fit_end: also attack after the last training epoch.
        stages: where to attack: ``fit``, ``validate``, ``test``.
        fit_batches: global batches of the attack_fit split to fit on.
        eval_batches: global batches of the attack_eval split to evaluate on.
        batch_size: global batch size (split over the processes; at least the number of processes).
        saliency: the maps under attack and evaluated (:class:`~upi_lightning.saliency.SaliencySettings`).
        upi_grad: UPI-Grad settings (:class:`~upi_lightning.attacks.settings.UPIGradSettings`).
        upi_pca: UPI-PCA settings (:class:`~upi_lightning.attacks.settings.UPIPCASettings`).
        k: top-k size of the top-k metrics (and of a ``topk_mass`` objective).
        only_correct: evaluate only the correctly classified held-out samples.
        warm_start: start UPI-Grad from its previous perturbation (random start the first time).
        num_images: held-out images in the TensorBoard figure (0: no figure).
        save: save the perturbations to the log folder.
        prefix: first part of every metric, image tag, folder name and of the checkpoint key.
        seed: seeds the random starts, the smoothing noise and the random baseline (the same every time).
        target: the maps explain each sample's true ``label`` or the class the model ``predicted`` on the
            clean image (:class:`~upi_lightning.attacks.settings.MethodSettings`).
    """

    def __init__(
        self,
        methods: Sequence[CallbackMethod] = ("upi_grad", "random"),
        norm: Norm = "l2",
        eps: float = 1.0,
        every_n_epochs: int = 1,
        at_fit_end: bool = True,
        stages: Sequence[AttackStage] = ("fit", "validate", "test"),
        fit_batches: int = 4,
        eval_batches: int = 4,
        batch_size: int = 128,
        saliency: SaliencySettings | None = None,
        upi_grad: UPIGradSettings | None = None,
        upi_pca: UPIPCASettings | None = None,
        k: int = 100,
        only_correct: bool = True,
        warm_start: bool = False,
        num_images: int = 6,
        save: bool = True,
        prefix: str = "upi",
        seed: int = 0,
        target: Target = "label",
    ) -> None:
        super().__init__()
        unknown = [m for m in [*methods, *stages] if m not in CALLBACK_METHODS + ATTACK_STAGES]
        if unknown or not methods or not stages or len(set(methods)) != len(methods):
            raise UPIError(
                f"UPIAttack needs distinct methods from {list(CALLBACK_METHODS)} and stages from "
                f"{list(ATTACK_STAGES)}; got methods={list(methods)}, stages={list(stages)}."
            )
        counts = {"fit_batches": fit_batches, "eval_batches": eval_batches, "batch_size": batch_size, "k": k}
        if any(value < 1 for value in counts.values()) or every_n_epochs < 0 or num_images < 0:
            raise UPIError(
                f"UPIAttack needs fit_batches, eval_batches, batch_size, k >= 1 and every_n_epochs, num_images >= 0; "
                f"got {counts}, every_n_epochs={every_n_epochs}, num_images={num_images}."
            )
        if every_n_epochs == 0 and not at_fit_end and "fit" in stages:
            raise UPIError("UPIAttack would never attack during fit: set every_n_epochs >= 1 or at_fit_end=true.")
        self.budget = Budget(norm, eps)
        self.methods: tuple[CallbackMethod, ...] = tuple(methods)
        self.stages: tuple[AttackStage, ...] = tuple(stages)
        self.every_n_epochs, self.at_fit_end = every_n_epochs, at_fit_end
        self.fit_batches, self.eval_batches, self.batch_size = fit_batches, eval_batches, batch_size
        self.settings = MethodSettings(
            saliency=as_settings(SaliencySettings, saliency),
            upi_grad=as_settings(UPIGradSettings, upi_grad),
            upi_pca=as_settings(UPIPCASettings, upi_pca),
            k=k,
            seed=seed,
            target=target,
        )
        self.only_correct, self.warm_start = only_correct, warm_start
        self.num_images, self.save, self.prefix = num_images, save, prefix
        self.deltas: dict[str, Tensor] = {}
        self.metrics: dict[str, dict[str, float]] = {}
        self.attacks = 0
        self.fit_epoch = -1
        self.global_step = -1

    @property
    @override
    def state_key(self) -> str:
        """Checkpoint key; distinct for instances with different prefixes or budgets."""
        return self._generate_state_key(prefix=self.prefix, norm=self.budget.norm, eps=self.budget.eps)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The last perturbations (CPU tensors), their metrics and the counters."""
        return {
            "deltas": dict(self.deltas),
            "metrics": {method: dict(values) for method, values in self.metrics.items()},
            "attacks": self.attacks,
            "fit_epoch": self.fit_epoch,
            "global_step": self.global_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the perturbations, metrics and counters."""
        self.deltas = dict(state_dict["deltas"])
        self.metrics = {method: dict(values) for method, values in state_dict["metrics"].items()}
        self.attacks = int(state_dict["attacks"])
        self.fit_epoch = int(state_dict["fit_epoch"])
        self.global_step = int(state_dict["global_step"])

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the data and the batch size before any training, so a bad setting fails at once."""
        destroy_process_group_at_exit()  # DDP on the CPU: a clean exit for gloo
        if stage not in self.stages:
            return
        attacks = [callback for callback in trainer.callbacks if isinstance(callback, UPIAttack)]  # type: ignore[attr-defined]
        if trainer.is_global_zero and attacks[0] is self:  # one layout per run, so the first writes all
            layout: Layout = {}
            for attack in attacks:
                layout |= attack.layout()
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_custom_scalars(layout)
        self.attack_datasets(trainer)
        if self.batch_size < trainer.world_size:
            raise UPIError(
                f"UPIAttack batch_size={self.batch_size} is the global batch, split over {trainer.world_size} "
                f"processes; use batch_size >= {trainer.world_size}."
            )

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """During fit: attack in the validation that ends a due epoch. In ``validate``: attack once."""
        if trainer.sanity_checking:
            return
        if trainer.state.fn == TrainerFn.FITTING:
            progress = trainer.fit_loop.epoch_loop.batch_progress
            ends_epoch = progress.is_last_batch or progress.current.ready == trainer.num_training_batches
            if ends_epoch and self.fit_due(trainer):
                self.run(trainer, pl_module, "fit")
        elif trainer.state.fn == TrainerFn.VALIDATING and "validate" in self.stages:
            self.run(trainer, pl_module, "validate")

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Attack after a due training epoch that no validation ended."""
        if self.fit_due(trainer):
            self.run(trainer, pl_module, "fit")

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Attack once at the end of ``trainer.test``."""
        if "test" in self.stages:
            self.run(trainer, pl_module, "test")

    def layout(self) -> Layout:
        """This attack's custom-scalars categories: one per stage, a chart per logged metric overlaying the methods."""
        layout: Layout = {}
        for stage in self.stages:
            tag = f"{STAGE_PREFIX[stage]}{self.prefix}"
            category = f"{tag}: {budget_label(self.budget.norm, self.budget.eps)} ({stage})"
            layout |= overlay_layout(category, tag + "/{method}/{metric}", self.methods, LOGGED)
        return layout

    def fit_due(self, trainer: Trainer) -> bool:
        """Whether the training epoch that just ended is to be attacked (and was not yet)."""
        epoch = trainer.current_epoch
        if "fit" not in self.stages or self.fit_epoch == epoch:
            return False
        periodic = self.every_n_epochs > 0 and (epoch + 1) % self.every_n_epochs == 0
        return periodic or (self.at_fit_end and _last_epoch(trainer))

    def attack_datasets(self, trainer: Trainer) -> tuple[Dataset[Any], Dataset[Any]]:
        """The map-style datasets to fit on and to evaluate on (override to take them elsewhere).

        Raises:
            UPIError: if the trainer's datamodule has no ``attack_fit_dataloader``/``attack_eval_dataloader``.
        """
        datamodule: Any = getattr(trainer, "datamodule", None)
        if not all(hasattr(datamodule, f"attack_{split}_dataloader") for split in ("fit", "eval")):
            raise UPIError(
                "UPIAttack takes its samples from the datamodule's attack_fit_dataloader() and "
                "attack_eval_dataloader(); pass a upi_lightning.data.ImageDataModule as datamodule= to "
                f"trainer.fit/validate/test (got {type(datamodule).__name__})."
            )
        return datamodule.attack_fit_dataloader().dataset, datamodule.attack_eval_dataloader().dataset

    def run(self, trainer: Trainer, pl_module: LightningModule, stage: AttackStage) -> dict[str, dict[str, float]]:
        """Fit and evaluate every method now, then log, draw and save. Call it on every process.

        Returns:
            The metrics of each method (the same on every process).
        """
        folder = Path(trainer.log_dir or ".") / self.prefix if self.save else None  # a collective: every rank
        fit_data, eval_data = self.attack_datasets(trainer)
        reduce = partial(trainer.strategy.reduce, reduce_op="sum")
        shard = partial(shard_batches, rank=trainer.global_rank, world_size=trainer.world_size)
        cuda = [pl_module.device] if pl_module.device.type == "cuda" else []
        figure = None
        with torch.random.fork_rng(devices=cuda), evaluation_mode(pl_module), gradients_enabled():
            device = pl_module.device
            fit_batches = shard(fit_data, self.fit_batches, self.batch_size, device=device)
            eval_batches = shard(eval_data, self.eval_batches, self.batch_size, device=device)
            results: dict[str, dict[str, float]] = {}
            for method in self.methods:
                started = time.perf_counter()
                delta = self.fit(method, pl_module, fit_batches, reduce)
                seconds = time.perf_counter() - started
                results[method] = evaluate_perturbation(
                    pl_module,
                    eval_batches,
                    delta,
                    saliency=self.settings.saliency,
                    k=self.settings.k,
                    only_correct=self.only_correct,
                    target=self.settings.target,
                )
                results[method]["fit_seconds"] = seconds
                self.deltas[method] = delta.detach().cpu()
            if trainer.is_global_zero and self.num_images > 0:
                moment = f"{stage}, epoch {trainer.current_epoch}, step {trainer.global_step}"
                deltas: dict[str, Tensor] = {name: self.deltas[name] for name in self.methods}
                saliency = self.settings.saliency
                figure = attack_figure(pl_module, eval_batches, deltas, self.budget, saliency, self.num_images, moment)
        self.metrics = results
        self.attacks += 1
        self.global_step = trainer.global_step
        if stage == "fit":
            self.fit_epoch = trainer.current_epoch
        tag = f"{STAGE_PREFIX[stage]}{self.prefix}"
        for name, metrics in results.items():
            for metric, value in dashboard_metrics(metrics, ("fit_seconds",)).items():
                # identical on every rank (fit_seconds aside): sync_dist only averages away Lightning's warning
                pl_module.log(f"{tag}/{name}/{metric}", value, sync_dist=True)
        if trainer.is_global_zero:
            self.write(trainer, pl_module, stage, tag, folder, figure)
        return results

    def fit(self, method: CallbackMethod, model: nn.Module, batches: list[Batch], reduce: Reduce) -> Tensor:
        """Fit one method on this process's ``batches`` (sums reduced across processes); return ``delta``."""
        if method == "random":
            shape = (*batches[0][0].shape[1:],)
            draws = random_universal(shape, self.budget.threat, 1, self.settings.seed)
            return draws[0].to(model_device(model))
        previous = self.deltas.get(method) if self.warm_start else None
        init: Init | Tensor = "random" if previous is None else previous
        return fit_method(method, model, batches, self.budget, self.settings, reduce=reduce, init=init).delta

    def write(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        stage: AttackStage,
        tag: str,
        folder: Path | None,
        figure: Figure | None,
    ) -> None:
        """Rank 0: add the images to TensorBoard and save the perturbations (no collective in here)."""
        deltas: dict[str, Tensor] = {method: self.deltas[method] for method in self.methods}
        log_attack_images(trainer, tag, deltas, self.budget, figure)
        if folder is not None:
            provenance = {
                "model": type(pl_module).__name__,
                "fit_batches": self.fit_batches,
                "batch_size": self.batch_size,
                "saliency": asdict(self.settings.saliency),
            }
            save_attack_perturbations(folder, trainer, stage, deltas, self.budget, self.metrics, provenance)


def _last_epoch(trainer: Trainer) -> bool:
    """Whether the training epoch that just ended is the last one (``max_epochs``, ``max_steps`` or a stop)."""
    loop = trainer.fit_loop
    max_epochs = loop.max_epochs
    by_epochs = max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs
    by_steps = loop.max_steps >= 0 and trainer.global_step >= loop.max_steps
    return by_epochs or by_steps or trainer.should_stop
