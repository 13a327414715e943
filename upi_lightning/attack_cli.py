"""The ``attack.py`` command line: its parser, one or several processes (Lightning Fabric), the run.

Each process loads the model and data, runs its part of :class:`~upi_lightning.attacks.runner.AttackRun`
and sums through ``fabric.all_reduce``; rank 0 writes the files. User errors are one line.
"""

from __future__ import annotations

import sys
from argparse import ArgumentError
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.fabric import Fabric
from lightning.fabric.strategies import STRATEGY_REGISTRY, DDPStrategy, Strategy
from torch import nn

from upi_lightning.attacks.run_folder import RunFolder, file_digest, without_where_it_runs
from upi_lightning.attacks.runner import AttackRun
from upi_lightning.attacks.settings import AttackSettings
from upi_lightning.checkpoints import (
    check_model_fits_data,
    check_model_takes_images,
    checkpoint_file,
    load_classifier,
    stored_datamodule,
)
from upi_lightning.data import ImageDataModule
from upi_lightning.distributed import Processes, destroy_process_group_at_exit
from upi_lightning.errors import ProcessLostError, UPIError, one_line, run_reporting_errors
from upi_lightning.models import build_classifier

Report = dict[str, Any]
"""An attack report (``report.json``)."""


def run_identity(config: Namespace) -> dict[str, Any]:
    """What the numbers of an ``attack.py`` run depend on, its ``run.json``.

    Every option but :data:`~upi_lightning.attacks.run_folder.WHERE_IT_RUNS`, and the content (SHA-256) of
    every checkpoint (``None`` for a missing one, which :func:`load_classifier` then reports).
    """
    options = without_where_it_runs(config.as_dict())
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
        help="Instead of --ckpt: torchvision.<name> or timm.<name> (e.g. torchvision.resnet18), with --data.",
    )
    parser.add_argument(
        "--pretrained", type=bool, default=False, help="With --model: its library's pretrained weights."
    )
    parser.add_argument(
        "--eval_ckpt",
        "--eval-ckpt",
        type=str,
        action="append",
        default=[],
        help="Also evaluate every universal perturbation on this classifier of the same data (transfer); repeat "
        "for several.",
    )
    parser.add_subclass_arguments(
        ImageDataModule,
        "data",
        required=False,
        help="The data module (its attack splits); by default, with --ckpt, the one the checkpoint was trained on.",
    )
    parser.add_class_arguments(AttackSettings, "attack", help="What to fit and evaluate.")
    # the default budgets as YAML gives them, so that --print_config writes a config that reads back
    parser.set_defaults({"attack.budgets": [asdict(budget) for budget in AttackSettings().budgets]})
    parser.add_argument("--output", type=str, default="runs/attack", help="Output folder.")
    parser.add_class_arguments(
        DeviceSettings, "trainer", help="Where it runs: the device(s), as the Trainer's flags of these names."
    )
    parser.add_argument("--progress", type=bool, default=True, help="Show progress bars and per-method lines.")
    return parser


@dataclass
class DeviceSettings:
    """Where ``attack.py`` runs: the Trainer's device flags, resolved by Lightning Fabric.

    With one device (the default) the attack runs in this process on it (``accelerator: auto`` picks a
    GPU when there is one; ``devices: [1]`` the second GPU); with more devices or nodes, or a strategy,
    every process fits and evaluates its share of each global batch and the report is the one-process
    report (``AttackRun``'s ``processes``).

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
        one_device = self.devices in (1, "1") or (isinstance(self.devices, list) and len(self.devices) == 1)
        return not one_device or self.num_nodes != 1 or self.strategy != "auto"

    def fabric(self) -> Fabric:
        """Lightning Fabric on these settings (:meth:`fabric_strategy` for several processes).

        Raises:
            UPIError: with Lightning's message, if the settings are invalid.
        """
        try:
            return Fabric(
                accelerator=self.accelerator,
                devices=self.devices,
                strategy=self.fabric_strategy() if self.several() else "auto",
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


def parse_attack_args(args: list[str] | None = None) -> Namespace:
    """Parse ``attack.py``'s arguments; without ``--data``, the data module ``--ckpt`` was trained on.

    ``--data.<name> value`` alone (no ``--data``, no ``--config``) changes one argument of that recorded data
    module, e.g. the path of its files after the run moved.

    Raises:
        UPIError: unless exactly one of ``--ckpt`` and ``--model`` is given, or when the data module is
            neither given nor recorded in the checkpoint.
    """
    config = parse_with_recorded_data(attack_parser(), sys.argv[1:] if args is None else args, lambda c: c.ckpt)
    if (config.ckpt is None) == (config.model is None):
        raise UPIError("Give exactly one of --ckpt (a checkpoint from train.py) or --model (e.g. timm.resnet18).")
    if config.data is None:
        if config.ckpt is None:
            raise UPIError("--model needs --data: the data module whose images it classifies.")
        config.data = data_parser().parse_object({"data": stored_datamodule(config.ckpt)}).data
    return config


def parse_with_recorded_data(
    parser: ArgumentParser, args: list[str], ckpt_of: Callable[[Namespace], str | None]
) -> Namespace:
    """Parse ``args``; ``--data.<name>`` options with no data module given change the recorded one's arguments.

    Without a ``--data`` class (on the command line or in a ``--config``), jsonargparse has no class to give
    ``--data.<name>`` to. Then the options are parsed once without them, the checkpoint ``ckpt_of`` names
    (``--ckpt``, or compare's first model) gives the data module it was trained on as the default, and
    the options change single arguments of it.

    Raises:
        UPIError: if that checkpoint is missing.
    """
    class_given = any(arg == "--data" or arg.startswith("--data=") for arg in args)
    if class_given or not any(arg.startswith("--data.") for arg in args):
        return parser.parse_args(args)
    rest = [arg for index, arg in enumerate(args) if not _is_data_option(args, index)]
    parser.exit_on_error = False  # a first pass that fails (e.g. a config's data needs the options) says nothing
    try:
        first = parser.parse_args(rest)
    except ArgumentError:
        first = None
    finally:
        parser.exit_on_error = True
    ckpt = None if first is None else ckpt_of(first)
    if first is not None and first.data is None and ckpt is not None:
        path = checkpoint_file(ckpt, "--ckpt")
        parser.set_defaults(data=data_parser().parse_object({"data": stored_datamodule(path)}).data.as_dict())
    return parser.parse_args(args)


def _is_data_option(args: list[str], index: int) -> bool:
    """Whether ``args[index]`` is a ``--data.<name>`` option, or the value after one without ``=``."""
    arg, previous = args[index], args[index - 1] if index > 0 else ""
    return arg.startswith("--data.") or (previous.startswith("--data.") and "=" not in previous)


def data_parser() -> ArgumentParser:
    """A parser of ``attack.py``'s ``--data`` alone (the data module's ``class_path`` and ``init_args``)."""
    parser = ArgumentParser()
    parser.add_subclass_arguments(ImageDataModule, "data")
    return parser


def attack_main(args: list[str] | None = None) -> Report | None:
    """Entry point of ``attack.py``: parse, then :func:`run_attack`."""
    return run_attack(parse_attack_args(args))


def run_attack(config: Namespace) -> Report | None:
    """Attack as :func:`parse_attack_args`' ``config`` says, in this process or in several (``--trainer.*``).

    Returns the report (``None`` on the processes other than rank 0 of a multi-process run).
    """
    devices: DeviceSettings = DeviceSettings(**vars(config.trainer))
    fabric = devices.fabric()
    identity = run_identity(config)
    RunFolder(config.output, identity).check()  # refuse a folder of another run before any process starts
    if not devices.several():
        return attack_process(config, fabric.device, Processes(), identity)
    return fabric.launch(partial(attack_with_fabric, config=config, identity=identity, timeout=devices.timeout))


def main(args: list[str] | None = None) -> None:
    """The ``upi-attack`` command (and ``attack.py``): :func:`attack_main`, user errors in one line."""
    run_reporting_errors(partial(attack_main, args))


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
