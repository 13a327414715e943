"""The output folder of one attack run: whose run it is, which results are done, nothing of another run.

``run.json``, written before anything else, holds the run's *identity*: everything its numbers depend on
(the options, the checkpoint digests). A rerun with the same identity resumes the run; a folder whose
``run.json`` differs, or that holds files but no ``run.json``, is refused with one line naming the first
difference, so a folder never mixes two runs.

Each (budget, method) result is saved to ``results/<method>_<norm>_eps<eps>.json`` as soon as it is
evaluated (after its perturbation file in ``perturbations/``): the result row and its transfer rows. A
resumed run reads them instead of fitting again. The figures drawn at the end are named after the
saliency method, the norm and the eps: :func:`figure_name`, :func:`sweep_name`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from upi_lightning.attacks.settings import Budget
from upi_lightning.errors import UPIError
from upi_lightning.io import atomic_write_json

RUN_FILE = "run.json"

WHERE_IT_RUNS = ("config", "output", "trainer", "progress", "attack.upi_grad.chunk_size")
"""``attack.py`` options (dotted paths) that do not change a run's numbers: a run resumes under other values of
them. ``chunk_size`` changes float rounding only, as the device and the process count do."""

ADDED_LATER: dict[str, Any] = {"options.attack.target": "label", "settings.target": "label"}
"""Entries of a run identity (dotted paths: ``attack.py``'s options, the Python API's settings) that joined
after runs were saved, with the value those runs had: a ``run.json`` without one reads as holding that
value, so an older run still resumes."""


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's content (hex)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def short(value: Any, limit: int = 80) -> str:
    """``value`` as compact JSON, cut to ``limit`` characters."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_difference(saved: Any, current: Any, where: str = "") -> str | None:
    """``"key.path: <saved> there, <current> now"`` for the first difference of two JSON values (``None``: equal).

    Mappings are compared key by key (so the path names the option); any other values as a whole.
    """
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in dict.fromkeys([*current, *saved]):
            found = first_difference(saved.get(key), current.get(key), f"{where}.{key}" if where else str(key))
            if found is not None:
                return found
        return None
    return None if saved == current else f"{where or 'run'}: {short(saved)} there, {short(current)} now"


def _holder(tree: dict[str, Any], path: str) -> tuple[dict[str, Any] | None, str]:
    """The mapping of ``tree`` that holds the dotted ``path`` (``None`` if a parent is missing), and its last key."""
    *parents, leaf = path.split(".")
    node: Any = tree
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), leaf


def without_where_it_runs(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``attack.py`` options without :data:`WHERE_IT_RUNS` (paths it does not hold are skipped)."""
    kept: dict[str, Any] = copy.deepcopy(dict(options))
    for path in WHERE_IT_RUNS:
        holder, leaf = _holder(kept, path)
        if holder is not None:
            holder.pop(leaf, None)
    return kept


LEGACY_BUDGET = re.compile(r"Budget\(norm='(l2|linf)', eps=([0-9.e+-]+)\)")
"""How ``run.json`` files of earlier versions hold default budgets (their repr, which JSON could not hold)."""


def _without_legacy_budgets(value: Any) -> Any:
    """``value`` with every :data:`LEGACY_BUDGET` string replaced by the ``{norm, eps}`` it stands for."""
    if isinstance(value, dict):
        return {key: _without_legacy_budgets(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_legacy_budgets(item) for item in value]
    match = LEGACY_BUDGET.fullmatch(value) if isinstance(value, str) else None
    return value if match is None else {"norm": match[1], "eps": float(match[2])}


def with_entries_added_later(identity: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a saved run identity as this version writes it.

    Every :data:`ADDED_LATER` entry is there (its old value where absent), and default budgets written as
    :data:`LEGACY_BUDGET` strings read as their ``{norm, eps}``.
    """
    filled: dict[str, Any] = _without_legacy_budgets(copy.deepcopy(dict(identity)))
    for path, value in ADDED_LATER.items():
        holder, leaf = _holder(filled, path)
        if holder is not None:
            holder.setdefault(leaf, value)
    return filled


def identity_difference(saved: Any, current: Mapping[str, Any]) -> str | None:
    """:func:`first_difference` of a saved run identity and the ``current`` one.

    The saved options are read without :data:`WHERE_IT_RUNS`: the file of an older version may hold
    some of them (``upi_grad.chunk_size`` joined them later), and they never make another run. Entries
    that an older version did not have read as the value it ran with (:data:`ADDED_LATER`).
    """
    if isinstance(saved, dict) and isinstance(saved.get("options"), dict):
        saved = {**saved, "options": without_where_it_runs(saved["options"])}
    if isinstance(saved, dict):
        saved = with_entries_added_later(saved)
    return first_difference(saved, current)


def figure_name(saliency: str, budget: Budget) -> str:
    """File name, without suffix, of the maps figure of ``budget``, e.g. ``figure_gradient_l2_eps1``."""
    return f"figure_{saliency}_{budget.tag}"


def sweep_name(saliency: str, norm: str) -> str:
    """File name, without suffix, of the sweep over the eps of ``norm``, e.g. ``sweep_gradient_l2``."""
    return f"sweep_{saliency}_{norm}"


class RunFolder:
    """The output folder ``path`` of the run ``identity``: its run file, saved results and TensorBoard folder.

    Args:
        path: the output folder.
        identity: what the run's numbers depend on (JSON-able; stored as ``run.json``).
    """

    def __init__(self, path: str | Path, identity: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.identity = json.loads(json.dumps(identity, default=str))  # as it reads back from run.json

    def check(self) -> None:
        """Refuse a folder that holds another run, or files of no run.

        Raises:
            UPIError: naming the first option that differs from the folder's ``run.json``, or saying the
                folder holds files but no ``run.json`` (another program's, or a run of an older version).
        """
        run_file = self.path / RUN_FILE
        if run_file.is_file():
            try:
                saved = json.loads(run_file.read_text())
            except (OSError, ValueError) as err:
                raise UPIError(f"{run_file} is unreadable ({err}); delete {self.path} to start over.") from None
            difference = identity_difference(saved, self.identity)
            if difference is not None:
                raise UPIError(
                    f"{self.path} holds another attack run ({difference}); rerun with its settings to resume "
                    "it, or choose another --output."
                )
        elif self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise UPIError(
                f"{self.path} is not an empty folder and holds no attack run ({RUN_FILE}); choose another --output."
            )

    def claim(self) -> None:
        """:meth:`check`, then write ``run.json`` if the folder does not hold it yet (the run's first file)."""
        self.check()
        if not (self.path / RUN_FILE).is_file():
            atomic_write_json(self.path / RUN_FILE, self.identity)

    def perturbation_path(self, method: str, budget: Budget) -> Path:
        """Where the universal perturbation of ``method`` in ``budget`` is saved."""
        return self.path / "perturbations" / f"{method}_{budget.tag}.pt"

    def result_path(self, method: str, budget: Budget) -> Path:
        """Where the result of ``method`` in ``budget`` is saved."""
        return self.path / "results" / f"{method}_{budget.tag}.json"

    def saved(self, method: str, budget: Budget) -> dict[str, Any] | None:
        """The saved ``{"result": row, "transfer": rows}`` of ``method`` in ``budget`` (``None``: not done)."""
        path = self.result_path(method, budget)
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self, method: str, budget: Budget, record: dict[str, Any]) -> None:
        """Save the result of ``method`` in ``budget`` (atomically: a killed run leaves it whole or absent)."""
        atomic_write_json(self.result_path(method, budget), record)

    def fresh_tensorboard(self) -> Path:
        """The ``tensorboard/`` folder, emptied: event files of an interrupted attempt of this run are removed."""
        folder = self.path / "tensorboard"
        shutil.rmtree(folder, ignore_errors=True)
        return folder
