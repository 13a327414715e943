"""Per-sample results memoized by sample content (the pixels and the label).

Used wherever a per-sample quantity of a *fixed* network is needed again for the same images: the
clean saliency maps of the fit data during a UPI fit (every epoch or power pass revisits them) and the
IR teacher's SmoothGrad targets (every training epoch revisits them). Keys are content hashes, so the
cache is correct whatever the batch order or composition (shuffled loaders, DDP shards).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import Tensor


def sample_keys(x: Tensor, y: Tensor) -> list[bytes]:
    """Return one 16-byte BLAKE2b digest per sample of the pixels ``x[i]`` and the label ``y[i]``."""
    pixels = x.detach().to(device="cpu", dtype=torch.float32).flatten(1).numpy()
    labels = y.detach().cpu().tolist()
    return [
        hashlib.blake2b(row.tobytes() + int(label).to_bytes(8, "little", signed=True), digest_size=16).digest()
        for row, label in zip(pixels, labels, strict=True)
    ]


class SampleCache:
    """Memoize ``compute(x, y) -> (N, ...)`` per sample: each distinct ``(x_i, y_i)`` is computed once.

    The cache holds one result per distinct sample (for maps of the fit data: ``H * W`` floats per
    image), so it suits a fixed network and a finite dataset; build a new cache when the network changes.

    Args:
        storage: device the results are kept on (``None``: the device of the batch they came from,
            e.g. the GPU for fast reuse; ``"cpu"`` to spare accelerator memory).

    """

    def __init__(self, storage: torch.device | str | None = None) -> None:
        self.storage = None if storage is None else torch.device(storage)
        self._results: dict[bytes, Tensor] = {}

    def __len__(self) -> int:
        return len(self._results)

    def __call__(self, compute: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Return ``compute(x, y)`` (on ``x.device``), computing it only for samples not seen before."""
        keys = sample_keys(x, y)
        missing = [i for i, key in enumerate(keys) if key not in self._results]
        if missing:
            if len(missing) == len(keys):
                computed = compute(x, y).detach()
            else:
                index = torch.tensor(missing, device=x.device)
                computed = compute(x[index], y[index]).detach()
            if self.storage is not None:
                computed = computed.to(self.storage)
            self._results.update(zip([keys[i] for i in missing], computed, strict=True))
        return torch.stack([self._results[key] for key in keys]).to(x.device)
