r"""Threat models: the L2 and Linf balls a pixel-space perturbation lives in, with the moves of every attack.

A perturbation ``delta`` lives in pixel space (images in ``[0, 1]``) inside the ball
:math:`B_\varepsilon = \{\delta : \|\delta\|_p \le \varepsilon\}` with ``p`` in ``{2, inf}``, and is applied
as :math:`\mathrm{clip}(x + \delta, 0, 1)` (:func:`apply_perturbation`). A universal perturbation has the
shape ``(C, H, W)`` of one image; a batch of per-sample perturbations ``(N, C, H, W)`` is handled by
``per_sample=True`` (one ball per sample).

A :class:`ThreatModel` (:class:`L2Ball`, :class:`LinfBall`, or :func:`threat_model` from a norm's name)
is checked once when it is built and then gives every attack its moves, as the attacker steps of
MadryLab's ``robustness`` library do: :meth:`~ThreatModel.project`, the projected steepest-ascent
:meth:`~ThreatModel.step`, :meth:`~ThreatModel.random_start` (uniform in the ball) and
:meth:`~ThreatModel.random_on_sphere` (the random baseline).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch
from torch import Tensor

from upi_lightning.errors import UPIError
from upi_lightning.noise import draw, draw_normal

Norm = Literal["l2", "linf"]
NORMS: tuple[str, ...] = get_args(Norm)
Shape = tuple[int, ...] | torch.Size
Device = torch.device | str | None
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
    return torch.linalg.vector_norm(flat, ord=2 if norm == "l2" else math.inf, dim=-1)


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


def per_sample_view(values: Tensor, delta: Tensor, per_sample: bool) -> Tensor:
    """Reshape per-sample scalars ``(N,)`` (or a scalar) to broadcast against ``delta``."""
    return values.view(-1, *[1] * (delta.dim() - 1)) if per_sample else values


@dataclass(frozen=True)
class ThreatModel(ABC):
    r"""The ball :math:`\|\delta\|_p \le \varepsilon` of one norm, and the moves of the attacks in it.

    Attributes:
        eps: the radius, in ``[0, 1]`` pixel units; checked (finite, ``> 0``; Linf: ``< 1``) once, when built.
    """

    eps: float
    norm: ClassVar[Norm]

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", check_eps(self.eps))

    @property
    def tag(self) -> str:
        """File-name-safe label such as ``l2_eps1``."""
        return f"{self.norm}_eps{self.eps:g}"

    def norm_of(self, delta: Tensor, per_sample: bool = False) -> Tensor:
        """The norm of ``delta`` (``(N,)`` with ``per_sample=True``)."""
        return perturbation_norm(delta, self.norm, per_sample)

    def contains(self, delta: Tensor, per_sample: bool = False) -> bool:
        """Whether ``delta`` (every row, with ``per_sample=True``) lies in the ball up to :data:`BALL_RTOL`."""
        return bool(torch.all(self.norm_of(delta, per_sample) <= self.eps * (1 + BALL_RTOL)))

    @abstractmethod
    def project(self, delta: Tensor, per_sample: bool = False) -> Tensor:
        """Euclidean projection onto the ball (each row onto its own with ``per_sample=True``), bit-exact inside."""

    @abstractmethod
    def direction(self, grad: Tensor, per_sample: bool = False) -> Tensor:
        """Steepest-ascent direction of unit norm for a gradient ``g``."""

    def step(self, delta: Tensor, grad: Tensor, step_size: float, per_sample: bool = False) -> Tensor:
        r"""One projected steepest-ascent step :math:`\mathrm{Proj}(\delta + \eta\, s(g))`, ``s`` the direction."""
        return self.project(delta + step_size * self.direction(grad, per_sample), per_sample)

    def random_on_sphere(
        self,
        shape: Shape,
        generator: torch.Generator | None = None,
        device: Device = None,
        per_sample: bool = False,
    ) -> Tensor:
        r"""A random point of the sphere :math:`\|\delta\| = \varepsilon` (the random baseline).

        ``per_sample=True``: one draw per row ``shape[0]``.
        """
        return self.eps * self.unit_sphere_point(draw_normal(shape, generator, device), per_sample)

    def random_start(
        self,
        shape: Shape,
        generator: torch.Generator | None = None,
        device: Device = None,
        per_sample: bool = False,
    ) -> Tensor:
        """A point drawn uniformly from the ball (the attacks' random start); one per row with ``per_sample``."""
        return self.ball_point(shape, generator, device, per_sample)

    @abstractmethod
    def unit_sphere_point(self, gaussian: Tensor, per_sample: bool) -> Tensor:
        """The point of the unit sphere that standard normal draws give (uniformly distributed on it)."""

    @abstractmethod
    def ball_point(self, shape: Shape, generator: torch.Generator | None, device: Device, per_sample: bool) -> Tensor:
        """:meth:`random_start` with every argument given."""

    @abstractmethod
    def extreme_point(self, direction: Tensor) -> Tensor:
        r"""The point of the ball that maximizes :math:`|v^\top \delta|` for a unit ``direction`` ``v``."""

    @abstractmethod
    def default_step_size(self) -> float:
        """The base step of UPI-Grad when none is given."""


@dataclass(frozen=True)
class L2Ball(ThreatModel):
    r"""The L2 ball: projection :math:`\delta \min(1, \varepsilon / \|\delta\|_2)`, ascent along :math:`g / \|g\|_2`."""

    norm: ClassVar[Norm] = "l2"

    def project(self, delta: Tensor, per_sample: bool = False) -> Tensor:
        norms = self.norm_of(delta, per_sample)
        scale = torch.where(norms > self.eps, self.eps / norms, torch.ones_like(norms))
        return delta * per_sample_view(scale, delta, per_sample)

    def direction(self, grad: Tensor, per_sample: bool = False) -> Tensor:
        """``g / ||g||_2``; a zero gradient gives a zero direction."""
        norms = self.norm_of(grad, per_sample)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        return grad / per_sample_view(safe, grad, per_sample)

    def unit_sphere_point(self, gaussian: Tensor, per_sample: bool) -> Tensor:
        """A uniformly random direction: the normalized draws."""
        return self.direction(gaussian, per_sample)

    def ball_point(self, shape: Shape, generator: torch.Generator | None, device: Device, per_sample: bool) -> Tensor:
        r"""A uniform direction with radius :math:`\varepsilon U^{1/d}`."""
        unit = self.unit_sphere_point(draw_normal(shape, generator, device), per_sample)
        dim = math.prod(shape[1:]) if per_sample else math.prod(shape)
        uniform = draw(torch.rand, (shape[0],) if per_sample else (), generator, device)
        return self.eps * unit * per_sample_view(uniform ** (1 / dim), unit, per_sample)

    def extreme_point(self, direction: Tensor) -> Tensor:
        """``eps * v``."""
        return self.eps * direction

    def default_step_size(self) -> float:
        """``eps / 4`` (the step follows the normalized gradient)."""
        return self.eps / 4.0


@dataclass(frozen=True)
class LinfBall(ThreatModel):
    r"""The Linf ball: projection :math:`\mathrm{clamp}(\delta, -\varepsilon, \varepsilon)`, ascent along the sign."""

    norm: ClassVar[Norm] = "linf"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eps >= 1:
            raise UPIError(
                f"a Linf eps of {self.eps:g} lets every pixel take any value in [0, 1] (eps is in [0, 1] pixel "
                f"units; a default eps of 1.0 is an L2 radius): give a Linf eps below 1, e.g. 8/255 = 0.0314, or "
                f"{self.eps:g}/255 = {self.eps / 255:.6g}."
            )

    def project(self, delta: Tensor, per_sample: bool = False) -> Tensor:
        return delta.clamp(-self.eps, self.eps)

    def direction(self, grad: Tensor, per_sample: bool = False) -> Tensor:
        """``sign(g)``."""
        return grad.sign()

    def unit_sphere_point(self, gaussian: Tensor, per_sample: bool) -> Tensor:
        """Uniformly random signs (a random vertex of the cube)."""
        return torch.where(gaussian >= 0, 1.0, -1.0)

    def ball_point(self, shape: Shape, generator: torch.Generator | None, device: Device, per_sample: bool) -> Tensor:
        """I.i.d. uniform on ``[-eps, eps]``."""
        return self.eps * (2 * draw(torch.rand, shape, generator, device) - 1)

    def extreme_point(self, direction: Tensor) -> Tensor:
        """``eps * sign(v)``, a vertex of the cube."""
        return self.eps * direction.sign()

    def default_step_size(self) -> float:
        """``eps / 10`` (the sign step moves every coordinate by the full step)."""
        return self.eps / 10.0


BALLS: dict[str, type[ThreatModel]] = {"l2": L2Ball, "linf": LinfBall}


def threat_model(norm: str, eps: float) -> ThreatModel:
    """The threat model of a norm given by name (``"l2"`` or ``"linf"``) and radius ``eps``.

    Raises:
        UPIError: on an unknown norm or an ``eps`` that is not finite and ``> 0``.
    """
    return BALLS[check_norm(norm)](eps)
