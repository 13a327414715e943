"""The ``compare.py`` command line: attack several checkpoints the same way and compare them fairly.

Every model gets the full ``attack.py`` run (same data, same settings; each attack fitted on the model
it evaluates) in ``<output>/<name>/`` (resumable, :class:`~upi_lightning.attacks.run_folder.RunFolder`)
and a profile in ``<output>/<name>/profile.json`` (:mod:`~upi_lightning.attacks.profile`; recomputed
only when its identity, the run's and the ``robust`` settings, changes). Then ``compare.json``,
``compare.md`` and ``compare.png`` / ``.pdf`` put them side by side. User errors are one line.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser, Namespace

from upi_lightning.attack_cli import (
    DeviceSettings,
    attack_parser,
    data_parser,
    parse_with_recorded_data,
    run_attack,
    run_identity,
)
from upi_lightning.attacks.comparison import HEADLINE_METRICS, comparison, comparison_markdown
from upi_lightning.attacks.profile import RobustSettings, model_profile
from upi_lightning.attacks.run_folder import RunFolder, first_difference, identity_difference
from upi_lightning.attacks.runner import attack_loaders
from upi_lightning.attacks.settings import AttackSettings
from upi_lightning.checkpoints import check_model_fits_data, load_classifier, stored_datamodule
from upi_lightning.errors import UPIError, run_reporting_errors
from upi_lightning.io import atomic_write_json, atomic_write_text
from upi_lightning.plots import Bar, budget_label, comparison_figure, save_figure

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
"""A model name: it names a folder."""
NOT_FOR_COMPARE = ("ckpt", "model", "eval_ckpt")
"""``attack.py`` options that ``--models`` replaces."""


def compare_parser() -> ArgumentParser:
    """``attack.py``'s parser with ``--models`` and a ``robust`` section (``--ckpt`` is refused)."""
    parser = attack_parser()
    parser.description = (
        "Attack several classifiers of the same data with the same settings (each attack fitted on the model it "
        "evaluates), profile them (clean and PGD accuracy, concentration and map-image cosine of the clean maps) "
        "and write compare.json, compare.md and compare.png into --output."
    )
    parser.add_argument(
        "--models", type=str, nargs="+", default=[], help="Two or more NAME=CKPT (checkpoints of train.py)."
    )
    parser.add_class_arguments(RobustSettings, "robust", help="PGD robust accuracy of each model's profile.")
    parser.set_defaults({"robust.budgets": [asdict(budget) for budget in RobustSettings().budgets]})
    parser.set_defaults(output="runs/compare")
    return parser


def parse_models(entries: list[str]) -> dict[str, Path]:
    """``NAME=CKPT`` entries by name.

    Raises:
        UPIError: on fewer than two models, a malformed entry or name, a repeated name or a missing file.
    """
    if len(entries) < 2:
        raise UPIError(f"--models needs at least two NAME=CKPT entries to compare, got {len(entries)}.")
    models: dict[str, Path] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not NAME.fullmatch(name) or not path:
            raise UPIError(f"--models entry {entry!r} is not NAME=CKPT (NAME of letters, digits, '_', '.', '-').")
        if name in models:
            raise UPIError(f"--models names must be unique: {name!r} is given twice.")
        if not Path(path).is_file():
            raise UPIError(f"--models {name}: no checkpoint at {path}.")
        models[name] = Path(path)
    return models


def parse_compare_args(args: list[str] | None = None) -> Namespace:
    """Parse ``compare.py``'s arguments; without ``--data``, the data module the first model was trained on.

    ``--data.<name> value`` alone changes one argument of it, as in ``attack.py``.

    Raises:
        UPIError: on ``--ckpt``, ``--model`` or ``--eval_ckpt``, bad ``--models``, or several processes.
    """
    arguments = sys.argv[1:] if args is None else args
    config = parse_with_recorded_data(compare_parser(), arguments, first_model_ckpt)
    given = [name for name in NOT_FOR_COMPARE if config[name] not in (None, [])]
    if given:
        raise UPIError(f"compare takes its checkpoints from --models NAME=CKPT, not --{given[0]}.")
    models = parse_models(config.models)
    if DeviceSettings(**vars(config.trainer)).several():
        raise UPIError("compare runs in one process: give one device (--trainer.devices=1, strategy auto).")
    if config.data is None:
        config.data = data_parser().parse_object({"data": stored_datamodule(next(iter(models.values())))}).data
    return config


def first_model_ckpt(config: Namespace) -> str:
    """The checkpoint of the first ``--models`` entry (whose data module is the default data)."""
    return str(next(iter(parse_models(config.models).values())))


def model_config(config: Namespace, name: str, ckpt: Path) -> Namespace:
    """The ``attack.py`` configuration of one model: its checkpoint, ``<output>/<name>``, the rest shared."""
    single = config.clone()
    for key in ("models", "robust"):
        del single[key]
    single.ckpt = str(ckpt)
    single.output = str(Path(config.output) / name)
    return single


def profile_of(config: Namespace, robust: RobustSettings) -> dict[str, Any]:
    """The profile of ``config``'s model, read from ``profile.json`` if it has this identity, else computed.

    Identities compare as a run folder's do (:func:`~upi_lightning.attacks.run_folder.identity_difference`):
    an option added since the file was written counts as the same when it is ``null``, and an option that
    does not change the numbers (``WHERE_IT_RUNS``) is not compared.
    """
    path = Path(config.output) / "profile.json"
    identity = json.loads(json.dumps({"run": run_identity(config), "robust": asdict(robust)}, default=str))
    if path.is_file():
        saved = json.loads(path.read_text())
        saved_identity = saved.get("identity") or {}
        same_run = identity_difference(saved_identity.get("run"), identity["run"]) is None
        if same_run and first_difference(saved_identity.get("robust"), identity["robust"]) is None:
            return dict(saved["profile"])
    init = attack_parser().instantiate_classes(config)
    settings: AttackSettings = init.attack
    device = DeviceSettings(**vars(config.trainer)).fabric().device
    model = load_classifier(config.ckpt, device)
    check_model_fits_data(model, init.data)
    model.eval().requires_grad_(False)
    _, eval_loader = attack_loaders(init.data, settings)
    profile = model_profile(model, eval_loader, settings, robust)
    atomic_write_json(path, {"identity": identity, "profile": profile})
    return profile


def comparison_bars(results: list[dict[str, Any]]) -> list[Bar]:
    """The figure's bars: a panel per headline metric and budget, a group per method, a bar per model."""
    return [
        Bar(
            f"{metric} · {budget_label(row['norm'], row['eps'])}",
            row["method"],
            row["model"],
            row["metrics"][metric],
            row["metrics"].get(f"{metric}_std"),
        )
        for row in results
        for metric in HEADLINE_METRICS
    ]


def compare_main(args: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``compare.py``: attack and profile every model, then write the comparison."""
    config = parse_compare_args(args)
    init = compare_parser().instantiate_classes(config)
    robust: RobustSettings = init.robust
    output = Path(config.output)
    models = {name: model_config(config, name, ckpt) for name, ckpt in parse_models(config.models).items()}
    for single in models.values():  # every model against the data, every folder, before the first attack
        check_model_fits_data(load_classifier(single.ckpt), init.data)
        RunFolder(single.output, run_identity(single)).check()
    reports: dict[str, dict[str, Any]] = {}
    profiles: dict[str, dict[str, Any]] = {}
    for name, single in models.items():
        report = run_attack(single)
        assert report is not None  # one process: this one is rank 0
        reports[name], profiles[name] = report, profile_of(single, robust)
    compared = comparison(reports, profiles)
    atomic_write_json(output / "compare.json", compared)
    atomic_write_text(output / "compare.md", comparison_markdown(compared))
    figure = comparison_figure(comparison_bars(compared["results"]), columns=len(HEADLINE_METRICS))
    save_figure(figure, output / "compare")
    print(f"Comparison: {output / 'compare.md'} (and compare.json, compare.png)")  # as attack.py's Report: line
    return compared


def main(args: list[str] | None = None) -> None:
    """The ``upi-compare`` command (and ``compare.py``): :func:`compare_main`, user errors in one line."""
    run_reporting_errors(partial(compare_main, args))
