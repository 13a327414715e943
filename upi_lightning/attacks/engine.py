r"""The ascent engine every universal attack shares: batch plumbing, step schedules, the ascent loop.

:func:`fit_universal` runs UPI-Grad and the classification UAP: for every mini-batch ``(x, y)`` of the
fit data it computes the gradient of :math:`\sum_i J_i(\delta)` w.r.t. ``delta`` with
``torch.autograd.grad`` (never ``.backward``: model parameters get no ``.grad``), passes the summed
gradient, the summed objective and the sample count through ``reduce`` as **one** flat tensor (a DDP
all-reduce-sum makes every rank take the same step), and applies

.. math::

    \delta \leftarrow \mathrm{Proj}_{B_\varepsilon}\big(\delta + \eta_t\, s(\bar g)\big),
    \qquad \bar g = \frac{\sum_{\text{ranks}} \nabla_\delta \sum_i J_i}{\sum_{\text{ranks}} n},

with ``s`` the normalized gradient (L2) or its sign (Linf) and :math:`\eta_t` from :func:`step_size_at`.
The start is a random point of the ball: at :math:`\delta = 0` the gradient of the map change is 0.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, get_args

import torch
from torch import Tensor, nn
from tqdm import tqdm  # not tqdm.auto, which calls iter() early and shifts a DataLoader's shuffling

from upi_lightning.distributed import Reduce, identity
from upi_lightning.errors import UPIError, check_count
from upi_lightning.model_modes import attack_device, evaluation_mode, gradients_enabled
from upi_lightning.noise import make_generator
from upi_lightning.perturbation import UniversalPerturbation
from upi_lightning.threat import ThreatModel

Schedule = Literal["constant", "cosine", "step"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
Init = Literal["random", "zero"]
Batches = Iterable[tuple[Tensor, Tensor]]
PerSampleFn = Callable[[Tensor, Tensor, Tensor, torch.Generator], Tensor]
"""``fn(x, y, delta, generator) -> (N,)``: per-sample objective to maximize, differentiable in ``delta``."""
StepCallback = Callable[[int, Tensor, float], None]
"""``on_step(step, delta, mean_objective)``: called after every update (e.g. for logging)."""


class AscentOptions(TypedDict, total=False):
    """Optional keyword arguments of :func:`fit_universal` that its wrappers pass through unchanged."""

    epochs: int
    step_size: float | None
    schedule: Schedule
    init: Init | Tensor
    reduce: Reduce
    seed: int
    progress: bool
    on_step: StepCallback | None
    chunk_size: int | None


@dataclass
class UPIFitResult:
    """Result of a fit.

    Attributes:
        delta: the perturbation ``(C, H, W)`` (float32, in the ball).
        history: per-step values of the fitted criterion (UPI-Grad and UAP: mean objective of the batch
            before each step, reduced over ranks; UPI-PCA: see :func:`fit_upi_pca`).
        seconds: wall-clock fit time.
        info: settings and diagnostics (primitives only, ready for a report or a metadata dict).
        grad_norms: per-step L2 norm of the mean gradient w.r.t. ``delta`` (UPI-Grad and UAP; reduced over
            ranks), how much signal each step had before the step rule normalized it.

    """

    delta: Tensor
    history: list[float]
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    grad_norms: list[float] = field(default_factory=list)

    def to_perturbation(self, **metadata: Any) -> UniversalPerturbation:
        """Wrap ``delta`` in a :class:`UniversalPerturbation` (norm and eps from ``info``).

        Its metadata is ``info``, the ``history`` and ``seconds``, updated with ``metadata`` (e.g. the
        model and data description).
        """
        provenance = {**self.info, "history": self.history, "seconds": self.seconds, **metadata}
        return UniversalPerturbation(self.delta.cpu(), self.info["norm"], self.info["eps"], provenance)


def step_size_at(schedule: Schedule, base: float, step: int, total: int | None) -> float:
    r"""Return the step size :math:`\eta_t` of step ``t = step`` out of ``total``.

    ``constant``: :math:`\eta`; ``cosine``: :math:`\eta\,\tfrac12(1 + \cos(\pi t / T))`; ``step``:
    :math:`\eta`, then :math:`0.1\eta` from :math:`t \ge T/2` and :math:`0.01\eta` from :math:`t \ge 3T/4`.
    """
    if schedule == "constant":
        return base
    if total is None:
        raise UPIError(f"The {schedule!r} step schedule needs the number of steps; use schedule='constant'.")
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * step / total))
    return base * 0.1 ** ((step >= total / 2) + (step >= 3 * total / 4))


def check_steps(schedule: str, step_size: float | None, name: str, count: int) -> None:
    """Raise :class:`UPIError` on an unknown schedule, ``step_size <= 0`` or a count (``name``) ``< 1``."""
    if schedule not in SCHEDULES:
        raise UPIError(f"Unknown step schedule {schedule!r}: use one of {', '.join(map(repr, SCHEDULES))}.")
    check_count(name, count)
    if step_size is not None and not step_size > 0:
        raise UPIError(f"step_size must be > 0 (or None for the default), got {step_size}.")


def passes_over(batches: Batches, passes: int) -> int | None:
    """Check that ``batches`` can be iterated ``passes`` times and return its length (``None`` if unsized).

    Raises:
        UPIError: if several passes are needed but ``batches`` is a one-shot iterator.

    """
    # isinstance, not iter(batches) is batches: iter() on a DataLoader draws from its generator and would
    # shift the shuffling order of the passes that follow
    if passes > 1 and isinstance(batches, Iterator):
        raise UPIError(
            f"The fit makes {passes} passes over the data but got a one-shot iterator; pass a re-iterable "
            "(a DataLoader or a list of (x, y) batches)."
        )
    return len(batches) if isinstance(batches, Sized) else None


def warn_if_zero_gradient(grad: Tensor, name: str) -> None:
    """Warn (``UserWarning``) that the fit ``name`` cannot move: its objective's gradient is exactly zero.

    Checked on the first step's gradient only (one ``any``): the maps of a piecewise-linear (ReLU)
    network differentiated as it is give exactly zero everywhere, and so does a start at ``delta = 0``
    without smoothing.
    """
    if not bool(grad.any()):
        warnings.warn(
            f"{name}: the objective's gradient w.r.t. delta is exactly zero at the first step, so the fit "
            "cannot move delta. Saliency maps of a ReLU network differentiated as it is have no such gradient: "
            "differentiate a softplus surrogate of its ReLUs (surrogate_beta=10, the default) or smooth "
            "the objective (sigma > 0); a start at delta = 0 needs init='random' or sigma > 0.",
            UserWarning,
            stacklevel=3,
        )


def prepare_batch(batch: Any, device: torch.device, shape: tuple[int, ...] | None = None) -> tuple[Tensor, Tensor]:
    """Move one ``(x, y)`` batch to ``device`` as normal (non-inference) tensors and check it.

    Raises:
        UPIError: unless ``x`` is a float ``(N, C, H, W)`` batch of pixels in ``[0, 1]`` (no NaN) with
            ``(C, H, W) == shape`` (when given) and ``y`` holds ``N`` integer classes.

    """
    try:
        x, y = batch
    except (TypeError, ValueError) as err:
        raise UPIError(f"Each batch must be a pair (images, labels), got {type(batch).__name__}.") from err
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4 or x.shape[0] == 0:
        raise UPIError(f"images must be a non-empty float tensor (N, C, H, W), got {getattr(x, 'shape', x)!r}.")
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise UPIError(f"images of shape {tuple(x.shape[1:])} do not match the perturbation shape {tuple(shape)}.")
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],) or y.is_floating_point() or y.dtype == torch.bool:
        got = f"{y.dtype} of shape {tuple(y.shape)}" if isinstance(y, Tensor) else repr(y)
        raise UPIError(f"labels must be an integer tensor of shape ({x.shape[0]},), got {got}.")
    x = x.to(device=device, dtype=torch.float32).clone()
    low, high = torch.stack(torch.aminmax(x)).tolist()
    if not (low >= 0.0 and high <= 1.0):
        raise UPIError(
            f"images must be pixels in [0, 1] (normalization belongs inside the model), got values in [{low}, {high}]."
        )
    return x, y.to(device=device, dtype=torch.long).clone()


def initial_delta(
    init: Init | Tensor,
    shape: tuple[int, ...],
    threat: ThreatModel,
    generator: torch.Generator,
    device: torch.device,
) -> Tensor:
    """Return the starting point: uniform in the ball (``random``), zero, or a given tensor projected."""
    if isinstance(init, Tensor):
        if tuple(init.shape) != tuple(shape):
            raise UPIError(f"init of shape {tuple(init.shape)} does not match the images {tuple(shape)}.")
        return threat.project(init.detach().to(device=device, dtype=torch.float32))
    if init == "random":
        return threat.random_start(shape, generator, device)
    if init == "zero":
        return torch.zeros(shape, device=device)
    raise UPIError(f"Unknown init {init!r}: use 'random', 'zero' or a (C, H, W) tensor.")


def chunked_gradient(
    per_sample_fn: PerSampleFn,
    x: Tensor,
    y: Tensor,
    variable: Tensor,
    generator: torch.Generator,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor]:
    r"""Return :math:`\nabla_\delta \sum_i J_i(\delta)` and the detached values ``(N,)`` of a batch, by chunks.

    ``per_sample_fn`` runs on chunks of at most ``chunk_size`` samples (``None``: the whole batch), each
    with its own forward and backward pass, and the chunks' gradients are summed: the same gradient up to
    float rounding, with the memory of one chunk. Every chunk starts from the same ``generator`` state, so
    each sample gets the noise it gets in the whole batch (the noise is keyed by sample,
    :func:`~upi_lightning.noise.sample_generators`), and the generator ends where one call leaves it.
    """
    size = chunk_size or len(x)
    state = generator.get_state()
    grad = torch.zeros_like(variable)
    values = []
    for x_chunk, y_chunk in zip(x.split(size), y.split(size), strict=True):
        generator.set_state(state)
        chunk_values = per_sample_fn(x_chunk, y_chunk, variable, generator)
        (chunk_grad,) = torch.autograd.grad(chunk_values.sum(), variable, allow_unused=True, materialize_grads=True)
        grad += chunk_grad
        values.append(chunk_values.detach())
    return grad, torch.cat(values)


def fit_universal(
    model: nn.Module,
    batches: Batches,
    per_sample_fn: PerSampleFn,
    threat: ThreatModel,
    *,
    epochs: int = 2,
    step_size: float | None = None,
    schedule: Schedule = "cosine",
    init: Init | Tensor = "random",
    reduce: Reduce = identity,
    seed: int = 0,
    progress: bool = False,
    on_step: StepCallback | None = None,
    name: str = "universal",
    chunk_size: int | None = None,
) -> UPIFitResult:
    """Projected stochastic gradient ascent of a per-sample objective over a universal ``delta``.

    Args:
        model: the classifier (sets the device; run in eval mode, its modes restored).
        batches: re-iterable of ``(x, y)`` batches of ``[0, 1]`` images (a DataLoader or a list).
        per_sample_fn: ``fn(x, y, delta, generator) -> (N,)`` to maximize.
        threat: the ball of ``delta`` (:class:`~upi_lightning.threat.ThreatModel`).
        epochs: passes over ``batches``.
        step_size: base step (``None``: the threat model's ``default_step_size()``).
        schedule: ``constant``, ``cosine`` or ``step`` (:func:`step_size_at`); non-constant schedules
            need ``len(batches)``.
        init: ``random`` (uniform in the ball), ``zero``, or a ``(C, H, W)`` tensor (warm start).
        reduce: applied to ``cat([grad_sum.flatten(), [objective_sum, count]])`` before each step; a DDP
            caller passes an all-reduce-sum so that every rank takes the same step. Every rank must see
            the same number of batches and use the same ``seed`` (same random start).
        seed: seeds the random start and the smoothing noise (a generator on the model's device).
        progress: show a tqdm progress bar.
        on_step: called as ``on_step(step, delta, mean_objective)`` after every update.
        name: method name stored in ``info`` and shown on the progress bar.
        chunk_size: samples per forward and backward pass; a batch's gradient is summed over its chunks
            (:func:`chunked_gradient`: the same step, up to float rounding). Bounds the memory, and keeps an
            IG or SmoothGrad stack (``points x chunk_size`` images) small enough to run at the cost per
            image of a gradient map on the CPU (``None``: the whole batch at once).

    """
    check_steps(schedule, step_size, "epochs", epochs)
    if chunk_size is not None:
        check_count("chunk_size", chunk_size)
    base_step = threat.default_step_size() if step_size is None else float(step_size)
    length = passes_over(batches, epochs)
    total = None if length is None else epochs * length
    device = attack_device(model)
    history: list[float] = []
    grad_norms: list[float] = []
    start = time.perf_counter()
    with evaluation_mode(model), gradients_enabled():
        generator = make_generator(seed, device)
        delta = None
        step = 0
        for epoch in range(epochs):
            bar = tqdm(batches, desc=f"{name} {epoch + 1}/{epochs}", total=length, disable=not progress, leave=False)
            for batch in bar:
                x, y = prepare_batch(batch, device, None if delta is None else tuple(delta.shape))
                if delta is None:
                    delta = initial_delta(init, tuple(x.shape[1:]), threat, generator, device)
                variable = delta.clone().requires_grad_(True)
                grad, values = chunked_gradient(per_sample_fn, x, y, variable, generator, chunk_size)
                packed = torch.cat([grad.flatten(), values.sum().view(1), values.new_full((1,), len(values))])
                packed = reduce(packed)
                if step == 0:
                    warn_if_zero_gradient(packed[:-2], name)
                count = packed[-1]
                mean_grad = packed[:-2].view_as(delta) / count
                finite, mean_value, grad_norm = torch.stack(  # one read from the device a step
                    [
                        torch.isfinite(packed).all().to(packed.dtype),
                        packed[-2] / count,
                        torch.linalg.vector_norm(mean_grad),
                    ]
                ).tolist()
                if not finite:
                    raise UPIError(
                        f"{name}: the objective or its gradient became NaN/inf at step {step}; lower the "
                        "surrogate beta or the step size, or check the model."
                    )
                eta = step_size_at(schedule, base_step, step, total)
                delta = threat.step(delta, mean_grad, eta)
                history.append(mean_value)
                grad_norms.append(grad_norm)
                bar.set_postfix(objective=f"{mean_value:.4g}", refresh=False)
                if on_step is not None:
                    on_step(step, delta, mean_value)
                step += 1
    if delta is None:
        raise UPIError(f"{name}: the fit data yielded no batch.")
    info = {
        "method": name,
        "norm": threat.norm,
        "eps": threat.eps,
        "epochs": epochs,
        "steps": step,
        "step_size": base_step,
        "schedule": schedule,
        "init": init if isinstance(init, str) else "tensor",
        "seed": seed,
    }
    return UPIFitResult(delta.detach(), history, time.perf_counter() - start, info, grad_norms)
