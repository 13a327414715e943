r"""UPI-PCA: the universal perturbation as the top right singular vector of the gradient matrix.

First-order expansion of the smoothed map change around :math:`\delta = 0`:
:math:`D(I(x_i + \delta + Z), I(x_i)) \approx D(I(x_i + Z), I(x_i)) + g_i^\top \delta` with the rows
:math:`g_i = \frac1m \sum_j \nabla_x D(I(x), I(x_i))|_{x = \mathrm{clip}(x_i + Z_{ij})}`
(:func:`per_sample_gradient_rows`), the gradient w.r.t. the clipped image, so a pixel the noise pushed
out of ``[0, 1]`` keeps its entry (through ``torch.clamp`` it would be 0: issue 14, where this made
UPI-PCA at Linf 0.1 weaker than random noise on MNIST). The sign-agnostic criterion
:math:`\sum_i (g_i^\top \delta)^2 - \lambda \sum_i (c_i^\top \delta)^2 = \delta^\top M \delta`, with
:math:`M = G^\top G - \lambda C^\top C` and :math:`c_i` the input gradient of the cross-entropy ("keep
the prediction", :math:`\lambda` = ``objective.keep_prediction``), is maximized over the ball by
:math:`\delta = \pm\varepsilon v_1` (L2) or :math:`\pm\varepsilon\,\mathrm{sign}(v_1)` (Linf), with
:math:`v_1` the top eigenvector of ``M`` (the top right singular vector of ``G`` when
:math:`\lambda = 0`). The sign is the one with the larger objective on the **fit** data.

Solvers: ``svd`` accumulates :math:`M` (``d x d``, float64) over mini-batches and takes ``eigh``: exact,
one pass, memory :math:`8d^2` bytes. ``power`` never holds ``G`` nor ``M``: each pass streams the rows
once and applies :math:`M` to a small orthonormal block (:math:`\sum_b G_b^\top (G_b Q)`, the power
iteration's product), then Rayleigh-Ritz picks the next vectors (LOBPCG-style, see
:func:`_solve_power`); memory :math:`O(d \cdot r)` plus one batch. Each pass recomputes the rows with the
same noise: a sample's noise is keyed by its content and the seed alone (the generator is seeded afresh
for every batch), so in any batch order, a shuffled ``DataLoader``'s included, the iteration runs on one
fixed ``M``. Under DDP, ``reduce`` sums one flat tensor per pass across ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm  # not tqdm.auto, which calls iter() early and shifts a DataLoader's shuffling

from upi_lightning.attacks.engine import Batches, UPIFitResult, passes_over, prepare_batch, warn_if_zero_gradient
from upi_lightning.attacks.objective import UPI_PCA_SIGMA, UPIObjective
from upi_lightning.attacks.upi_grad import mean_objective
from upi_lightning.distributed import Reduce, identity
from upi_lightning.errors import UPIError
from upi_lightning.model_modes import attack_device, evaluation_mode, gradients_enabled, model_logits
from upi_lightning.noise import draw_normal, make_generator
from upi_lightning.sample_cache import SampleCache
from upi_lightning.threat import ThreatModel, straight_through_clip

Solver = Literal["power", "svd"]
SOLVERS: tuple[str, ...] = get_args(Solver)


def _input_gradient_rows(values: Tensor, delta: Tensor) -> Tensor:
    """Rows ``(N, d)`` of the gradient of ``values.sum()`` w.r.t. a per-sample ``delta`` ``(N, C, H, W)``."""
    (grad,) = torch.autograd.grad(values.sum(), delta, allow_unused=True, materialize_grads=True)
    return grad.flatten(1)


def per_sample_gradient_rows(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    objective: UPIObjective,
    generator: torch.Generator | None = None,
    clean_maps: Tensor | None = None,
) -> Tensor:
    r"""Rows :math:`g_i` ``(N, d)`` of ``G`` for one batch, in one batched backward pass.

    :math:`g_i = \frac1m\sum_j \nabla_x D(I(x), I(x_i))` at :math:`x = \mathrm{clip}(x_i + Z_{ij})`,
    :math:`Z_{ij} \sim N(0, \sigma^2 I)`, ``m = objective.n_noise`` (the gradient at
    :math:`\delta = 0` of :meth:`UPIObjective.dissimilarity_term` with a per-sample ``delta``, through its
    straight-through clip). Samples are independent in eval mode, so the gradient of the batch sum gives
    every row at once.
    ``clean_maps``: precomputed :meth:`UPIObjective.clean_maps` of ``x`` (computed when ``None``).

    Raises:
        UPIError: if ``objective.sigma == 0``: at :math:`Z = 0` every row is exactly 0.

    """
    if objective.sigma <= 0:
        raise UPIError(
            "UPI-PCA needs objective.sigma > 0: the rows are gradients at noisy copies x_i + Z, and at Z = 0 "
            "they are exactly zero. Set sigma (e.g. 0.1 in pixel units)."
        )
    with gradients_enabled():
        delta = torch.zeros_like(x, requires_grad=True)
        values = objective.dissimilarity_term(
            model, x, y, delta, clean_maps, generator, create_graph=True, straight_through=True
        )
        return _input_gradient_rows(values, delta)


def prediction_gradient_rows(model: nn.Module, x: Tensor, y: Tensor, objective: UPIObjective) -> Tensor:
    r"""Rows :math:`c_i = \nabla_x \mathrm{CE}(f(x_i), y_i)` ``(N, d)`` on the objective's network.

    Differentiated through a straight-through clip, so pixels on 0 or 1 (MNIST's background) get their
    entries too.
    """
    net = objective.network(model)
    with evaluation_mode(net), gradients_enabled():
        delta = torch.zeros_like(x, requires_grad=True)
        losses = F.cross_entropy(model_logits(net, straight_through_clip(x + delta)), y, reduction="none")
        return _input_gradient_rows(losses, delta)


def _row_batches(
    model: nn.Module,
    batches: Batches,
    objective: UPIObjective,
    device: torch.device,
    seed: int,
    desc: str,
    progress: bool,
    cache: SampleCache | None,
    check_first: bool = False,
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(G_b, C_b)`` per batch, rows shaped like ``x`` (``C_b = None`` without keep-prediction).

    The noise generator is seeded afresh for every batch, so a sample's rows depend on its content and
    ``seed`` only: every pass yields the same rows whatever the batch order (a shuffled loader
    reorders the samples at every pass); ``cache`` keeps the clean maps from one pass to the next.
    ``check_first``: warn if the first batch's rows are all zero
    (:func:`~upi_lightning.attacks.engine.warn_if_zero_gradient`).
    """
    for index, batch in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
        x, y = prepare_batch(batch, device)
        clean = objective.clean_maps(model, x, y, cache)
        rows = per_sample_gradient_rows(model, x, y, objective, make_generator(seed, device), clean).view_as(x)
        if check_first and index == 0:
            warn_if_zero_gradient(rows, "upi_pca")
        penalty = prediction_gradient_rows(model, x, y, objective) if objective.keep_prediction > 0 else None
        yield rows, None if penalty is None else penalty.view_as(x)


def _flat(rows: Tensor | None) -> Tensor | None:
    """Flatten image-shaped rows ``(N, C, H, W)`` to ``(N, d)`` (``None`` stays ``None``)."""
    return None if rows is None else rows.flatten(1)


def _symmetric(matrix: Tensor) -> Tensor:
    """Return ``(A + A.T) / 2``, removing the rounding asymmetry before ``eigh``."""
    return (matrix + matrix.T) / 2


def _solve_svd(
    rows: Iterator[tuple[Tensor, Tensor | None]], lam: float, reduce: Reduce, max_bytes: int
) -> tuple[Tensor, list[float], dict[str, Any]]:
    r"""Exact solver: accumulate :math:`M = G^\top G - \lambda C^\top C` in float64, reduce, ``eigh``.

    Memory: the ``d x d`` matrix lives in one flat buffer with the sample count as its last entry (the
    tensor ``reduce`` sums, no copy), accumulated in place (``addmm_``); ``eigh`` reads its lower
    triangle and adds its copy, the eigenvectors and LAPACK's ``2 d^2`` workspace: :func:`svd_bytes`.
    """
    buffer: Tensor | None = None
    for image_rows, image_penalty in rows:
        batch_rows, penalty, shape = image_rows.flatten(1).double(), _flat(image_penalty), image_rows.shape[1:]
        dim = batch_rows.shape[1]
        if buffer is None:
            check_svd_memory(dim, max_bytes)
            buffer = batch_rows.new_zeros(dim * dim + 1)
        gram = buffer[:-1].view(dim, dim)
        gram.addmm_(batch_rows.T, batch_rows)
        if penalty is not None:
            penalty = penalty.double()
            gram.addmm_(penalty.T, penalty, alpha=-lam)
        buffer[-1] += len(batch_rows)
    if buffer is None:
        raise UPIError("upi_pca: the fit data yielded no batch.")
    buffer = reduce(buffer)
    count_all = buffer[-1].item()
    values, vectors = torch.linalg.eigh(buffer[:-1].view(dim, dim))  # reads the lower triangle only
    value = values[-1].item() / count_all
    return vectors[:, -1].float().view(shape), [value], {"eigenvalue": value, "passes": 1}


def format_bytes(count: float) -> str:
    """``count`` bytes as ``"1.50 GiB"``, ``"72.0 MiB"`` or ``"12.0 KiB"``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if count >= size:
            return f"{count / size:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{count / 2**10:.1f} KiB"


def svd_bytes(dim: int) -> int:
    """Peak bytes of the ``svd`` solver for ``d = dim``: five ``d x d`` float64 arrays.

    The matrix, ``eigh``'s copy of it, the eigenvectors and the ``2 d^2`` workspace of LAPACK's
    divide-and-conquer ``syevd`` (measured: 391 MiB for d = 3072, where five arrays are 360 MiB).
    """
    return 5 * 8 * dim * dim


def check_svd_memory(dim: int, max_bytes: int) -> None:
    """Refuse an exact solve whose matrices (:func:`svd_bytes`) exceed ``max_bytes``, naming the way out.

    Raises:
        UPIError: when ``svd_bytes(dim) > max_bytes``.
    """
    needed = svd_bytes(dim)
    if needed > max_bytes:
        raise UPIError(
            f"solver='svd' needs about {format_bytes(needed)} (five {dim} x {dim} float64 arrays), more than "
            f"max_bytes={format_bytes(max_bytes)}; use solver='power' (memory O(d)) or raise max_bytes."
        )


def _solve_power(
    make_rows: Callable[[int], Iterator[tuple[Tensor, Tensor | None]]],
    lam: float,
    reduce: Reduce,
    n_iter: int,
    block_size: int,
    tol: float,
    seed: int,
    device: torch.device,
) -> tuple[Tensor, list[float], dict[str, Any]]:
    r"""Streaming block eigensolver for the largest algebraic eigenvalue of :math:`M`.

    Pass ``k`` streams the rows from ``make_rows(k)`` once and applies :math:`M` to an orthonormal basis
    ``Q`` of :math:`[X_k, R_k, X_{k-1}]` (``r = block_size`` current vectors, their residuals and the
    previous vectors, as in LOBPCG): :math:`MQ = \sum_b G_b^\top (G_b Q) - \lambda C_b^\top (C_b Q)`,
    reduced across ranks in one call. Rayleigh-Ritz on :math:`Q^\top M Q` gives the next
    :math:`X_{k+1}`, its residuals :math:`MX - X\Theta` at no extra cost, and the estimate. This is the
    power iteration :math:`v \leftarrow Mv / \|Mv\|` made much faster by the extra directions, and it
    finds the largest *algebraic* eigenvalue even when the keep-prediction term makes :math:`M`
    indefinite. Stops after ``n_iter`` passes or when the relative residual
    :math:`\|Mv - \theta v\| / \max|\theta_i|` of the estimate drops below ``tol``.
    """
    current: Tensor | None = None
    previous: Tensor | None = None
    residual: Tensor | None = None
    history: list[float] = []
    converged = False
    for iteration in range(n_iter):
        basis: Tensor | None = None
        product: Tensor | None = None
        count = 0
        for image_rows, image_penalty in make_rows(iteration):
            batch_rows, penalty, shape = image_rows.flatten(1), _flat(image_penalty), image_rows.shape[1:]
            if current is None:
                dim = batch_rows.shape[1]
                start = draw_normal((dim, min(block_size, dim)), make_generator(seed + 1, device), device)
                current = torch.linalg.qr(start).Q
            if basis is None:
                blocks = [block for block in (current, residual, previous) if block is not None]
                basis = torch.linalg.qr(torch.cat(blocks, dim=1)).Q
            term = batch_rows.T @ (batch_rows @ basis)
            if penalty is not None:
                term = term - lam * (penalty.T @ (penalty @ basis))
            product = term if product is None else product + term
            count += len(batch_rows)
        if product is None or basis is None or current is None:
            raise UPIError("upi_pca: the fit data yielded no batch.")
        packed = reduce(torch.cat([product.flatten(), product.new_tensor([count])]))
        product = packed[:-1].view_as(product)
        values, vectors = torch.linalg.eigh(_symmetric((basis.T @ product).double()))
        top = vectors[:, -current.shape[1] :].flip(1).to(basis.dtype)
        theta = values[-current.shape[1] :].flip(0).to(basis.dtype)
        previous, current = current, basis @ top
        residual = product @ top - current * theta
        history.append(theta[0].item() / packed[-1].item())
        relative_residual = (torch.linalg.vector_norm(residual[:, 0]) / values.abs().max()).item()
        if relative_residual < tol:
            converged = True
            break
    assert current is not None
    diagnostics = {"eigenvalue": history[-1], "passes": len(history), "converged": converged}
    return current[:, 0].view(shape), history, {**diagnostics, "relative_residual": relative_residual}


def fit_upi_pca(
    model: nn.Module,
    batches: Batches,
    threat: ThreatModel,
    *,
    objective: UPIObjective | None = None,
    solver: Solver = "power",
    n_iter: int = 20,
    block_size: int = 4,
    tol: float = 1e-5,
    max_bytes: int = 2 * 2**30,
    reduce: Reduce = identity,
    seed: int = 0,
    progress: bool = False,
    cache_clean_maps: bool = False,
) -> UPIFitResult:
    r"""Fit a UPI as :math:`\pm\varepsilon v_1(M)` (module docstring), sign chosen on the fit data.

    Args:
        model: the classifier (run in eval mode, its modes restored, parameters untouched).
        batches: re-iterable of ``(x, y)`` batches of ``[0, 1]`` images, in any order at every pass (a
            sample's noise does not depend on its batch: the power solver iterates on one fixed matrix).
        threat: the ball; ``delta`` is its :meth:`~upi_lightning.threat.ThreatModel.extreme_point` along
            :math:`v_1` (L2: :math:`\varepsilon v_1`, Linf: :math:`\varepsilon\,\mathrm{sign}(v_1)`).
        objective: the UPI objective; needs ``sigma > 0`` (default: ``UPIObjective(sigma=UPI_PCA_SIGMA)``,
            as ``attack.py``). ``keep_prediction`` is the :math:`\lambda` of :math:`M`.
        solver: ``power`` (streaming, any ``d``) or ``svd`` (exact, :math:`8d^2` bytes).
        n_iter: maximum number of power passes over the data.
        block_size: number of vectors ``r`` iterated together by the power solver (each pass applies
            :math:`M` to up to ``3r`` vectors, at no extra gradient cost); more vectors converge faster
            when the top eigenvalues are close.
        tol: the power solver stops when the relative residual :math:`\|Mv - \theta v\| / \max|\theta_i|`
            drops below ``tol``.
        max_bytes: memory limit of the ``svd`` solver (:func:`svd_bytes`: its matrix and ``eigh``'s arrays).
        reduce: sums a flat tensor across ranks (once per pass, and once for the sign).
        seed: seeds the noise (a sample's noise is the same at every pass) and the power iteration's start.
        progress: show tqdm progress bars.
        cache_clean_maps: compute the clean maps of each fit sample once for all passes and the sign
            choice (:class:`~upi_lightning.sample_cache.SampleCache`): each pass is about a quarter
            cheaper, but memory grows by ``H * W`` floats per fit sample, so it is off by default to keep
            the streaming solver's memory independent of ``n``.

    Returns:
        ``history``: per pass, the Rayleigh quotient :math:`v^\top M v / n` of the current estimate;
        ``info``: solver diagnostics, the objective of both signs and the chosen sign.

    """
    objective = UPIObjective(sigma=UPI_PCA_SIGMA) if objective is None else objective
    if solver not in SOLVERS:
        raise UPIError(f"Unknown UPI-PCA solver {solver!r}: use one of {', '.join(map(repr, SOLVERS))}.")
    if n_iter < 1 or block_size < 1 or not tol >= 0:
        raise UPIError(f"UPI-PCA needs n_iter >= 1, block_size >= 1, tol >= 0; got {n_iter}, {block_size}, {tol}.")
    passes_over(batches, 2 + (n_iter if solver == "power" else 0))
    device = attack_device(model)
    lam = objective.keep_prediction
    cache = SampleCache() if cache_clean_maps else None
    start = time.perf_counter()
    with evaluation_mode(model), gradients_enabled():

        def make_rows(iteration: int) -> Iterator[tuple[Tensor, Tensor | None]]:
            desc = f"upi_pca pass {iteration + 1}"
            return _row_batches(model, batches, objective, device, seed, desc, progress, cache, iteration == 0)

        if solver == "svd":
            direction, history, diagnostics = _solve_svd(make_rows(0), lam, reduce, max_bytes)
        else:
            direction, history, diagnostics = _solve_power(
                make_rows, lam, reduce, n_iter, block_size, tol, seed, device
            )
        delta = threat.extreme_point(direction)
        plus, minus = mean_objective(
            model, batches, objective, [delta, -delta], seed=seed, reduce=reduce, progress=progress, cache=cache
        )
    if minus > plus:
        delta = -delta
    info = {
        "method": "upi_pca",
        "norm": threat.norm,
        "eps": threat.eps,
        "solver": solver,
        "n_iter": n_iter,
        "block_size": block_size,
        "seed": seed,
        **diagnostics,
        "objective_plus": plus,
        "objective_minus": minus,
        "sign": 1 if plus >= minus else -1,
        "objective": objective.settings(),
        "network": objective.describe_network(model),
    }
    return UPIFitResult(delta.detach(), history, time.perf_counter() - start, info)
