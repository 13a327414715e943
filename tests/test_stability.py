"""Map-profile functions of ``upi_lightning.stability``, against loops over numpy arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from upi_lightning.errors import UPIError
from upi_lightning.stability import map_image_cosine, topk_mass_share


def brute_topk_share(map_: np.ndarray, k: int) -> float:
    values = sorted(abs(float(v)) for v in map_.ravel())
    return sum(values[-k:]) / sum(values)


def brute_cosine(a: np.ndarray, b: np.ndarray) -> float:
    dot = sum(float(p) * float(q) for p, q in zip(a.ravel(), b.ravel(), strict=True))
    return dot / (np.sqrt(sum(float(p) ** 2 for p in a.ravel())) * np.sqrt(sum(float(q) ** 2 for q in b.ravel())))


@pytest.mark.parametrize("k", [1, 3, 12])
def test_topk_mass_share_matches_a_sorted_sum(k: int) -> None:
    maps = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    expected = [brute_topk_share(m, k) for m in maps.numpy()]
    assert np.allclose(topk_mass_share(maps, k).numpy(), expected)


def test_topk_mass_share_of_flat_peaked_and_zero_maps() -> None:
    maps = torch.zeros(3, 4, 4)
    maps[0] = 1.0
    maps[1, 2, 3] = 5.0
    assert topk_mass_share(maps, 2).tolist() == pytest.approx([2 / 16, 1.0, 2 / 16])
    with pytest.raises(UPIError, match="k=17 is larger than the map"):
        topk_mass_share(maps, 17)
    with pytest.raises(UPIError, match=r"maps must be \(N, H, W\)"):
        topk_mass_share(maps[0], 2)


def test_map_image_cosine_matches_the_channel_mean_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 5, 6, generator=generator, dtype=torch.float64)
    maps = torch.randn(4, 5, 6, generator=generator, dtype=torch.float64)
    expected = []
    for image, map_ in zip(images.numpy(), maps.numpy(), strict=True):
        gray = np.array([[image[:, i, j].sum() / 3 for j in range(6)] for i in range(5)])
        expected.append(brute_cosine(np.abs(map_), gray))
    assert np.allclose(map_image_cosine(maps, images).numpy(), expected)
    assert map_image_cosine(images.mean(dim=1) * 7, images).tolist() == pytest.approx([1.0] * 4)  # a copy
    with pytest.raises(UPIError, match="must be"):
        map_image_cosine(maps, images[:, :, :4])
