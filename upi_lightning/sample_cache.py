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
        self._chunks: list[Tensor] = []  # one tensor per compute() call, never a tensor per sample
        self._where: dict[bytes, tuple[int, int]] = {}  # sample key -> (chunk, row)

    def __len__(self) -> int:
        return len(self._where)

    def __call__(self, compute: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
        """Return ``compute(x, y)`` (on ``x.device``), computing it only for samples not seen before."""
        keys = sample_keys(x, y)
        first_seen: dict[bytes, int] = {}  # new keys -> their first position in the batch
        for position, key in enumerate(keys):
            if key not in self._where:
                first_seen.setdefault(key, position)
        missing = list(first_seen.values())
        if missing:
            if len(missing) == len(keys):
                computed = compute(x, y).detach()
            else:
                index = torch.tensor(missing, device=x.device)
                computed = compute(x[index], y[index]).detach()
            self._chunks.append(computed if self.storage is None else computed.to(self.storage))
            chunk = len(self._chunks) - 1
            self._where.update({keys[i]: (chunk, row) for row, i in enumerate(missing)})
        rows = [self._chunks[chunk][row] for chunk, row in map(self._where.__getitem__, keys)]
        return torch.stack(rows).to(x.device)
