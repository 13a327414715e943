"""Command lines: LightningCLI for ``train.py`` and the ``attack.py`` parser.

``UPILightningCLI`` links the data module's statistics (classes, image shape, mean/std) into the
model, defaults to a TensorBoard logger under ``runs/`` and always adds two ``ModelCheckpoint``
callbacks: ``checkpoint`` keeps the best by validation accuracy, ``last_checkpoint`` keeps the latest
state as ``last.ckpt`` (every epoch, or every ``--last_checkpoint.every_n_train_steps`` steps, from
the first step on: it monitors nothing, so it never waits for a validation). User errors
(:class:`UPIError`) are printed as one line instead of a traceback.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.distributed
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.fabric import Fabric
from lightning.fabric.strategies import STRATEGY_REGISTRY, DDPStrategy, Strategy
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import nn
from typing_extensions import override

from upi_lightning.attacks.run_folder import RunFolder, file_digest
from upi_lightning.attacks.runner import AttackRun
from upi_lightning.attacks.settings import AttackSettings
from upi_lightning.data import ImageDataModule
from upi_lightning.distributed import Processes, destroy_process_group_at_exit
from upi_lightning.errors import CheckpointMismatchError, ProcessLostError, UPIError, one_line
from upi_lightning.model_modes import model_device
from upi_lightning.models import build_classifier
from upi_lightning.module import Classifier

T = TypeVar("T")
Report = dict[str, Any]
"""An attack report (``report.json``)."""

WHERE_IT_RUNS = ("config", "output", "device", "trainer", "progress")
"""``attack.py`` options that do not change a run's numbers: a run resumes under other values of them."""

LIGHTNING_CKPT_NAMES = ("best", "last", "hpc", "registry")
"""``--ckpt_path`` values the Trainer resolves itself (not files)."""

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default"},
    },
}


class UPILightningCLI(LightningCLI):
    """LightningCLI with data-to-model links, TensorBoard and checkpointing by default."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for attribute in ("num_classes", "input_shape", "mean", "std"):
            parser.link_arguments(f"data.{attribute}", f"model.{attribute}", apply_on="instantiate")
        # Lightning defers a monitoring checkpoint's step-triggered saves until its metric exists (the first
        # validation), so the latest state, which a killed run resumes from, has a callback of its own
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-epoch{epoch:02d}",
                "checkpoint.auto_insert_metric_name": False,
                "last_checkpoint.filename": "last",
                "last_checkpoint.enable_version_counter": False,
            }
        )

    @override
    def _parse_ckpt_path(self) -> None:
        """Lightning's reading of the ``--ckpt_path`` hyperparameters, a missing or unreadable file in one line.

        Lightning loads the checkpoint here (safely, ``weights_only``), right after parsing.
        """
        subcommand = self.config.get("subcommand")
        ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt is not None and ckpt not in LIGHTNING_CKPT_NAMES:
            checkpoint_file(ckpt, "--ckpt_path")
        try:
            super()._parse_ckpt_path()
        except CHECKPOINT_ERRORS as err:
            raise unreadable_checkpoint(Path(str(ckpt)), err) from None

    def after_fit(self) -> None:
        """Tell the user where the logs and checkpoints are."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        if trainer.logger is not None and trainer.logger.log_dir:
            print(f"TensorBoard logs: {trainer.logger.log_dir}  (tensorboard --logdir {trainer.logger.save_dir})")
        best = self.instantiated("checkpoint")
        print(f"Last checkpoint:  {self.last_checkpoint_path}")
        print(f"Best checkpoint:  {best.best_model_path} ({best.monitor}={best.best_model_score})")

    def instantiated(self, key: str) -> Any:
        """The object the parser built for ``key`` (with or without a subcommand)."""
        return (self.config_init[self.subcommand] if self.subcommand else self.config_init)[key]

    @property
    def last_checkpoint_path(self) -> str:
        """Path of the latest ``last.ckpt`` the run wrote (``""`` before the first save)."""
        return self.instantiated("last_checkpoint").best_model_path


def user_error(err: BaseException) -> UPIError | None:
    """The :class:`UPIError` that caused ``err``, following its cause/context chain (``None`` if none).

    jsonargparse re-raises errors from a class's ``__init__`` (a data module that cannot find its files)
    as its own ``ValueError``; the user's problem is the original error.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, UPIError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def run_reporting_errors(main: Callable[[], T]) -> T:
    """Run ``main``; print a :class:`UPIError` (even one wrapped by jsonargparse) as one line, exit 2."""
    try:
        return main()
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


def train_cli(args: list[str] | None = None, run: bool = True) -> UPILightningCLI:
    """Entry point of ``train.py``: ``fit``, ``validate``, ``test`` and ``predict`` subcommands."""
    return run_reporting_errors(
        lambda: UPILightningCLI(
            Classifier,
            ImageDataModule,
            subclass_mode_data=True,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
    )


def load_classifier(ckpt: str | Path, device: torch.device | str = "cpu") -> Classifier:
    """Load a :class:`Classifier` checkpoint safely (``weights_only=True``) with clear errors.

    Raises:
        UPIError: if the file is missing.
        CheckpointMismatchError: if the file is not a readable Classifier checkpoint (corrupt, another
            architecture than its hyperparameters say, or holding pickled objects, which are refused).
    """
    path = checkpoint_file(ckpt, "--ckpt")
    try:
        return Classifier.load_from_checkpoint(path, map_location=device, weights_only=True)
    except CHECKPOINT_ERRORS as err:
        raise unreadable_checkpoint(path, err) from None


CHECKPOINT_ERRORS = (pickle.UnpicklingError, RuntimeError, KeyError, TypeError, ValueError, EOFError)
"""What loading a bad checkpoint raises (pickled objects, truncated file, weights of another model)."""


def checkpoint_file(ckpt: str | Path, flag: str) -> Path:
    """``ckpt`` as a path, checked to be a file (``flag``: the option that gave it, for the message).

    Raises:
        UPIError: if there is no file at ``ckpt``.
    """
    path = Path(ckpt)
    if not path.is_file():
        raise UPIError(
            f"No checkpoint at {path}; pass {flag} path/to/last.ckpt (train.py writes runs/.../checkpoints)."
        )
    return path


def unreadable_checkpoint(path: Path, err: BaseException) -> CheckpointMismatchError:
    """The one-line error for a checkpoint whose loading raised ``err`` (one of :data:`CHECKPOINT_ERRORS`)."""
    if isinstance(err, pickle.UnpicklingError):
        return CheckpointMismatchError(
            f"{path} holds objects that safe (weights_only) loading refuses; only load checkpoints you trust "
            f"written by train.py. ({one_line(err)})"
        )
    return CheckpointMismatchError(
        f"{path} is not a Classifier checkpoint this version can rebuild (truncated, or weights of another "
        f"architecture): {one_line(err)}"
    )


def check_model_fits_data(model: Classifier, datamodule: ImageDataModule) -> None:
    """Refuse a classifier trained on images or classes other than the data's."""
    trained = (tuple(model.hparams["input_shape"]), int(model.hparams["num_classes"]))
    data = (tuple(datamodule.input_shape), int(datamodule.num_classes))
    if trained != data:
        raise CheckpointMismatchError(
            f"The checkpoint was trained on images {trained[0]} with {trained[1]} classes, but the data has "
            f"images {data[0]} with {data[1]} classes; attack it with the data it was trained on."
        )


def check_model_takes_images(model: nn.Module, name: str, datamodule: ImageDataModule) -> None:
    """Refuse a classifier that cannot take the data's images (e.g. a 3-channel torchvision net on MNIST).

    Runs it (in eval mode) on two black images of the data's shape.

    Raises:
        CheckpointMismatchError: with the model's own error, in one line.
    """
    images = torch.zeros(2, *datamodule.input_shape, device=model_device(model))
    try:
        with torch.no_grad():
            model(images)
    except RuntimeError as err:
        raise CheckpointMismatchError(
            f"{name} cannot classify the images of {type(datamodule).__name__} (shape "
            f"{tuple(datamodule.input_shape)}): {one_line(err)}"
        ) from None


def run_identity(config: Namespace) -> dict[str, Any]:
    """What the numbers of an ``attack.py`` run depend on, its ``run.json``.

    Every option but :data:`WHERE_IT_RUNS`, and the content (SHA-256) of every checkpoint (``None`` for
    a missing one, which :func:`load_classifier` then reports).
    """
    options = {key: value for key, value in config.as_dict().items() if key not in WHERE_IT_RUNS}
    checkpoints = [Path(path) for path in [config.ckpt, *config.eval_ckpt] if path is not None]
    digests = {str(path): file_digest(path) if path.is_file() else None for path in checkpoints}
    return {"options": options, "sha256": digests}


def attack_parser() -> ArgumentParser:
    """The ``attack.py`` argument parser (YAML config via ``--config``; every option documented)."""
    parser = ArgumentParser(
        description="Fit universal perturbations for interpretation (UPI-Grad, UPI-PCA) on a classifier, "
        "evaluate them beside the baselines on held-out samples, and write report.json, report.md, figures, "
        "perturbation files and TensorBoard logs into --output.",
        env_prefix="UPI",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below.")
    parser.add_argument("--ckpt", type=str | None, default=None, help="Classifier checkpoint written by train.py.")
    parser.add_argument(
        "--model",
        type=str | None,
        default=None,
        help="Instead of --ckpt: torchvision.<name> (e.g. torchvision.resnet18).",
    )
    parser.add_argument("--pretrained", type=bool, default=False, help="With --model: torchvision's default weights.")
    parser.add_argument(
        "--eval-ckpt",
        type=str,
        action="append",
        default=[],
        help="Also evaluate every universal perturbation on this classifier of the same data (transfer); repeat "
        "for several.",
    )
    parser.add_subclass_arguments(ImageDataModule, "data", required=True, help="The data module (its attack splits).")
    parser.add_class_arguments(AttackSettings, "attack", help="What to fit and evaluate.")
    parser.add_argument("--output", type=str, default="runs/attack", help="Output folder.")
    parser.add_argument("--device", type=str, default="auto", help="One process: auto, cpu, cuda, cuda:1, ...")
    parser.add_class_arguments(
        DeviceSettings, "trainer", help="Several processes (devices or nodes), as the Trainer's flags of these names."
    )
    parser.add_argument("--progress", type=bool, default=True, help="Show progress bars and per-method lines.")
    return parser


@dataclass
class DeviceSettings:
    """Where ``attack.py`` runs when it uses several processes (Lightning Fabric, the Trainer's launcher).

    With the defaults the attack runs in this process on ``--device``; with more devices or nodes, or a
    strategy, every process fits and evaluates its share of each global batch and the report is the
    one-process report (``AttackRun``'s ``processes``).

    Attributes:
        accelerator: ``auto``, ``cpu``, ``cuda``, ``gpu``...
        devices: devices per node (an int, a list of indices, or ``auto``).
        strategy: ``auto``, ``ddp``, ``ddp_spawn``...
        num_nodes: machines.
        timeout: seconds a process waits for the others in a collective (a fit's all-reduce, a metric's
            sync) before it stops with an error, so a process that dies or hangs ends the run in bounded
            time (DDP strategies).
    """

    accelerator: str = "auto"
    devices: int | str | list[int] = 1
    strategy: str = "auto"
    num_nodes: int = 1
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise UPIError(f"--trainer.timeout is in seconds and must be > 0, got {self.timeout}.")

    def several(self) -> bool:
        """Whether these settings ask for more than this one process."""
        return self.devices not in (1, "1") or self.num_nodes != 1 or self.strategy != "auto"

    def fabric(self) -> Fabric:
        """Lightning Fabric on these settings (:meth:`fabric_strategy`).

        Raises:
            UPIError: with Lightning's message, if the settings are invalid.
        """
        try:
            return Fabric(
                accelerator=self.accelerator,
                devices=self.devices,
                strategy=self.fabric_strategy(),
                num_nodes=self.num_nodes,
            )
        except (ValueError, TypeError, RuntimeError, ImportError) as err:  # Lightning's own clear messages
            raise UPIError(f"Invalid --trainer settings {vars(self)}: {one_line(err, 300)}") from None

    def fabric_strategy(self) -> Strategy | str:
        """The strategy to give Fabric: a DDP strategy (``auto`` means ``ddp`` here) with :attr:`timeout`.

        Any other name is passed on as it is (Fabric's own timeout, if any, then applies).
        """
        name = "ddp" if self.strategy == "auto" else self.strategy
        registered = STRATEGY_REGISTRY.get(name, "unknown")  # the registry's get builds the strategy
        if not isinstance(registered, DDPStrategy):
            return self.strategy
        return type(registered)(timeout=timedelta(seconds=self.timeout), **STRATEGY_REGISTRY[name]["init_params"])


def attack_main(args: list[str] | None = None) -> Report | None:
    """Entry point of ``attack.py``: parse, then attack in this process or in several (``--trainer.*``)."""
    config = attack_parser().parse_args(args)
    if (config.ckpt is None) == (config.model is None):
        raise UPIError("Give exactly one of --ckpt (a checkpoint from train.py) or --model torchvision.<name>.")
    devices: DeviceSettings = DeviceSettings(**vars(config.trainer))
    fabric = devices.fabric() if devices.several() else None
    identity = run_identity(config)
    RunFolder(config.output, identity).check()  # refuse a folder of another run before any process starts
    if fabric is None:
        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
        )
        return attack_process(config, device, Processes(), identity)
    return fabric.launch(partial(attack_with_fabric, config=config, identity=identity, timeout=devices.timeout))


def lost_another_process(err: BaseException) -> bool:
    """Whether a collective failed because another process died or did not answer in time.

    NCCL raises :class:`torch.distributed.DistError`; gloo raises a ``RuntimeError`` quoting its own
    source (``.../gloo/transport/tcp/pair.cc: Read error ...: Connection reset by peer``, ``Timed out
    waiting ...``).
    """
    return isinstance(err, torch.distributed.DistError) or "/gloo/" in str(err)


def attack_with_fabric(fabric: Fabric, config: Namespace, identity: dict[str, Any], timeout: float) -> Report | None:
    """One process of a multi-process attack: its rank, its device, sums through ``fabric.all_reduce``.

    Raises:
        ProcessLostError: when another process died or did not answer within ``timeout`` seconds.
    """

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, fabric.all_reduce(tensor, reduce_op="sum"))

    processes = Processes(fabric.global_rank, fabric.world_size, reduce)
    try:
        report = attack_process(config, fabric.device, processes, identity)
    except RuntimeError as err:
        if not lost_another_process(err):
            raise
        raise ProcessLostError(
            f"process {fabric.global_rank} of {fabric.world_size} lost another process (it died, or did not "
            f"answer within --trainer.timeout={timeout:g} s), so no report was written; rerun the same command "
            f"to resume. ({one_line(err)})"
        ) from None
    return report if fabric.is_global_zero else None


def attack_process(config: Namespace, device: torch.device, processes: Processes, identity: dict[str, Any]) -> Report:
    """Load the model, run :class:`AttackRun` (this process's part), print where the files are (rank 0)."""
    destroy_process_group_at_exit()  # several processes on the CPU: a clean exit for gloo
    init = attack_parser().instantiate_classes(config)
    datamodule: ImageDataModule = init.data
    model: nn.Module
    if config.ckpt is not None:
        classifier = load_classifier(config.ckpt, device)
        check_model_fits_data(classifier, datamodule)
        description = {"model": str(classifier.hparams["arch"]), "ckpt": str(config.ckpt)}
        model = classifier
    else:
        torch.manual_seed(init.attack.seed)  # the same weights on every process (and run) without --pretrained
        net = build_classifier(
            config.model,
            datamodule.num_classes,
            datamodule.input_shape,
            datamodule.mean,
            datamodule.std,
            pretrained=config.pretrained,
        )
        model = net.to(device)
        description = {"model": config.model, "pretrained": config.pretrained}
    description["data"] = type(datamodule).__name__
    model.eval().requires_grad_(False)
    check_model_takes_images(model, str(description["model"]), datamodule)
    eval_models: dict[str, nn.Module] = {}
    for path in config.eval_ckpt:
        other = load_classifier(path, device)
        check_model_fits_data(other, datamodule)
        eval_models[f"{other.hparams['arch']} ({path})"] = other.eval().requires_grad_(False)
    run = AttackRun(
        model,
        datamodule,
        init.attack,
        config.output,
        description,
        progress=config.progress,
        processes=processes,
        eval_models=eval_models,
        identity=identity,
    )
    try:
        report = run.run()
    except KeyboardInterrupt:
        print(
            f"\nInterrupted: no report written; the results in {Path(config.output) / 'results'} are complete, "
            "rerun the same command to finish the run.",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    if processes.is_main:
        print(f"Report: {Path(config.output) / 'report.md'} (and report.json, figure_*.png, perturbations/)")
        print(f"TensorBoard: tensorboard --logdir {Path(config.output) / 'tensorboard'}")
    return report
