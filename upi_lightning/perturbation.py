"""The universal perturbation: one ``(C, H, W)`` tensor in its ball, saved and loaded safely.

:class:`UniversalPerturbation` holds ``delta``, its threat model (norm and radius) and free-form
provenance; :meth:`~UniversalPerturbation.save` writes only tensors and primitives, atomically, so
:meth:`~UniversalPerturbation.load` reads the file with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from upi_lightning.errors import CheckpointMismatchError, UPIError, one_line
from upi_lightning.io import atomic_write
from upi_lightning.threat import Norm, ThreatModel, apply_perturbation, check_eps, check_norm, threat_model

FORMAT_NAME = "upi_lightning.universal_perturbation"
FORMAT_VERSION = 1

_STORABLE_LEAVES = (Tensor, str, int, float, bool, type(None))


def _check_storable(value: Any, where: str) -> None:
    """Raise :class:`UPIError` unless ``value`` is a tensor, a primitive, or a list/tuple/dict of them."""
    if isinstance(value, _STORABLE_LEAVES):
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_storable(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise UPIError(f"metadata keys must be strings, got {key!r} in {where}.")
            _check_storable(item, f"{where}[{key!r}]")
        return
    raise UPIError(
        f"metadata {where} is a {type(value).__name__}; only tensors, str/int/float/bool/None and "
        "lists/dicts of them can be saved (files are loaded with weights_only=True). Convert it first."
    )


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class UniversalPerturbation:
    """One universal perturbation ``delta`` of shape ``(C, H, W)`` in the ball of radius ``eps``.

    Attributes:
        delta: the perturbation in pixel units (float32).
        norm: ``"l2"`` or ``"linf"``.
        eps: the radius of the ball ``delta`` lies in.
        metadata: free-form provenance (method, model, data shape, fit settings...), tensors and
            primitives only; ``created`` (UTC ISO date) is added when missing.

    Raises:
        UPIError: on an unknown norm, ``eps <= 0``, a ``delta`` that is not a finite 3-D float tensor,
            or a ``delta`` outside its own ball.

    """

    delta: Tensor
    norm: Norm
    eps: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.norm = check_norm(self.norm)
        self.eps = check_eps(self.eps)
        if not isinstance(self.delta, Tensor) or not self.delta.is_floating_point() or self.delta.dim() != 3:
            raise UPIError(
                "delta must be a floating-point tensor of shape (C, H, W), got "
                f"{getattr(self.delta, 'shape', type(self.delta).__name__)}."
            )
        if not bool(torch.isfinite(self.delta).all()):
            raise UPIError("delta contains NaN or inf values; refit the perturbation.")
        if not self.threat.contains(self.delta):
            found = self.threat.norm_of(self.delta).item()
            raise UPIError(
                f"delta has {self.norm} norm {found:.6g} > eps={self.eps:.6g}; call project_() or use a larger eps."
            )
        if not isinstance(self.metadata, dict):
            raise UPIError(f"metadata must be a dict, got {type(self.metadata).__name__}.")
        self.delta = self.delta.detach().float()
        self.metadata = dict(self.metadata)
        self.metadata.setdefault("created", _utc_now())
        _check_storable(self.metadata, "metadata")

    @property
    def threat(self) -> ThreatModel:
        """The ball ``delta`` lies in."""
        return threat_model(self.norm, self.eps)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images it applies to."""
        return tuple(self.delta.shape)  # type: ignore[return-value]

    def apply(self, x: Tensor) -> Tensor:
        """``clip(x + delta, 0, 1)`` for a batch ``x`` of shape ``(N, C, H, W)`` (delta moved to ``x``)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise UPIError(
                f"images of shape {tuple(x.shape)} do not match the perturbation shape (N, {self.shape}); "
                "fit or load a perturbation for this data."
            )
        return apply_perturbation(x, self.delta.to(device=x.device, dtype=x.dtype))

    def project_(self) -> UniversalPerturbation:
        """Project ``delta`` onto its ball in place and return ``self``."""
        self.delta = self.threat.project(self.delta)
        return self

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one ``.pt`` file atomically (temporary file in the same folder, then ``os.replace``).

        The file holds only tensors and primitives, so :meth:`load` reads it with ``weights_only=True``.
        """
        path = Path(path)
        payload = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "delta": self.delta.detach().cpu().contiguous(),
            "norm": self.norm,
            "eps": self.eps,
            "metadata": self.metadata,
        }
        atomic_write(path, lambda stream: torch.save(payload, stream))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], expected_shape: tuple[int, ...] | None = None) -> UniversalPerturbation:
        """Read a file written by :meth:`save` with ``torch.load(weights_only=True)`` on the CPU.

        Args:
            path: the ``.pt`` file.
            expected_shape: ``(C, H, W)`` of the data it will be applied to; checked if given.

        Raises:
            UPIError: if the file does not exist.
            CheckpointMismatchError: if the file is truncated, corrupt, holds anything but plain tensors
                and primitives (e.g. a pickle that would run code: it is not executed), is not a
                perturbation, has a newer format version, a wrong shape, or a delta outside its ball.

        """
        path = Path(path)
        if not path.is_file():
            raise UPIError(f"No perturbation file at {path}; check the path or fit one first.")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointMismatchError(
                f"{path} is not a readable perturbation file (truncated, corrupt, or containing objects "
                f"that weights_only loading refuses): {one_line(err, 300)}"
            ) from err
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
            raise CheckpointMismatchError(
                f"{path} is not a universal perturbation file (no format={FORMAT_NAME!r} entry); "
                "pass a file written by UniversalPerturbation.save."
            )
        version = payload.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
            raise CheckpointMismatchError(
                f"{path} has format_version {version!r}, this version of upi_lightning reads "
                f"1..{FORMAT_VERSION}; upgrade upi_lightning to load it."
            )
        try:
            perturbation = cls(payload["delta"], payload["norm"], payload["eps"], payload["metadata"])
        except (KeyError, UPIError) as err:
            raise CheckpointMismatchError(f"{path} holds an invalid perturbation: {err}") from err
        if expected_shape is not None and perturbation.shape != tuple(expected_shape):
            raise CheckpointMismatchError(
                f"{path} holds a perturbation of shape {perturbation.shape} but the data has images of "
                f"shape {tuple(expected_shape)}; fit a perturbation for this dataset."
            )
        return perturbation
