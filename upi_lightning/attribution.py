r"""Batched raw attributions of a classifier: gradient, gradient x input, integrated gradients, SmoothGrad.

An attribution is the raw signed tensor ``(N, C, H, W)`` that a method assigns to a batch ``x`` for
the score :math:`s_t(x)` of a target class ``t`` (the logit :math:`z_t(x)`, the softmax
probability :math:`p_t(x)`, or its log :math:`\log p_t(x) = -\mathrm{CE}(f(x), t)`, whose attributions are
those of the loss up to the sign):

* ``gradient``: :math:`\nabla_x s_t(x)`;
* ``grad_x_input``: :math:`x \odot \nabla_x s_t(x)`;
* ``integrated_gradients``: :math:`(x - b) \odot \frac{1}{m}\sum_{k=1}^{m}
  \nabla s_t\big(b + \tfrac{k - 1/2}{m}(x - b)\big)`, the midpoint Riemann sum over ``m = n_steps``
  points of the straight path from the baseline ``b`` (black by default) to ``x``;
* ``smoothgrad``: :math:`\frac{1}{n}\sum_{j=1}^{n} A(x + z_j)`, :math:`z_j \sim N(0, \sigma^2 I)`,
  the mean of a base attribution ``A`` over noisy copies (the noisy inputs are not clipped).

Saliency maps (:mod:`upi_lightning.saliency`) are their normalized absolute values.

In ``eval()`` mode every sample's score depends on its own input only, so one
``autograd.grad(scores.sum(), x)`` returns every per-sample gradient of the batch in a single backward
pass: no function here loops over samples, and the noisy copies / path points of SmoothGrad and
integrated gradients are stacked into one big batch. The model is always run in eval mode and its
previous train/eval flags are restored. Every function works under ``torch.no_grad`` and
``torch.inference_mode`` (Lightning's validation/test hooks), and ``create_graph=True`` keeps the
result differentiable w.r.t. ``x`` (and whatever ``x`` was computed from) and the model parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from upi_lightning.errors import UPIError
from upi_lightning.model_modes import evaluation_mode, gradients_enabled, model_logits, twice_differentiable

SMOOTHGRAD_SAMPLES = 16
"""Default number of SmoothGrad noisy copies."""

SaliencyMethod = Literal["gradient", "grad_x_input", "integrated_gradients", "smoothgrad"]
ScoreKind = Literal["logit", "probability", "log_probability"]

SALIENCY_METHODS: tuple[str, ...] = get_args(SaliencyMethod)
SCORE_KINDS: tuple[str, ...] = get_args(ScoreKind)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise :class:`UPIError` naming the choices unless ``value`` is one of them."""
    if value not in choices:
        raise UPIError(f"Unknown {name} {value!r}: use one of {', '.join(map(repr, choices))}.")


def _checked_target(x: Tensor, target: Tensor | int | None) -> tuple[Tensor | None, int]:
    """Check that ``x`` is finite and ``target`` holds class indices, reading the device once.

    Returns the ``(N,)`` long classes on the device of ``x`` (``None`` stays ``None``: the predicted
    class) and the largest of them (``-1`` for ``None``), which :func:`_gradient` compares with the number
    of logits. The checks share one read from the device, made before the model runs: a read after the
    forward pass would make a GPU wait for the host to queue every kernel of the backward pass.

    A target made under ``torch.inference_mode`` is cloned into a normal tensor, as ``x`` is.

    Raises:
        UPIError: on NaN/inf in ``x``, a float or bool target (a mask is not a class), a target of another
            shape than ``(N,)`` or a negative class.
    """
    num_samples = x.shape[0]
    if isinstance(target, int):
        target = torch.full((num_samples,), target, device=x.device)  # a fill, not a copy from the host
    if target is not None:
        target = torch.as_tensor(target, device=x.device)
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise UPIError(f"target must hold integer class indices, got dtype {target.dtype}.")
        if target.dim() == 0:
            target = target.expand(num_samples)
        if target.shape != (num_samples,):
            raise UPIError(
                f"target must be None, an int or a tensor of shape ({num_samples},) (one class per sample), "
                f"got shape {tuple(target.shape)}."
            )
        target = target.long()
        if target.is_inference():  # gather saves its index for the backward pass
            target = target.clone()
    checks = [torch.isfinite(x).all().long()]
    if target is not None:
        checks += target.aminmax()
    finite, *classes = torch.stack(checks).tolist()  # the one read from the device
    smallest, largest = classes or (0, -1)
    if not finite:
        raise UPIError("the images contain NaN or inf values, whose saliency maps are meaningless; check the data.")
    if smallest < 0:
        raise UPIError(f"target classes must be class indices >= 0, got {smallest}.")
    return target, largest


def _class_scores(logits: Tensor, target: Tensor, score: ScoreKind) -> Tensor:
    """Per-sample score ``(N,)``: the target logit, softmax probability or log-probability."""
    if score == "probability":
        values = logits.softmax(dim=1)
    elif score == "log_probability":
        values = logits.log_softmax(dim=1)
    else:
        values = logits
    return values.gather(1, target[:, None]).squeeze(1)


def _gradient(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None,
    score: ScoreKind,
    create_graph: bool,
    internal_batch_size: int | None,
    largest_class: int,
) -> Tensor:
    """Gradient of the per-sample scores w.r.t. ``x``, one backward pass per chunk (no modes, no reads).

    Must run inside :func:`evaluation_mode` and :func:`gradients_enabled`, on a ``target`` of
    :func:`_checked_target` (``None``: each image's predicted class) whose ``largest_class`` is compared
    here with the number of logits, without reading the device. ``x`` is used as is if it requires grad
    (so the result can stay differentiable w.r.t. what ``x`` was computed from), else a leaf alias of it
    that requires grad is made. With ``create_graph`` the forward pass runs attention on a kernel that
    can be differentiated twice (:func:`twice_differentiable`).

    Raises:
        UPIError: if ``largest_class`` is not a class of the model's logits.
    """
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    chunk = internal_batch_size or x.shape[0]
    x_chunks = x.split(chunk)
    target_chunks = [None] * len(x_chunks) if target is None else target.split(chunk)
    grads = []
    for x_chunk, target_chunk in zip(x_chunks, target_chunks, strict=True):
        with twice_differentiable(create_graph):
            logits = model_logits(model, x_chunk)
        if largest_class >= logits.shape[1]:
            raise UPIError(f"target classes must lie in [0, {logits.shape[1]}), got {largest_class}.")
        classes = logits.detach().argmax(dim=1) if target_chunk is None else target_chunk
        scores = _class_scores(logits, classes, score)
        (grad,) = torch.autograd.grad(scores.sum(), x_chunk, create_graph=create_graph)
        grads.append(grad)
    return grads[0] if len(grads) == 1 else torch.cat(grads)


def _prepare_input(x: Tensor, create_graph: bool) -> Tensor:
    """Turn an inference tensor into a normal one and drop the graph when none is wanted."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise UPIError(f"x must be a floating-point tensor (N, C, H, W) of pixels, got {type(x).__name__}.")
    if x.dim() < 2 or x.shape[0] == 0:
        raise UPIError(f"x must be a non-empty batch (N, ...), got shape {tuple(x.shape)}.")
    if x.is_inference():
        x = x.clone()
    return x if create_graph else x.detach()


def input_gradient(
    model: nn.Module,
    x: Tensor,
    target: Tensor | int | None = None,
    *,
    score: ScoreKind = "logit",
    create_graph: bool = False,
) -> Tensor:
    r"""Raw signed input gradient :math:`\nabla_x s_t(x)` of a whole batch in one backward pass.

    Args:
        model: classifier returning logits ``(N, K)``; run in eval mode, its modes restored.
        x: batch ``(N, C, H, W)``. It may be a non-leaf tensor computed from something that requires
            grad (e.g. ``x_clean + delta``).
        target: ``(N,)`` class indices, one ``int`` for all samples, or ``None`` for the predicted class.
        score: ``"logit"`` (:math:`z_t`), ``"probability"`` (:math:`\mathrm{softmax}(z)_t`) or
            ``"log_probability"`` (:math:`\log \mathrm{softmax}(z)_t`, minus the cross-entropy).
        create_graph: keep the graph so the result is differentiable w.r.t. ``x`` (and what it was
            computed from) and the model parameters; otherwise the result is detached.

    Returns:
        The gradient, same shape as ``x``.
    """
    return attribution(model, x, target, "gradient", score=score, create_graph=create_graph)


def attribution(
    model: nn.Module,
    x: Tensor,
    target: Tensor | int | None = None,
    method: SaliencyMethod = "gradient",
    *,
    score: ScoreKind = "logit",
    create_graph: bool = False,
    n_steps: int = 16,
    baseline: Tensor | float | None = None,
    n_samples: int = SMOOTHGRAD_SAMPLES,
    sigma: float = 0.15,
    base_method: SaliencyMethod = "gradient",
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    internal_batch_size: int | None = None,
) -> Tensor:
    r"""Raw signed attribution ``(N, C, H, W)`` of a batch by one of the methods of the module docstring.

    The target class is fixed once on the clean ``x`` (``None`` = predicted class of ``x``), then used at
    every path point or noisy copy. All path points / noisy copies form one batch of ``N * n_steps``
    (or ``N * n_samples``) images and go through one forward and one backward pass.

    Args:
        model: classifier returning logits ``(N, K)``; run in eval mode, its modes restored.
        x: batch ``(N, C, H, W)`` of pixels in ``[0, 1]``.
        target: ``(N,)`` class indices, one ``int`` for all samples, or ``None`` for the predicted class.
        method: ``gradient``, ``grad_x_input``, ``integrated_gradients`` or ``smoothgrad``.
        score: ``"logit"``, ``"probability"`` or ``"log_probability"``.
        create_graph: keep the result differentiable w.r.t. ``x`` and the model parameters.
        n_steps: integrated gradients: number of midpoint Riemann steps, ``>= 1``.
        baseline: integrated gradients: tensor broadcastable to ``x`` or a constant; ``None`` = zeros
            (black image).
        n_samples: SmoothGrad: number of noisy copies, ``>= 1``.
        sigma: SmoothGrad: noise standard deviation in pixel units (``[0, 1]`` images), ``>= 0``.
        base_method: SmoothGrad: the attribution averaged over the noisy copies (any method but
            ``smoothgrad``).
        generator: SmoothGrad: random generator for the noise (on any device), for reproducible maps.
        noise: SmoothGrad: the standard-normal draws ``(n_samples, N, C, H, W)`` to use instead of drawing
            them (``generator`` is then unused); see :func:`smoothgrad_noise`.
        internal_batch_size: if set, the stacked batch is processed in chunks of at most this many
            images (one backward pass per chunk), to bound memory; ``None`` = one chunk.

    Raises:
        UPIError: on NaN/inf in ``x``, an unknown method or score, ``n_steps < 1``, ``n_samples < 1``,
            ``sigma < 0``, a SmoothGrad base method of ``smoothgrad``, SmoothGrad ``noise`` of another shape
            than ``(n_samples, N, C, H, W)``, a baseline that does not broadcast to ``x``, or a target of the
            wrong shape or out of range.
    """
    check_choice("saliency method", method, SALIENCY_METHODS)
    check_choice("score", score, SCORE_KINDS)
    uses_ig = method == "integrated_gradients" or (method == "smoothgrad" and base_method == "integrated_gradients")
    if uses_ig and (isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1):
        raise UPIError(f"integrated gradients needs an integer n_steps >= 1, got {n_steps!r}.")
    if method == "smoothgrad":
        check_choice("SmoothGrad base_method", base_method, tuple(m for m in SALIENCY_METHODS if m != method))
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise UPIError(f"SmoothGrad needs an integer n_samples >= 1, got {n_samples!r}.")
        if not sigma >= 0:
            raise UPIError(f"SmoothGrad sigma is a noise std in pixel units and must be >= 0, got {sigma}.")
    if internal_batch_size is not None and internal_batch_size < 1:
        raise UPIError(f"internal_batch_size must be None or >= 1, got {internal_batch_size}.")

    with evaluation_mode(model), gradients_enabled():
        x = _prepare_input(x, create_graph)
        checked_target, largest_class = _checked_target(x, target)
        grad_fn = partial(
            _gradient,
            model,
            score=score,
            create_graph=create_graph,
            internal_batch_size=internal_batch_size,
            largest_class=largest_class,
        )
        full_baseline = _full_baseline(x, baseline) if uses_ig else None
        if method == "smoothgrad":
            fixed = _fixed_target(model, x, checked_target)
            if noise is None:
                device = x.device if generator is None else generator.device
                noise = torch.randn((n_samples, *x.shape), generator=generator, device=device, dtype=x.dtype)
            elif noise.shape != (n_samples, *x.shape):
                raise UPIError(
                    f"SmoothGrad noise of shape {tuple(noise.shape)} does not fit {n_samples} draws of images "
                    f"{tuple(x.shape)}; give (n_samples, N, C, H, W) standard-normal draws."
                )
            noisy = (x + sigma * noise.to(x)).flatten(0, 1)
            if full_baseline is not None:
                full_baseline = full_baseline.expand(n_samples, *x.shape).flatten(0, 1)
            attr = _base_attribution(
                model, grad_fn, noisy, fixed.repeat(n_samples), base_method, full_baseline, n_steps
            )
            attr = attr.view(n_samples, *x.shape).mean(dim=0)
        else:
            attr = _base_attribution(model, grad_fn, x, checked_target, method, full_baseline, n_steps)
    return attr if create_graph else attr.detach()


def _fixed_target(model: nn.Module, x: Tensor, target: Tensor | None) -> Tensor:
    """The ``(N,)`` classes of ``x``, fixed before its path points or noisy copies are stacked.

    Given classes are used as they are; ``None`` (the predicted class) needs the clean forward pass.
    """
    if target is not None:
        return target
    with torch.no_grad():
        return model_logits(model, x).argmax(dim=1)


def _full_baseline(x: Tensor, baseline: Tensor | float | None) -> Tensor:
    """Return the integrated-gradients baseline broadcast to the shape of ``x`` (``None`` = zeros)."""
    if baseline is None:
        return torch.zeros_like(x)
    baseline = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    try:
        return baseline.expand_as(x)
    except RuntimeError as err:
        raise UPIError(
            f"integrated-gradients baseline of shape {tuple(baseline.shape)} does not broadcast to the "
            f"input shape {tuple(x.shape)}; give a constant, a (C, H, W) image or an (N, C, H, W) batch."
        ) from err


def _base_attribution(
    model: nn.Module,
    grad_fn: Callable[[Tensor, Tensor | None], Tensor],
    x: Tensor,
    target: Tensor | None,
    method: SaliencyMethod,
    baseline: Tensor | None,
    n_steps: int,
) -> Tensor:
    """Gradient, gradient x input or integrated gradients of ``x`` (inside the modes, arguments checked).

    ``grad_fn(x, target)`` is :func:`_gradient` with the model and options bound; ``baseline`` is the
    full-shape baseline for integrated gradients.
    """
    if method != "integrated_gradients":
        grad = grad_fn(x, target)
        return grad * x if method == "grad_x_input" else grad
    target = _fixed_target(model, x, target)
    assert baseline is not None, "integrated gradients get their full-shape baseline from attribution()"
    alphas = (torch.arange(n_steps, dtype=x.dtype, device=x.device) + 0.5) / n_steps
    span = x - baseline
    path = baseline + alphas.view(-1, *[1] * x.dim()) * span  # (n_steps, N, ...)
    grads = grad_fn(path.flatten(0, 1), target.repeat(n_steps))
    return span * grads.view(n_steps, *x.shape).mean(dim=0)
