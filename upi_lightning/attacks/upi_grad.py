r"""UPI-Grad: projected stochastic gradient ascent of the UPI objective over one universal perturbation.

:func:`fit_upi_grad` maximizes :math:`\frac1n\sum_i J_i(\delta)` (:class:`~upi_lightning.attacks.
objective.UPIObjective`) with the shared ascent loop :func:`~upi_lightning.attacks.engine.fit_universal`;
:func:`mean_objective` scores candidate perturbations on the same objective (UPI-PCA's sign choice).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm  # not tqdm.auto, which calls iter() early and shifts a DataLoader's shuffling
from typing_extensions import Unpack

from upi_lightning.attacks.engine import AscentOptions, Batches, UPIFitResult, fit_universal, prepare_batch
from upi_lightning.attacks.objective import UPIObjective
from upi_lightning.distributed import Reduce, identity
from upi_lightning.errors import UPIError
from upi_lightning.model_modes import attack_device, evaluation_mode, gradients_enabled
from upi_lightning.noise import make_generator
from upi_lightning.sample_cache import SampleCache
from upi_lightning.threat import ThreatModel


def fit_upi_grad(
    model: nn.Module,
    batches: Batches,
    threat: ThreatModel,
    *,
    objective: UPIObjective | None = None,
    cache_clean_maps: bool = True,
    **options: Unpack[AscentOptions],
) -> UPIFitResult:
    r"""Fit a UPI by projected stochastic gradient ascent on :math:`\frac1n\sum_i J_i(\delta)`.

    ``J`` is :meth:`UPIObjective.per_sample` (default objective: ``UPIObjective()``, the defaults of
    ``attack.py``: simple-gradient logit maps, L2 dissimilarity, a softplus(10) surrogate of ``nn.ReLU``
    modules). ``options`` are the ascent options of :func:`fit_universal` (:class:`AscentOptions`:
    epochs, step_size, schedule, init, reduce, seed, progress, on_step, chunk_size). ``info`` also holds the
    objective settings and the network differentiated (:meth:`UPIObjective.describe_network`). A
    ``UserWarning`` says so when the first step's gradient is exactly zero (e.g. ReLU maps without a
    surrogate), since the fit then cannot move.

    With ``cache_clean_maps`` the clean maps :math:`I(x_i)` are computed once per fit sample (first
    epoch) and reused by later epochs, in any batch order (:class:`SampleCache`); the cache holds
    ``H * W`` floats per sample on the model's device. The result is the same either way.
    """
    objective = UPIObjective() if objective is None else objective
    cache = SampleCache() if cache_clean_maps else None

    def per_sample(x: Tensor, y: Tensor, delta: Tensor, generator: torch.Generator) -> Tensor:
        clean = objective.clean_maps(model, x, y, cache)
        return objective.per_sample(model, x, y, delta, clean, generator, create_graph=True)

    result = fit_universal(model, batches, per_sample, threat, name="upi_grad", **options)
    result.info["objective"] = objective.settings()
    result.info["network"] = objective.describe_network(model)
    return result


def mean_objective(
    model: nn.Module,
    batches: Batches,
    objective: UPIObjective,
    deltas: Sequence[Tensor],
    *,
    seed: int = 0,
    reduce: Reduce = identity,
    progress: bool = False,
    cache: SampleCache | None = None,
) -> list[float]:
    r"""Return the mean objective :math:`\frac1n\sum_i J_i(\delta)` on ``batches`` of each candidate delta.

    No gradient w.r.t. ``delta`` is built. Every candidate sees the same smoothing noise (one generator
    per candidate, same seed), so differences between candidates are not noise. ``reduce`` sums
    ``cat([objective_sums, [count]])`` across ranks. ``cache`` holds clean maps already computed by
    the fit (:meth:`UPIObjective.clean_maps`).
    """
    device = attack_device(model)
    sums = torch.zeros(len(deltas), device=device, dtype=torch.float64)
    count = 0
    with evaluation_mode(model), gradients_enabled():
        generators = [make_generator(seed, device) for _ in deltas]
        moved = [delta.detach().to(device=device, dtype=torch.float32) for delta in deltas]
        for batch in tqdm(batches, desc="objective", disable=not progress, leave=False):
            x, y = prepare_batch(batch, device, tuple(moved[0].shape))
            clean = objective.clean_maps(model, x, y, cache)
            for index, (delta, generator) in enumerate(zip(moved, generators, strict=True)):
                sums[index] += objective.per_sample(model, x, y, delta, clean, generator).sum().double()
            count += len(x)
    packed = reduce(torch.cat([sums, sums.new_tensor([count])]))
    if packed[-1].item() == 0:
        raise UPIError("The data yielded no batch to evaluate the objective on.")
    return (packed[:-1] / packed[-1]).tolist()
