"""Random draws: seeded generators, and noise keyed by each sample so that batching and processes don't matter.

:func:`sample_normal` draws a sample's noise from a generator seeded by the sample's content (and one
draw of the caller's generator), so a fit on two processes, or in another batch order, smooths every
sample with the same noise as one process does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import Tensor

from upi_lightning.sample_cache import sample_keys


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Return a ``torch.Generator`` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(seed)


def draw(
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
    return draw(torch.randn, shape, generator, device)


def sample_generators(x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> list[torch.Generator]:
    """One generator per sample of ``(x, y)`` (on ``x.device``), keyed by the sample, not by the batch.

    Each call draws one integer from ``generator`` (the call's seed); the generator of sample ``i`` is
    seeded from that integer and the content of ``(x_i, y_i)`` (:func:`upi_lightning.sample_cache.
    sample_keys`), so what it draws does not depend on its position in the batch, nor on how many
    processes share the data: processes that draw the same call seeds (same seed, same number of calls)
    draw the same numbers for a sample as one process does. The call seed is the generator's next draw,
    so a sample drawn in another call (another batch order) gets other noise, unless the generator is
    seeded afresh for every call (UPI-PCA's rows: a sample's noise is then the same in any order).
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
