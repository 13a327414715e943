from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import (
    SMOOTH_OBJECTIVE,
    QuadraticScore,
    TinyCNN,
    abs_cosine,
    assert_untouched,
    count_clean_maps,
    gradient_matrix,
    make_batches,
    run_ranks,
    snapshot,
    split_batches,
)
from upi_lightning.attacks.objective import UPIObjective
from upi_lightning.attacks.settings import UPIPCASettings
from upi_lightning.attacks.upi_grad import mean_objective
from upi_lightning.attacks.upi_pca import (
    fit_upi_pca,
    format_bytes,
    per_sample_gradient_rows,
    prediction_gradient_rows,
    svd_bytes,
)
from upi_lightning.errors import UPIError
from upi_lightning.noise import make_generator, sample_normal
from upi_lightning.saliency import SaliencySettings, saliency_map
from upi_lightning.surrogate import softplus_surrogate
from upi_lightning.threat import L2Ball, LinfBall


@pytest.mark.parametrize("solver", ["power", "svd"])
def test_upi_pca_recovers_the_known_direction(solver: str) -> None:
    model = QuadraticScore()
    model.train()
    before = snapshot(model)
    batches = make_batches(3, 16)
    objective = UPIObjective(k=10, sigma=0.05)
    result = fit_upi_pca(model, batches, L2Ball(0.25), objective=objective, solver=solver)
    assert abs_cosine(result.delta, model.u.detach()) > 0.99
    assert result.delta.norm().item() == pytest.approx(0.25, rel=1e-5)
    assert result.to_perturbation().metadata["solver"] == solver  # the info is storable metadata
    linf = fit_upi_pca(model, batches, LinfBall(0.03), objective=objective, solver=solver)
    assert torch.equal(linf.delta.abs(), torch.full((1, 8, 8), 0.03))
    assert abs_cosine(linf.delta, model.u.detach().sign()) == pytest.approx(1.0)
    assert_untouched(model, before)


def test_rows_are_per_sample_gradients_in_one_batch() -> None:
    model = TinyCNN()
    x, y = make_batches(1, 5, shape=(1, 6, 6))[0]
    objective = UPIObjective(k=5, sigma=0.05, n_noise=2, surrogate_beta=5.0)
    rows = per_sample_gradient_rows(model, x, y, objective, make_generator(3))
    noise = sample_normal(x, y, 2, make_generator(3))
    surrogate = softplus_surrogate(model, 5.0)
    for i in range(len(x)):  # one sample at a time, by hand: the batched rows must not mix samples
        xi, yi = x[i : i + 1], y[i : i + 1]
        delta = torch.zeros(1, 1, 6, 6, requires_grad=True)
        clean = saliency_map(surrogate, xi, yi)
        change = [
            (saliency_map(surrogate, (xi + delta + 0.05 * z[i]).clamp(0, 1), yi, create_graph=True) - clean).norm()
            for z in noise
        ]
        (grad,) = torch.autograd.grad(sum(change) / 2, delta)
        assert torch.allclose(rows[i], grad.flatten(), atol=1e-6)
    with pytest.raises(UPIError, match="sigma > 0"):
        per_sample_gradient_rows(model, x, y, UPIObjective())


def test_power_method_agrees_with_exact_svd_of_g() -> None:
    model = TinyCNN()
    batches = make_batches(4, 12, shape=(1, 6, 6), low=0.1, high=0.9)
    matrix = gradient_matrix(model, batches, SMOOTH_OBJECTIVE)
    top = torch.linalg.svd(matrix.double(), full_matrices=False).Vh[0]
    power = fit_upi_pca(model, batches, L2Ball(1.0), objective=SMOOTH_OBJECTIVE, solver="power")
    exact = fit_upi_pca(model, batches, L2Ball(1.0), objective=SMOOTH_OBJECTIVE, solver="svd")
    assert abs_cosine(power.delta, top) > 0.99
    assert abs_cosine(exact.delta, top) > 0.9999
    sigma_1 = torch.linalg.svdvals(matrix.double())[0].item()
    assert exact.info["eigenvalue"] == pytest.approx(sigma_1**2 / len(matrix), rel=1e-4)
    assert power.history[-1] == pytest.approx(sigma_1**2 / len(matrix), rel=1e-3)


def test_a_shuffled_loader_gives_the_fixed_order_fit() -> None:
    # a sample's noise must not depend on the batch it lands in, or every pass iterates on another matrix
    model = TinyCNN()
    batches = make_batches(4, 12, shape=(1, 6, 6), low=0.1, high=0.9)
    dataset = TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    shuffled = DataLoader(dataset, batch_size=12, shuffle=True, generator=torch.Generator().manual_seed(0))
    fixed = fit_upi_pca(model, batches, L2Ball(1.0), objective=SMOOTH_OBJECTIVE, n_iter=30)
    result = fit_upi_pca(model, shuffled, L2Ball(1.0), objective=SMOOTH_OBJECTIVE, n_iter=30)
    assert fixed.info["converged"] and result.info["converged"] and result.info["passes"] < 30
    assert abs_cosine(result.delta, fixed.delta) > 0.9999
    assert result.history[-1] == pytest.approx(fixed.history[-1], rel=1e-4)


def test_keep_prediction_takes_the_top_algebraic_eigenvector() -> None:
    model = TinyCNN()
    batches = make_batches(3, 10, shape=(1, 6, 6), low=0.1, high=0.9)
    objective = UPIObjective(k=5, sigma=0.05, surrogate_beta=5.0, keep_prediction=0.2)
    g = gradient_matrix(model, batches, objective).double()
    c = torch.cat([prediction_gradient_rows(model, x, y, objective) for x, y in batches]).double()
    values, vectors = torch.linalg.eigh(g.T @ g - 0.2 * c.T @ c)
    assert values[0].abs() > values[-1].abs()  # the largest |eigenvalue| is negative: a naive power method fails
    for solver in ("svd", "power"):
        result = fit_upi_pca(model, batches, L2Ball(1.0), objective=objective, solver=solver)
        assert abs_cosine(result.delta, vectors[:, -1]) > 0.99


@pytest.mark.parametrize("solver", ["power", "svd"])
def test_sign_is_chosen_on_the_fit_data(solver: str) -> None:
    model = TinyCNN()
    for seed in range(3):  # the sign of an eigenvector is arbitrary: some of these runs must flip it
        batches = make_batches(2, 8, shape=(1, 6, 6), seed=seed)
        result = fit_upi_pca(model, batches, L2Ball(1.0), objective=SMOOTH_OBJECTIVE, solver=solver, seed=seed)
        plus, minus = mean_objective(model, batches, SMOOTH_OBJECTIVE, [result.delta, -result.delta], seed=seed)
        assert plus > minus
        assert sorted([result.info["objective_plus"], result.info["objective_minus"]]) == pytest.approx([minus, plus])


def test_reduce_hook_two_ranks_equal_one_process() -> None:
    model = TinyCNN()
    batches = make_batches(3, 8, shape=(1, 6, 6), low=0.1, high=0.9)
    shards = split_batches(batches)
    # the smoothing noise is keyed by sample, so both ranks together see the noise of the single process
    SMOOTH_OBJECTIVE.network(model)  # build the surrogate before the rank threads: fx tracing patches Module.__call__
    for solver in ("power", "svd"):
        kwargs = {"objective": SMOOTH_OBJECTIVE, "solver": solver}
        ranks = run_ranks(
            lambda rank, reduce, kw=kwargs: fit_upi_pca(model, shards[rank], L2Ball(1.0), reduce=reduce, **kw)
        )
        assert torch.equal(ranks[0].delta, ranks[1].delta)
        alone = fit_upi_pca(model, batches, L2Ball(1.0), **kwargs)
        torch.testing.assert_close(ranks[0].delta, alone.delta, atol=1e-5, rtol=0)
        rows = torch.cat([gradient_matrix(model, shard, SMOOTH_OBJECTIVE) for shard in shards]).double()
        top = torch.linalg.svd(rows, full_matrices=False).Vh[0]
        assert abs_cosine(ranks[0].delta, top) > 0.99
        alone = fit_upi_pca(model, shards[0], L2Ball(1.0), **kwargs)
        assert abs_cosine(alone.delta, top) < 0.99


def test_bad_settings_are_refused() -> None:
    batches = make_batches(1, 4)
    objective = UPIObjective(sigma=0.1)
    message = r"needs about 160\.0 KiB \(five 64 x 64 float64 arrays\), more than max_bytes=1\.0 KiB; use solver="
    with pytest.raises(UPIError, match=message):
        fit_upi_pca(QuadraticScore(), batches, L2Ball(0.1), objective=objective, solver="svd", max_bytes=1024)
    with pytest.raises(UPIError, match="solver"):
        fit_upi_pca(QuadraticScore(), batches, L2Ball(0.1), solver="lanczos")
    with pytest.raises(UPIError, match="sigma > 0"):
        fit_upi_pca(QuadraticScore(), batches, L2Ball(0.1), objective=UPIObjective())
    with pytest.raises(UPIError, match="one-shot"):
        fit_upi_pca(QuadraticScore(), iter(batches), L2Ball(0.1))


def test_default_objective_is_attack_py_s_and_zero_rows_warn() -> None:
    batches = make_batches(2, 4, shape=(1, 6, 6), low=0.1, high=0.9)
    fitted = fit_upi_pca(TinyCNN(), batches, L2Ball(0.5), n_iter=1)
    assert fitted.info["objective"] == UPIPCASettings().objective(SaliencySettings(), 100).settings()
    assert fitted.info["network"] == "softplus surrogate (beta=10)"
    relu = UPIObjective(sigma=0.05, surrogate_beta=None)
    with pytest.warns(UserWarning, match="upi_pca: the objective's gradient w.r.t. delta is exactly zero"):
        fit_upi_pca(TinyCNN(), batches, L2Ball(0.5), objective=relu, n_iter=1)


@pytest.mark.parametrize("solver", ["power", "svd"])
def test_cached_clean_maps_are_computed_once_and_change_nothing(solver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = TinyCNN()
    batches = make_batches(3, 8, shape=(1, 6, 6), low=0.1, high=0.9)
    objective = UPIObjective(k=5, sigma=0.05, surrogate_beta=5.0)
    sizes = count_clean_maps(objective, monkeypatch)
    fits = {}
    for cache in (True, False):
        sizes.clear()
        fits[cache] = fit_upi_pca(
            model,
            batches,
            L2Ball(1.0),
            objective=objective,
            solver=solver,
            n_iter=3,
            tol=0.0,
            cache_clean_maps=cache,
        )
        # clean maps: once (cached) or once per solver pass and for the sign choice
        assert sum(sizes) == (24 if cache else 24 * (fits[cache].info["passes"] + 1))
    torch.testing.assert_close(fits[True].delta, fits[False].delta)


def test_format_bytes_picks_a_readable_unit() -> None:
    assert format_bytes(512) == "0.5 KiB"
    assert format_bytes(72 * 2**20) == "72.0 MiB"
    assert format_bytes(1.5 * 2**30) == "1.50 GiB"
    assert svd_bytes(3072) == 5 * 8 * 3072**2
