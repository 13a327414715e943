"""Attribution-stability metrics against brute-force NumPy loops, and their DDP reduction."""

from __future__ import annotations

import itertools
import math
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from upi_lightning.errors import UPIError
from upi_lightning.metrics import (
    AttributionStability,
    CenterOfMassShift,
    KendallRankCorrelation,
    MapCosineSimilarity,
    MapSSIM,
    PredictionFlipRate,
    RelativeL2Dissimilarity,
    SpearmanRankCorrelation,
    TopKIntersection,
)
from upi_lightning.stability import (
    average_ranks,
    center_of_mass_shift,
    kendall_rank_correlation,
    map_cosine_similarity,
    map_ssim,
    prediction_flips,
    relative_l2_dissimilarity,
    spearman_rank_correlation,
    topk_intersection,
)

H, W = 9, 8

# ------------------------------------------------------------------ brute force


def np_ranks(v: np.ndarray) -> np.ndarray:
    """1 + (number of smaller values) + (number of other equal values) / 2."""
    return np.array([1 + np.sum(v < x) + (np.sum(v == x) - 1) / 2 for x in v])


def np_degenerate(num: float, den: float, flat_a: bool, flat_b: bool) -> float:
    if den > 0:
        return num / den
    return 1.0 if flat_a and flat_b else 0.0


def np_pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    nx, ny = np.sqrt(np.sum(x * x)), np.sqrt(np.sum(y * y))
    return np_degenerate(float(np.sum(x * y)), nx * ny, nx == 0, ny == 0)


def np_topk(v: np.ndarray, k: int) -> list[int]:
    return sorted(range(v.size), key=lambda i: (-v[i], i))[:k]


def np_topk_intersection(a: np.ndarray, b: np.ndarray, k: int) -> float:
    return len(set(np_topk(a.ravel(), k)) & set(np_topk(b.ravel(), k))) / k


def np_spearman(a: np.ndarray, b: np.ndarray) -> float:
    return np_pearson(np_ranks(a.ravel()), np_ranks(b.ravel()))


def np_kendall(a: np.ndarray, b: np.ndarray, k: int) -> float:
    a, b = a.ravel(), b.ravel()
    union = sorted(set(np_topk(a, k)) | set(np_topk(b, k)))
    concordance = n_0 = ties_a = ties_b = 0
    for i, j in itertools.combinations(union, 2):
        sa, sb = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
        concordance += sa * sb
        n_0 += 1
        ties_a += sa == 0
        ties_b += sb == 0
    untied_a, untied_b = n_0 - ties_a, n_0 - ties_b
    return np_degenerate(concordance, math.sqrt(untied_a * untied_b), untied_a == 0, untied_b == 0)


def np_center(m: np.ndarray) -> np.ndarray:
    mass, row, col = 0.0, 0.0, 0.0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            mass += m[i, j]
            row += m[i, j] * i
            col += m[i, j] * j
    if mass == 0:
        return np.array([(m.shape[0] - 1) / 2, (m.shape[1] - 1) / 2])
    return np.array([row / mass, col / mass])


def np_com_shift(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np_center(a) - np_center(b)))


def np_relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
    den = norm_a if norm_a > 0 else norm_b
    return float(np.linalg.norm(a - b) / den) if den > 0 else 0.0


def np_cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
    return np_degenerate(float(np.sum(a * b)), norm_a * norm_b, norm_a == 0, norm_b == 0)


def np_ssim(a: np.ndarray, b: np.ndarray, sigma: float = 1.5) -> float:
    """Gaussian-window SSIM with reflection padding, data range 1, on maps rescaled to a max of 1."""
    a = a / a.max() if a.max() > 0 else a
    b = b / b.max() if b.max() > 0 else b
    pad = int(3.5 * sigma + 0.5)
    g = np.exp(-0.5 * (np.arange(-pad, pad + 1) / sigma) ** 2)
    kernel = np.outer(g, g) / g.sum() ** 2
    pa, pb = np.pad(a, pad, mode="reflect"), np.pad(b, pad, mode="reflect")
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            wa, wb = (
                pa[i : i + 2 * pad + 1, j : j + 2 * pad + 1],
                pb[i : i + 2 * pad + 1, j : j + 2 * pad + 1],
            )
            mu_a, mu_b = np.sum(kernel * wa), np.sum(kernel * wb)
            var_a = max(np.sum(kernel * wa * wa) - mu_a**2, 0.0)
            var_b = max(np.sum(kernel * wb * wb) - mu_b**2, 0.0)
            cov = np.sum(kernel * wa * wb) - mu_a * mu_b
            values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


# ------------------------------------------------------------------- test maps


def random_maps(seed: int, n: int = 10) -> tuple[Tensor, Tensor]:
    """Continuous maps, heavily tied integer maps, all-zero and constant maps, identical pairs."""
    gen = np.random.default_rng(seed)
    a = gen.random((n, H, W))
    b = np.abs(a + 0.3 * gen.standard_normal((n, H, W)))
    a[1], b[1] = gen.integers(0, 3, (H, W)), gen.integers(0, 3, (H, W))  # many ties
    a[2], b[2] = gen.integers(0, 2, (H, W)), gen.integers(0, 2, (H, W))
    a[3] = 0.0  # clean map all zero
    b[4] = 0.0  # perturbed map all zero
    a[5] = b[5] = 0.0  # both zero
    a[6], b[6] = 0.5, gen.random((H, W))  # constant non-zero clean map
    b[7] = a[7]  # identical
    a[8], b[8] = a[8], a[8].max() - a[8]  # reversed order
    return torch.from_numpy(a), torch.from_numpy(b)


TORCH_VS_NUMPY: list[tuple[Callable[..., Tensor], Callable[..., float], dict]] = [
    (topk_intersection, np_topk_intersection, {"k": 1}),
    (topk_intersection, np_topk_intersection, {"k": 7}),
    (topk_intersection, np_topk_intersection, {"k": H * W}),
    (kendall_rank_correlation, np_kendall, {"k": 1}),
    (kendall_rank_correlation, np_kendall, {"k": 6}),
    (kendall_rank_correlation, np_kendall, {"k": H * W}),
    (spearman_rank_correlation, np_spearman, {}),
    (center_of_mass_shift, np_com_shift, {}),
    (relative_l2_dissimilarity, np_relative_l2, {}),
    (map_cosine_similarity, np_cosine, {}),
    (map_ssim, np_ssim, {}),
    (map_ssim, np_ssim, {"sigma": 0.8}),
]


@pytest.mark.parametrize(
    ("fn", "oracle", "kwargs"),
    TORCH_VS_NUMPY,
    ids=[f"{fn.__name__}{kw}" for fn, _, kw in TORCH_VS_NUMPY],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_metric_matches_brute_force(fn, oracle, kwargs: dict, seed: int) -> None:
    a, b = random_maps(seed)
    values = fn(a, b, **kwargs)
    expected = [oracle(x, y, **kwargs) for x, y in zip(a.numpy(), b.numpy(), strict=True)]
    assert values.shape == (a.shape[0],)
    assert torch.isfinite(values).all()
    torch.testing.assert_close(values, torch.tensor(expected, dtype=values.dtype), rtol=1e-6, atol=1e-7)
    # float32 maps give the same values up to float32 rounding
    torch.testing.assert_close(fn(a.float(), b.float(), **kwargs), values.float(), rtol=1e-4, atol=1e-4)


def test_known_values() -> None:
    a, b = random_maps(2)
    assert torch.allclose(spearman_rank_correlation(a, a), torch.ones(10, dtype=a.dtype))
    assert torch.allclose(spearman_rank_correlation(a[8:9], b[8:9]), torch.tensor([-1.0], dtype=a.dtype))
    assert kendall_rank_correlation(a[8:9], b[8:9], k=H * W).item() == pytest.approx(-1.0)
    assert torch.allclose(map_ssim(a, a), torch.ones(10, dtype=a.dtype))
    assert torch.equal(topk_intersection(a, a, 5), torch.ones(10, dtype=a.dtype))
    assert torch.equal(center_of_mass_shift(a, a), torch.zeros(10, dtype=a.dtype))
    one_hot = torch.zeros(2, 4, 5)
    one_hot[0, 0, 0] = one_hot[1, 3, 4] = 1.0
    assert center_of_mass_shift(one_hot[:1], one_hot[1:]).item() == pytest.approx(5.0)  # 3-4-5 triangle


def test_spearman_is_pearson_of_average_ranks() -> None:
    a, b = random_maps(3)
    rows = [0, 1, 2, 7, 8]  # non-degenerate rows
    ranks_a, ranks_b = average_ranks(a.flatten(1)), average_ranks(b.flatten(1))
    for row in rows:
        torch.testing.assert_close(ranks_a[row], torch.from_numpy(np_ranks(a[row].flatten().numpy())))
        expected = np.corrcoef(ranks_a[row].numpy(), ranks_b[row].numpy())[0, 1]
        assert spearman_rank_correlation(a, b)[row].item() == pytest.approx(expected, abs=1e-12)


def test_degenerate_maps_documented_values() -> None:
    zero, ones = torch.zeros(1, H, W), torch.ones(1, H, W)
    bump = torch.zeros(1, H, W)
    bump[0, 2, 3] = 1.0
    for fn in (spearman_rank_correlation, map_cosine_similarity, map_ssim):
        assert fn(zero, zero).item() == pytest.approx(1.0)
    for fn in (spearman_rank_correlation, map_cosine_similarity):
        assert fn(zero, bump).item() == 0.0
    assert kendall_rank_correlation(zero, ones, 3).item() == 1.0  # both constant on the union
    assert kendall_rank_correlation(zero, bump, 3).item() == 0.0
    assert relative_l2_dissimilarity(zero, zero).item() == 0.0
    assert relative_l2_dissimilarity(zero, bump).item() == 1.0
    assert topk_intersection(zero, zero, 4).item() == 1.0  # ties go to the lower index
    assert center_of_mass_shift(zero, bump).item() == pytest.approx(math.hypot(2 - 4, 3 - 3.5))


def test_prediction_flips_and_rate() -> None:
    gen = torch.Generator().manual_seed(0)
    clean, perturbed = torch.randn(20, 5, generator=gen), torch.randn(20, 5, generator=gen)
    expected = (np.argmax(clean.numpy(), 1) != np.argmax(perturbed.numpy(), 1)).astype(np.float32)
    torch.testing.assert_close(prediction_flips(clean, perturbed), torch.from_numpy(expected))
    rate = PredictionFlipRate()
    rate.update(clean[:3], perturbed[:3])
    rate.update(clean[3:], perturbed[3:])
    assert rate.compute().item() == pytest.approx(expected.mean())


CLASSES = [
    (TopKIntersection(k=5), lambda a, b: topk_intersection(a, b, 5)),
    (KendallRankCorrelation(k=5), lambda a, b: kendall_rank_correlation(a, b, 5)),
    (SpearmanRankCorrelation(), spearman_rank_correlation),
    (CenterOfMassShift(), center_of_mass_shift),
    (RelativeL2Dissimilarity(), relative_l2_dissimilarity),
    (MapCosineSimilarity(), map_cosine_similarity),
    (MapSSIM(), map_ssim),
]


@pytest.mark.parametrize(("metric", "fn"), CLASSES, ids=[type(m).__name__ for m, _ in CLASSES])
def test_metric_class_is_the_sample_mean_over_unequal_batches(metric, fn) -> None:
    a, b = random_maps(4, n=11)
    metric.reset()
    for lo, hi in ((0, 2), (2, 9), (9, 11)):
        metric.update(a[lo:hi], b[lo:hi])
    assert metric.compute().item() == pytest.approx(fn(a, b).mean().item(), abs=1e-6)
    assert metric.count.item() == 11


def test_attribution_stability_collection_keeps_metrics_apart() -> None:
    a, b = random_maps(5)
    collection = AttributionStability(k=5, prefix="val/")
    collection.update(a, a)  # every similarity is 1 on the first batch: no merged compute groups
    collection.update(a, b)
    a2, b2 = torch.cat([a, a]), torch.cat([a, b])
    expected = {
        "val/topk_intersection": topk_intersection(a2, b2, 5),
        "val/spearman": spearman_rank_correlation(a2, b2),
        "val/kendall": kendall_rank_correlation(a2, b2, 5),
        "val/com_shift": center_of_mass_shift(a2, b2),
        "val/relative_l2": relative_l2_dissimilarity(a2, b2),
        "val/cosine": map_cosine_similarity(a2, b2),
        "val/ssim": map_ssim(a2, b2),
    }
    result = collection.compute()
    assert set(result) == set(expected)
    for key, values in expected.items():
        assert result[key].item() == pytest.approx(values.mean().item(), abs=1e-6), key


def test_kendall_chunking_matches_single_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = random_maps(6)
    full = kendall_rank_correlation(a, b, 6)
    monkeypatch.setattr("upi_lightning.stability._KENDALL_PAIRS_PER_CHUNK", 1)
    torch.testing.assert_close(kendall_rank_correlation(a, b, 6), full)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: topk_intersection(torch.rand(2, 3, 3), torch.rand(2, 3, 3), 10), "larger than the map"),
        (
            lambda: kendall_rank_correlation(torch.rand(2, 3, 3), torch.rand(2, 3, 3), 10),
            "larger than the map",
        ),
        (lambda: topk_intersection(torch.rand(2, 3, 3), torch.rand(2, 3, 3), 0), "positive integer"),
        (lambda: spearman_rank_correlation(torch.rand(2, 3, 3), torch.rand(2, 3, 4)), "same shape"),
        (lambda: map_cosine_similarity(torch.rand(2, 9), torch.rand(3, 9)), "same shape"),
        (lambda: center_of_mass_shift(torch.rand(2, 9), torch.rand(2, 9)), r"\(N, H, W\)"),
        (lambda: map_ssim(torch.rand(2, 4, 4), torch.rand(2, 4, 4)), "smaller sigma"),
        (lambda: prediction_flips(torch.rand(2, 3), torch.rand(2, 4)), "same shape"),
        (lambda: TopKIntersection(k=-1), "positive integer"),
        (
            lambda: TopKIntersection(k=50).update(torch.rand(2, 5, 5), torch.rand(2, 5, 5)),
            "larger than the map",
        ),
    ],
)
def test_invalid_arguments_raise_upi_error(call: Callable[[], object], message: str) -> None:
    with pytest.raises(UPIError, match=message):
        call()
    assert issubclass(UPIError, ValueError)


# ------------------------------------------------------------------------ DDP

SHARDS = ((0, 3), (3, 10))  # unequal: 3 samples on rank 0, 7 on rank 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metrics() -> tuple[AttributionStability, PredictionFlipRate]:
    return AttributionStability(k=5), PredictionFlipRate()


def _ddp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        a, b = random_maps(7)
        logits_a, logits_b = a.flatten(1)[:, :4], b.flatten(1)[:, :4]
        stability, flips = _metrics()
        lo, hi = SHARDS[rank]
        for start in range(lo, hi, 2):  # several updates of uneven sizes
            stop = min(start + 2, hi)
            stability.update(a[start:stop], b[start:stop])
            flips.update(logits_a[start:stop], logits_b[start:stop])
        result = {**stability.compute(), "flips": flips.compute()}
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def test_ddp_unequal_shards_match_single_process(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    # fork (where available) skips re-importing torch in the children: the test takes about a second
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_ddp_worker, args=(_free_port(), str(out)), nprocs=2, start_method=start_method)
    ddp = torch.load(out)

    a, b = random_maps(7)
    stability, flips = _metrics()
    stability.update(a, b)
    flips.update(a.flatten(1)[:, :4], b.flatten(1)[:, :4])
    single = {**stability.compute(), "flips": flips.compute()}
    assert set(ddp) == set(single)
    for key, value in single.items():
        assert ddp[key].item() == pytest.approx(value.item(), abs=1e-6), key
    # a mean of the per-rank means would differ: the test can tell the two apart
    shard_means = [topk_intersection(a[lo:hi], b[lo:hi], 5).mean() for lo, hi in SHARDS]
    assert abs(sum(shard_means).item() / 2 - single["topk_intersection"].item()) > 1e-3
