r"""Perturbations in pixel space: norm balls, projection, ascent steps, and the universal perturbation file.

A perturbation ``delta`` lives in pixel space (images in ``[0, 1]``) inside the ball
:math:`B_\varepsilon = \{\delta : \|\delta\|_p \le \varepsilon\}` with ``p`` in ``{2, inf}``, and is applied
as :math:`\mathrm{clip}(x + \delta, 0, 1)`. A universal perturbation has the shape ``(C, H, W)`` of one
image; a batch of per-sample perturbations ``(N, C, H, W)`` is handled by ``per_sample=True`` (one ball
per sample).

The steepest-ascent step of every attack (UPI-Grad, the per-sample attack, the classification UAP) is
:func:`projected_ascent_step`; the random starts and the random baseline come from
:func:`random_in_ball` and :func:`random_on_sphere`.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from upi_lightning.errors import CheckpointMismatchError, UPIError, one_line
from upi_lightning.io import atomic_write
from upi_lightning.sample_cache import sample_keys

Norm = Literal["l2", "linf"]
NORMS: tuple[str, ...] = get_args(Norm)

FORMAT_NAME = "upi_lightning.universal_perturbation"
FORMAT_VERSION = 1
BALL_RTOL = 1e-5
"""Relative slack of the ball-membership check: ``||delta|| <= eps * (1 + BALL_RTOL)`` (float32 rounding)."""


def check_norm(norm: str) -> Norm:
    """Return ``norm`` if it is ``"l2"`` or ``"linf"``, else raise :class:`UPIError`."""
    if norm not in NORMS:
        raise UPIError(f"Unknown norm {norm!r}: use 'l2' or 'linf'.")
    return norm  # type: ignore[return-value]


def check_eps(eps: float) -> float:
    """Return ``eps`` as a float if it is finite and ``> 0``, else raise :class:`UPIError`."""
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps) or eps <= 0:
        raise UPIError(
            f"eps is the radius of the perturbation ball in [0, 1] pixel units; it must be > 0, got {eps!r}."
        )
    return float(eps)


def perturbation_norm(delta: Tensor, norm: Norm, per_sample: bool = False) -> Tensor:
    """Return the L2 or Linf norm of ``delta``: a scalar, or ``(N,)`` with ``per_sample=True``."""
    flat = delta.flatten(start_dim=1) if per_sample else delta.flatten()
    order = 2 if check_norm(norm) == "l2" else math.inf
    return torch.linalg.vector_norm(flat, ord=order, dim=-1)


def _per_sample_view(values: Tensor, delta: Tensor, per_sample: bool) -> Tensor:
    """Reshape per-sample scalars ``(N,)`` (or a scalar) to broadcast against ``delta``."""
    return values.view(-1, *[1] * (delta.dim() - 1)) if per_sample else values


def project(delta: Tensor, norm: Norm, eps: float, per_sample: bool = False) -> Tensor:
    r"""Euclidean projection onto the ball :math:`B_\varepsilon`.

    L2: :math:`\delta \cdot \min(1, \varepsilon / \|\delta\|_2)`; Linf: :math:`\mathrm{clamp}(\delta,
    -\varepsilon, \varepsilon)`. Points inside the ball are returned unchanged (bit-exact).

    Args:
        delta: one perturbation, or a batch ``(N, ...)`` with ``per_sample=True`` (each row projected).
        norm: ``"l2"`` or ``"linf"``.
        eps: radius, ``> 0``.
        per_sample: project every ``delta[i]`` onto its own ball.

    """
    eps = check_eps(eps)
    if check_norm(norm) == "linf":
        return delta.clamp(-eps, eps)
    norms = perturbation_norm(delta, norm, per_sample)
    scale = torch.where(norms > eps, eps / norms, torch.ones_like(norms))
    return delta * _per_sample_view(scale, delta, per_sample)


def in_ball(delta: Tensor, norm: Norm, eps: float, per_sample: bool = False) -> bool:
    """Whether ``delta`` (every row, with ``per_sample=True``) lies in the ball up to :data:`BALL_RTOL`."""
    norms = perturbation_norm(delta, norm, per_sample)
    return bool(torch.all(norms <= eps * (1 + BALL_RTOL)))


def ascent_direction(grad: Tensor, norm: Norm, per_sample: bool = False) -> Tensor:
    r"""Steepest-ascent direction of unit norm for a gradient ``g``.

    L2: :math:`g / \|g\|_2` (a zero gradient gives a zero direction); Linf: :math:`\mathrm{sign}(g)`.
    """
    if check_norm(norm) == "linf":
        return grad.sign()
    norms = perturbation_norm(grad, norm, per_sample)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return grad / _per_sample_view(safe, grad, per_sample)


def projected_ascent_step(
    delta: Tensor, grad: Tensor, norm: Norm, eps: float, step_size: float, per_sample: bool = False
) -> Tensor:
    r"""One projected steepest-ascent step :math:`\mathrm{Proj}_{B_\varepsilon}(\delta + \eta\, s(g))`.

    ``s`` is :func:`ascent_direction` (normalized gradient for L2, sign for Linf). Shared by every
    attack of :mod:`upi_lightning.attacks`.
    """
    return project(delta + step_size * ascent_direction(grad, norm, per_sample), norm, eps, per_sample)


def apply_perturbation(x: Tensor, delta: Tensor) -> Tensor:
    """``clip(x + delta, 0, 1)``: ``delta`` is ``(C, H, W)`` (broadcast) or ``(N, C, H, W)`` per sample."""
    return (x + delta).clamp(0.0, 1.0)


def straight_through_clip(x: Tensor) -> Tensor:
    r"""``clip(x, 0, 1)`` in the forward pass, the identity in the backward pass (straight-through).

    ``torch.clamp`` passes a zero gradient to every coordinate on or beyond a face of the box (``0`` and
    ``1`` included), so a per-sample attack that differentiates :math:`f(\mathrm{clip}(x + \delta))`
    w.r.t. :math:`\delta` never moves a saturated pixel again. Here the gradient w.r.t. ``x`` is the
    gradient w.r.t. the clipped image, as in textbook PGD (which differentiates w.r.t. ``x_adv``). The
    value is exactly ``x.clamp(0, 1)``.

    Use it for per-sample perturbations and per-sample gradients (PGD, the per-sample attack, UPI-PCA's
    rows): for a universal ``delta`` fitted by gradient ascent (UPI-Grad, the classification UAP) the plain
    clamp gives the exact gradient of the objective, and a pixel clipped for one sample still moves for
    the others.
    """
    return x.clamp(0.0, 1.0).detach() + (x - x.detach())


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Return a ``torch.Generator`` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(seed)


def _draw(
    sampler: Callable[..., Tensor],
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> Tensor:
    """Call ``sampler(shape)`` (``torch.randn``/``rand``) on the generator's device; move to ``device``."""
    source = generator.device if generator is not None else device
    values = sampler(tuple(shape), generator=generator, device=source)
    return values if device is None else values.to(device)


def draw_normal(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw standard normal float32 samples on the generator's device and return them on ``device``."""
    return _draw(torch.randn, shape, generator, device)


def sample_generators(x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> list[torch.Generator]:
    """One generator per sample of ``(x, y)`` (on ``x.device``), keyed by the sample, not by the batch.

    Each call draws one integer from ``generator`` (the call's seed); the generator of sample ``i`` is
    seeded from that integer and the content of ``(x_i, y_i)`` (:func:`upi_lightning.sample_cache.
    sample_keys`), so what it draws does not depend on the batch the sample came in, its position
    there, or how many processes share the data: processes that draw the same call seeds (same seed,
    same number of calls) draw the same numbers for a sample as one process does.
    """
    source = generator.device if generator is not None else x.device
    call_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=source).item()).to_bytes(8, "little")
    generators = []
    for key in sample_keys(x, y):
        seed = int.from_bytes(hashlib.blake2b(key + call_seed, digest_size=8).digest(), "little") >> 1
        generators.append(torch.Generator(device=x.device).manual_seed(seed))
    return generators


def sample_normal(x: Tensor, y: Tensor, draws: int, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise ``(draws, N, C, H, W)`` for the batch ``(x, y)``, keyed by sample.

    The noise of sample ``i`` comes from its :func:`sample_generators` generator, so a fit on 2
    processes smooths with the same noise as on 1.
    """
    shape = (draws, *x.shape[1:])
    noise = [torch.randn(shape, generator=g, device=x.device) for g in sample_generators(x, y, generator)]
    return torch.stack(noise, dim=1)


def random_on_sphere(
    shape: tuple[int, ...] | torch.Size,
    norm: Norm,
    eps: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    per_sample: bool = False,
) -> Tensor:
    r"""Draw a random perturbation on the sphere :math:`\|\delta\| = \varepsilon` (the random baseline).

    L2: a uniformly random direction scaled to :math:`\varepsilon`; Linf: uniformly random signs times
    :math:`\varepsilon` (a random vertex of the cube). ``per_sample=True``: one draw per row ``shape[0]``.
    """
    eps = check_eps(eps)
    gaussian = draw_normal(shape, generator, device)
    if check_norm(norm) == "linf":
        return eps * torch.where(gaussian >= 0, 1.0, -1.0)
    return eps * ascent_direction(gaussian, norm, per_sample)


def random_in_ball(
    shape: tuple[int, ...] | torch.Size,
    norm: Norm,
    eps: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    per_sample: bool = False,
) -> Tensor:
    r"""Draw a point uniformly from the ball :math:`B_\varepsilon` (random start of the attacks).

    L2: a uniform direction with radius :math:`\varepsilon U^{1/d}`; Linf: i.i.d. uniform on
    :math:`[-\varepsilon, \varepsilon]`. ``per_sample=True``: one draw per row ``shape[0]``.
    """
    eps = check_eps(eps)
    if check_norm(norm) == "linf":
        return eps * (2 * _draw(torch.rand, shape, generator, device) - 1)
    direction = random_on_sphere(shape, norm, 1.0, generator, device, per_sample)
    dim = math.prod(shape[1:]) if per_sample else math.prod(shape)
    uniform = _draw(torch.rand, (shape[0],) if per_sample else (), generator, device)
    return eps * direction * _per_sample_view(uniform ** (1 / dim), direction, per_sample)


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
        if not in_ball(self.delta, self.norm, self.eps):
            found = perturbation_norm(self.delta, self.norm).item()
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
        self.delta = project(self.delta, self.norm, self.eps)
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
