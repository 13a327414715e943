"""The attack pipeline behind ``attack.py``: fit every method, evaluate it beside the baselines, report.

For each budget (norm, eps) the runner fits the requested universal perturbations on the
``attack_fit`` split (UPI-Grad, UPI-PCA, the classification UAP), draws the random baseline, runs the
per-sample attack, evaluates everything on the held-out ``attack_eval`` split (correctly classified
samples, maps of the original model), and writes into the output folder:

* ``perturbations/<method>_<norm>_eps<eps>.pt`` (:class:`~upi_lightning.perturbation.UniversalPerturbation`);
* ``figure_<norm>_eps<eps>.png``: clean images, their maps, the perturbed maps and the perturbations;
* ``tensorboard/``: every metric as a scalar (step = eps in thousandths, so curves run along eps) and
  the figures and perturbations as images;
* ``report.json`` and ``report.md``, written last.

Every file is written atomically, so an interrupted run leaves complete files or none.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from upi_lightning.attacks.baselines import fit_classification_uap, fit_per_sample_attack, random_universal
from upi_lightning.attacks.engine import Batches, Init, Reduce, Schedule, UPIFitResult, identity
from upi_lightning.attacks.evaluate import evaluate_draws, evaluate_perturbation
from upi_lightning.attacks.objective import Dissimilarity, UPIObjective
from upi_lightning.attacks.upi_grad import fit_upi_grad
from upi_lightning.attacks.upi_pca import fit_upi_pca
from upi_lightning.charts import line_chart
from upi_lightning.errors import UPIError
from upi_lightning.figures import perturbation_image, saliency_figure, save_png
from upi_lightning.io import atomic_write_json, atomic_write_text
from upi_lightning.model_modes import model_device
from upi_lightning.perturbation import Norm, apply_perturbation, check_eps, check_norm
from upi_lightning.saliency import SaliencyMethod, ScoreKind, common_noise, saliency_map

MethodName = Literal["upi_grad", "upi_pca", "random", "per_sample", "uap"]
ALL_METHODS: tuple[MethodName, ...] = ("upi_grad", "upi_pca", "random", "per_sample", "uap")
FITTED_METHODS: tuple[MethodName, ...] = ("upi_grad", "upi_pca", "uap")
"""The methods :func:`fit_method` fits (``random`` is drawn, ``per_sample`` is fitted per evaluated batch)."""
TABLE_METRICS = ("relative_l2", "topk_intersection", "spearman", "kendall", "com_shift", "flip_rate")


@dataclass
class Budget:
    """One perturbation budget: the ball ``||delta||_norm <= eps`` in pixel units."""

    norm: Norm = "l2"
    eps: float = 1.0

    def __post_init__(self) -> None:
        self.norm, self.eps = check_norm(self.norm), check_eps(self.eps)

    @property
    def tag(self) -> str:
        """File-name-safe label such as ``l2_eps1``."""
        return f"{self.norm}_eps{self.eps:g}"


@dataclass
class SaliencySettings:
    """The saliency maps under attack (and evaluated).

    Attributes:
        method: ``gradient``, ``grad_x_input``, ``integrated_gradients`` or ``smoothgrad``.
        score: ``logit`` or ``probability``: the class score whose gradient is the map.
        n_steps: integrated-gradients steps.
        n_samples: SmoothGrad noisy copies.
        sigma: SmoothGrad noise std (pixel units).
    """

    method: SaliencyMethod = "gradient"
    score: ScoreKind = "logit"
    n_steps: int = 16
    n_samples: int = 16
    sigma: float = 0.15

    def method_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~upi_lightning.saliency.attribution` that ``method`` uses."""
        if self.method == "integrated_gradients":
            return {"n_steps": self.n_steps}
        if self.method == "smoothgrad":
            return {"n_samples": self.n_samples, "sigma": self.sigma}
        return {}


@dataclass
class ObjectiveSettings:
    """How a UPI objective is differentiated (see :class:`~upi_lightning.attacks.objective.UPIObjective`).

    Attributes:
        dissimilarity: ``l2``, ``topk_mass`` or ``cosine``.
        surrogate_beta: differentiate a softplus(beta) copy of a ReLU model; ``null`` = the model itself.
        sigma: Gaussian smoothing of the objective (pixel units), 0 = off.
        n_noise: smoothing draws per sample.
        keep_prediction: weight of the "keep the prediction" cross-entropy penalty.
    """

    dissimilarity: Dissimilarity = "l2"
    surrogate_beta: float | None = 10.0
    sigma: float = 0.0
    n_noise: int = 1
    keep_prediction: float = 0.0

    def objective(self, saliency: SaliencySettings, k: int) -> UPIObjective:
        """The objective for these settings and the attacked saliency maps."""
        return UPIObjective(
            method=saliency.method,
            method_kwargs=saliency.method_kwargs(),
            score=saliency.score,
            dissimilarity=self.dissimilarity,
            k=k,
            sigma=self.sigma,
            n_noise=self.n_noise,
            surrogate_beta=self.surrogate_beta,
            keep_prediction=self.keep_prediction,
        )


@dataclass
class UPIGradSettings(ObjectiveSettings):
    """UPI-Grad: projected stochastic gradient ascent (also the objective of the per-sample attack).

    Attributes:
        epochs: passes over the fit samples.
        step_size: base step in pixel units, the same for every budget (``null``: see ``step_scale``).
        step_scale: with ``step_size: null``, the base step as a multiple of each budget's eps
            (``null``: eps/4 for L2, eps/10 for Linf). On the MNIST CNN ``step_scale: 1.0`` with 10
            epochs beat the 2-epoch default at L2 eps 3 and Linf (relative L2 1.36x / 1.10x random
            instead of 1.30x / 1.04x), and tied it at L2 eps 0.5 and 1.
        schedule: ``constant``, ``cosine`` or ``step``.
        cache_clean_maps: compute each fit sample's clean map once, not at every epoch (``H * W`` floats
            per fit sample; same result).
    """

    epochs: int = 2
    step_size: float | None = None
    step_scale: float | None = None
    schedule: Schedule = "cosine"
    cache_clean_maps: bool = True

    def __post_init__(self) -> None:
        if self.step_scale is not None and not self.step_scale > 0:
            raise UPIError(f"step_scale must be > 0 (or null), got {self.step_scale}.")

    def base_step(self, eps: float) -> float | None:
        """The base step for a budget of radius ``eps`` (``None``: the fit's eps-dependent default)."""
        if self.step_size is not None or self.step_scale is None:
            return self.step_size
        return self.step_scale * eps


@dataclass
class UPIPCASettings(ObjectiveSettings):
    """UPI-PCA: top singular vector of the per-sample gradients of the objective.

    Attributes:
        solver: ``power`` (streaming, memory O(d)) or ``svd`` (exact, holds a d x d matrix).
        n_iter: passes of the streaming solver.
        cache_clean_maps: compute each fit sample's clean map once for all passes (``H * W`` floats per
            fit sample, so the streaming solver's memory then grows with the fit set; same result).
    """

    sigma: float = 0.1
    solver: Literal["power", "svd"] = "power"
    n_iter: int = 20
    cache_clean_maps: bool = False


@dataclass
class BaselineSettings:
    """Baselines shown beside every UPI.

    Attributes:
        random_draws: random universal perturbations of the same norm (mean and std reported).
        per_sample_steps: ascent steps of the per-sample attack (the upper bound).
        uap_epochs: passes of the classification UAP (clamped cross-entropy).
        uap_clamp: cap of the clamped cross-entropy.
    """

    random_draws: int = 5
    per_sample_steps: int = 20
    uap_epochs: int = 2
    uap_clamp: float = 10.0


@dataclass
class AttackSettings:
    """Everything an attack run does.

    Attributes:
        budgets: the (norm, eps) balls to attack in, e.g. ``[{norm: l2, eps: 1.0}, {norm: linf, eps: 0.1}]``.
        methods: which of ``upi_grad``, ``upi_pca``, ``random``, ``per_sample``, ``uap`` to run.
        saliency: the saliency maps under attack.
        upi_grad: UPI-Grad settings (its objective is also the per-sample attack's).
        upi_pca: UPI-PCA settings.
        baselines: baseline settings.
        fit_split: the data module split to fit on: ``attack_fit`` (half of the test set, default) or
            ``train`` (the training split, for fits larger than the test set allows).
        fit_samples: samples of the fit split used to fit (``null`` = all).
        eval_samples: held-out samples evaluated (``null`` = all of attack_eval).
        batch_size: batch size of fitting and evaluation.
        k: top-k size of the top-k metrics.
        figure_images: images shown in each figure.
        seed: seeds every random choice (the same seed gives the same perturbations).
    """

    budgets: list[Budget] = field(default_factory=lambda: [Budget("l2", 1.0)])
    methods: list[MethodName] = field(default_factory=lambda: list(ALL_METHODS))
    saliency: SaliencySettings = field(default_factory=SaliencySettings)
    upi_grad: UPIGradSettings = field(default_factory=UPIGradSettings)
    upi_pca: UPIPCASettings = field(default_factory=UPIPCASettings)
    baselines: BaselineSettings = field(default_factory=BaselineSettings)
    fit_split: Literal["attack_fit", "train"] = "attack_fit"
    fit_samples: int | None = 5000
    eval_samples: int | None = 5000
    batch_size: int = 128
    k: int = 100
    figure_images: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown or not self.methods:
            raise UPIError(f"Unknown or no attack methods {unknown or self.methods}: choose from {list(ALL_METHODS)}.")
        if not self.budgets:
            raise UPIError("No budget to attack in: give at least one {norm, eps}.")


def first_samples(dataset: Dataset[Any], count: int | None) -> Dataset[Any]:
    """The first ``count`` samples of ``dataset`` (all when ``None`` or larger)."""
    size = len(dataset)  # type: ignore[arg-type]
    if count is not None and count < 1:
        raise UPIError(f"sample counts must be >= 1 (or null for all), got {count}.")
    return dataset if count is None or count >= size else Subset(dataset, range(count))


def attack_loaders(datamodule: LightningDataModule, settings: AttackSettings) -> tuple[DataLoader, DataLoader]:
    """Shuffled fit loader (seeded) over ``settings.fit_split`` and ordered held-out loader over attack_eval."""
    datamodule.setup("test")
    splits = getattr(datamodule, "splits", {})
    if "attack_fit" not in splits:
        raise UPIError(f"{type(datamodule).__name__} has no attack_fit/attack_eval splits; use an ImageDataModule.")
    fit = first_samples(splits[settings.fit_split], settings.fit_samples)
    held_out = first_samples(splits["attack_eval"], settings.eval_samples)
    generator = torch.Generator().manual_seed(settings.seed)
    return (
        DataLoader(fit, batch_size=settings.batch_size, shuffle=True, generator=generator),
        DataLoader(held_out, batch_size=settings.batch_size),
    )


def fit_method(
    method: MethodName,
    model: nn.Module,
    batches: Batches,
    budget: Budget,
    settings: AttackSettings,
    *,
    progress: bool = False,
    reduce: Reduce = identity,
    init: Init | Tensor = "random",
) -> UPIFitResult:
    """Fit one universal method (``upi_grad``, ``upi_pca`` or ``uap``) in ``budget``.

    ``reduce`` sums the per-process contributions under DDP (identity on one process); ``init`` warm-starts
    UPI-Grad and the UAP from a previous perturbation.
    """
    common = {"norm": budget.norm, "eps": budget.eps, "seed": settings.seed, "progress": progress, "reduce": reduce}
    if method == "upi_grad":
        grad = settings.upi_grad
        return fit_upi_grad(
            model,
            batches,
            objective=grad.objective(settings.saliency, settings.k),
            epochs=grad.epochs,
            step_size=grad.base_step(budget.eps),
            schedule=grad.schedule,
            init=init,
            cache_clean_maps=grad.cache_clean_maps,
            **common,
        )
    if method == "upi_pca":
        pca = settings.upi_pca
        return fit_upi_pca(
            model,
            batches,
            objective=pca.objective(settings.saliency, settings.k),
            solver=pca.solver,
            n_iter=pca.n_iter,
            cache_clean_maps=pca.cache_clean_maps,
            **common,
        )
    if method == "uap":
        base = settings.baselines
        return fit_classification_uap(model, batches, epochs=base.uap_epochs, clamp=base.uap_clamp, init=init, **common)
    raise UPIError(f"{method!r} is not a fitted universal method: use one of {list(FITTED_METHODS)}.")


def per_sample_deltas(model: nn.Module, budget: Budget, settings: AttackSettings) -> Callable[[Tensor, Tensor], Tensor]:
    """``fn(x, y)`` running the per-sample attack (same objective as UPI-Grad) on a batch."""
    objective = settings.upi_grad.objective(settings.saliency, settings.k)

    def attack(x: Tensor, y: Tensor) -> Tensor:
        return fit_per_sample_attack(
            model,
            x,
            y,
            norm=budget.norm,
            eps=budget.eps,
            objective=objective,
            steps=settings.baselines.per_sample_steps,
            seed=settings.seed,
        )

    return attack


def figure_batch(model: nn.Module, loader: DataLoader, count: int) -> tuple[Tensor, Tensor]:
    """The first ``count`` correctly classified held-out samples (for figures)."""
    device = model_device(model)
    images, labels = [], []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        images.append(x[correct])
        labels.append(y[correct])
        if sum(len(i) for i in images) >= count:
            break
    return torch.cat(images)[:count], torch.cat(labels)[:count]


@dataclass(frozen=True)
class Processes:
    """Where this process stands in a multi-process attack (one process: the defaults).

    Attributes:
        rank: this process's global rank.
        world_size: number of processes.
        reduce: sums a tensor over the processes (``fabric.all_reduce(t, reduce_op="sum")``).
    """

    rank: int = 0
    world_size: int = 1
    reduce: Reduce = identity

    @property
    def is_main(self) -> bool:
        """Whether this process writes the files (rank 0)."""
        return self.rank == 0


class ShardedBatches:
    """This process's part of every global batch of ``loader``: rows ``rank, rank + W, ...`` (``W`` processes).

    Every process iterates the same global batches (same order, same seed), so the processes together
    see each global batch exactly once per pass, and a sum over processes of per-batch sums equals the
    single-process sum. A last global batch of fewer than ``W`` samples is skipped (it cannot give every
    process a sample).

    Raises:
        UPIError: if the loader's batch size is smaller than ``W``.
    """

    def __init__(self, loader: DataLoader, rank: int, world_size: int) -> None:
        batch_size = loader.batch_size or 1
        if batch_size < world_size:
            raise UPIError(
                f"batch_size={batch_size} is the global batch, split over {world_size} processes; "
                f"use batch_size >= {world_size}."
            )
        self.loader, self.rank, self.world_size = loader, rank, world_size
        samples = len(loader.dataset)  # type: ignore[arg-type]
        self.length = samples // batch_size + (samples % batch_size >= world_size)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.loader:
            if len(x) >= self.world_size:
                yield x[self.rank :: self.world_size], y[self.rank :: self.world_size]


class AttackRun:
    """One attack run writing into ``output``: see the module docstring.

    Args:
        model: the classifier to attack (pixel-space input, logits out); moved to nothing, used as is.
        datamodule: an :class:`~upi_lightning.data.ImageDataModule` (its attack splits are used).
        settings: the attack settings.
        output: output folder (created).
        description: provenance stored in the report and in every perturbation file (model, checkpoint...).
        progress: show progress bars.
        processes: the multi-process context (default: one process). Each process fits and evaluates
            on its :class:`ShardedBatches`; fits all-reduce through ``processes.reduce`` and the
            torchmetrics metrics sync when computed, so every process gets the single-process numbers;
            rank 0 alone writes files and prints.
        eval_models: other classifiers of the same data, by name, on which every universal perturbation
            (and the random draws) is evaluated too: the report's ``transfer`` rows.
    """

    def __init__(
        self,
        model: nn.Module,
        datamodule: LightningDataModule,
        settings: AttackSettings,
        output: str | Path,
        description: dict[str, Any] | None = None,
        progress: bool = True,
        processes: Processes | None = None,
        eval_models: dict[str, nn.Module] | None = None,
    ) -> None:
        self.model, self.datamodule, self.settings = model, datamodule, settings
        self.eval_models = eval_models or {}
        self.output = Path(output)
        self.description = description or {}
        self.processes = processes or Processes()
        self.progress = progress and self.processes.is_main
        self.image_shape: tuple[int, ...] = ()  # set by run() from the data
        self.fit_shuffling: torch.Generator | None = None  # the fit loader's, set by run()

    def shard(self, loader: DataLoader) -> DataLoader | ShardedBatches:
        """``loader`` itself on one process, else this process's :class:`ShardedBatches` of it."""
        processes = self.processes
        return loader if processes.world_size == 1 else ShardedBatches(loader, processes.rank, processes.world_size)

    def run(self) -> dict[str, Any]:
        """Fit, evaluate and write everything; return the report (also in ``report.json``)."""
        settings = self.settings
        fit_loader, eval_loader = attack_loaders(self.datamodule, settings)
        saliency = {
            "method": settings.saliency.method,
            "method_kwargs": settings.saliency.method_kwargs(),
            "score": settings.saliency.score,
            "k": settings.k,
        }
        self.image_shape = tuple(fit_loader.dataset[0][0].shape)
        self.fit_shuffling = fit_loader.generator
        main = self.processes.is_main
        if main:
            images, labels = figure_batch(self.model, eval_loader, settings.figure_images)
        fit_batches, eval_batches = self.shard(fit_loader), self.shard(eval_loader)
        results: list[dict[str, Any]] = []
        transfer: list[dict[str, Any]] = []
        started = time.perf_counter()
        with SummaryWriter(str(self.output / "tensorboard")) if main else nullcontext() as writer:
            for budget in settings.budgets:
                budget_results, deltas = self.attack_budget(budget, fit_batches, eval_batches, saliency)
                results.extend(budget_results)
                transfer.extend(self.transfer_budget(budget, deltas, eval_batches, saliency))
                if not main:
                    continue
                self.write_figure(budget, images, labels, deltas, writer, saliency)
                for row in budget_results:
                    for metric, value in row["metrics"].items():
                        step = round(budget.eps * 1000)
                        writer.add_scalar(f"{budget.norm}/{metric}/{row['method']}", value, global_step=step)
            if main:
                self.write_sweeps(results, writer)
        report = {
            "complete": True,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_description(model_device(self.model), self.processes.world_size),
            "seconds": time.perf_counter() - started,
            "description": self.description,
            "settings": asdict(settings),
            "fit_samples": len(fit_loader.dataset),  # type: ignore[arg-type]
            "eval_samples": len(eval_loader.dataset),  # type: ignore[arg-type]
            "results": results,
            "transfer": transfer,
        }
        if main:
            atomic_write_json(self.output / "report.json", report)
            atomic_write_text(self.output / "report.md", markdown_report(report))
        return report

    def attack_budget(
        self, budget: Budget, fit_loader: Batches, eval_loader: Batches, saliency: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
        """Run every method in one budget; return the result rows and the universal deltas by method."""
        rows: list[dict[str, Any]] = []
        deltas: dict[str, Tensor] = {}
        evaluate = {**saliency, "progress": self.progress}
        for method in self.settings.methods:
            started = time.perf_counter()
            if method == "random":
                draws = self.random_draws(budget)
                metrics = evaluate_draws(self.model, eval_loader, draws, **evaluate)
                deltas[method] = draws[0]
                fit_seconds = 0.0
            elif method == "per_sample":
                metrics = evaluate_perturbation(
                    self.model, eval_loader, per_sample_deltas(self.model, budget, self.settings), **evaluate
                )
                fit_seconds = time.perf_counter() - started
            else:
                if self.fit_shuffling is not None:  # every fit sees the same shuffles, whatever ran before it
                    self.fit_shuffling.manual_seed(self.settings.seed)
                fitted = fit_method(
                    method,
                    self.model,
                    fit_loader,
                    budget,
                    self.settings,
                    progress=self.progress,
                    reduce=self.processes.reduce,
                )
                fit_seconds = fitted.seconds
                deltas[method] = fitted.delta.cpu()
                if self.processes.is_main:
                    path = self.output / "perturbations" / f"{method}_{budget.tag}.pt"
                    fitted.to_perturbation(**self.description, saliency=saliency).save(path)
                metrics = evaluate_perturbation(self.model, eval_loader, fitted.delta, **evaluate)
            rows.append(
                {
                    "method": method,
                    "norm": budget.norm,
                    "eps": budget.eps,
                    "fit_seconds": fit_seconds,
                    "total_seconds": time.perf_counter() - started,
                    "metrics": metrics,
                }
            )
            if self.progress:
                print(
                    f"[{budget.tag}] {method:10s} relative_l2={metrics['relative_l2']:.4f} "
                    f"topk={metrics['topk_intersection']:.4f} flip={metrics['flip_rate']:.4f} "
                    f"({rows[-1]['total_seconds']:.1f}s)",
                    flush=True,
                )
        return rows, deltas

    def random_draws(self, budget: Budget) -> list[Tensor]:
        """The random baseline's draws in ``budget`` (seeded: the same at every call)."""
        count, seed = self.settings.baselines.random_draws, self.settings.seed
        return random_universal(self.image_shape, budget.norm, budget.eps, count, seed)

    def transfer_budget(
        self, budget: Budget, deltas: dict[str, Tensor], eval_loader: Batches, saliency: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Evaluate this budget's universal perturbations (random: every draw) on each of ``eval_models``."""
        rows = []
        evaluate = {**saliency, "progress": self.progress}
        for name, model in self.eval_models.items():
            for method, delta in deltas.items():
                if method == "random":
                    metrics = evaluate_draws(model, eval_loader, self.random_draws(budget), **evaluate)
                else:
                    metrics = evaluate_perturbation(model, eval_loader, delta, **evaluate)
                rows.append({"method": method, "norm": budget.norm, "eps": budget.eps, "eval_model": name})
                rows[-1]["metrics"] = metrics
        return rows

    def write_sweeps(self, results: list[dict[str, Any]], writer: SummaryWriter) -> None:
        """For each norm attacked at several eps: every table metric against eps, one curve per method.

        Written as ``sweep_<norm>.png`` (a grid of charts) and as the ``sweep/<norm>`` TensorBoard image.
        """
        for norm in dict.fromkeys(row["norm"] for row in results):
            rows = [row for row in results if row["norm"] == norm]
            if len({row["eps"] for row in rows}) < 2:
                continue
            charts = []
            for metric in TABLE_METRICS:
                series = {
                    method: [(row["eps"], row["metrics"][metric]) for row in rows if row["method"] == method]
                    for method in dict.fromkeys(row["method"] for row in rows)
                }
                charts.append(line_chart(series, f"{metric} ({norm})", "eps", metric))
            grid = make_grid(torch.stack(charts), nrow=3, padding=4, pad_value=1.0)
            save_png(grid, self.output / f"sweep_{norm}.png")
            writer.add_image(f"sweep/{norm}", grid)

    def write_figure(
        self,
        budget: Budget,
        images: Tensor,
        labels: Tensor,
        deltas: dict[str, Tensor],
        writer: SummaryWriter,
        saliency: dict[str, Any],
    ) -> None:
        """PNG and TensorBoard figure of the maps before and after each universal perturbation."""
        method = saliency["method"]
        kwargs = common_noise(images, labels, method, {"score": saliency["score"], **saliency["method_kwargs"]})
        clean = saliency_map(self.model, images, labels, method, **kwargs)
        perturbed = []
        for name, delta in deltas.items():
            moved = delta.to(images.device)
            maps = saliency_map(self.model, apply_perturbation(images, moved), labels, method, **kwargs)
            perturbed.append((name, maps, delta))
            writer.add_image(f"perturbation/{name}/{budget.tag}", perturbation_image(delta.cpu()))
        figure = saliency_figure(images.cpu(), clean.cpu(), [(n, m.cpu(), d) for n, m, d in perturbed])
        save_png(figure, self.output / f"figure_{budget.tag}.png")
        writer.add_image(f"figure/{budget.tag}", figure)


def machine_description(device: torch.device, processes: int = 1) -> str:
    """Where a result was measured, e.g. ``x86_64, 2 CPUs, torch 2.5.1, cpu`` (``, 2 processes`` if several)."""
    several = f", {processes} processes" if processes > 1 else ""
    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {device}{several}"


def markdown_report(report: dict[str, Any]) -> str:
    """The results as Markdown: one table per budget, random's mean ± std, each UPI's ratio to random."""
    lines = ["# UPI attack report", ""]
    description = report["description"]
    lines.append(
        f"Model: `{description.get('model', '?')}`; data: `{description.get('data', '?')}`; saliency: "
        f"`{report['settings']['saliency']['method']}` ({report['settings']['saliency']['score']}); "
        f"fit on {report['fit_samples']} samples, evaluated on {report['eval_samples']} held-out samples "
        f"(correctly classified ones); {report['created']}; {report['machine']}."
    )
    header = "| method | " + " | ".join(TABLE_METRICS) + " | relative_l2 / random | fit s |"
    budgets = dict.fromkeys((row["norm"], row["eps"]) for row in report["results"])
    for norm, eps in budgets:
        rows = [row for row in report["results"] if (row["norm"], row["eps"]) == (norm, eps)]
        random_l2 = next((r["metrics"]["relative_l2"] for r in rows if r["method"] == "random"), None)
        lines += ["", f"## {norm} eps = {eps:g}", "", header, "|" + " --- |" * (len(TABLE_METRICS) + 3)]
        for row in rows:
            metrics = row["metrics"]
            cells = []
            for name in TABLE_METRICS:
                std = metrics.get(f"{name}_std")
                cells.append(f"{metrics[name]:.4f}" + (f" ± {std:.4f}" if std is not None else ""))
            ratio = f"{metrics['relative_l2'] / random_l2:.2f}x" if random_l2 else "-"
            lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {ratio} | {row['fit_seconds']:.1f} |")
    lines += ["", "Per-sample time is the whole per-sample attack on the evaluated samples."]
    lines += sweep_tables(report["results"]) + transfer_tables(report.get("transfer", []))
    return "\n".join([*lines, ""])


def relative_to_random(rows: list[dict[str, Any]], row: dict[str, Any]) -> str:
    """``row``'s relative L2 and its ratio to random's among ``rows`` (same budget and model)."""
    random_l2 = next((r["metrics"]["relative_l2"] for r in rows if r["method"] == "random"), None)
    value = row["metrics"]["relative_l2"]
    return f"{value:.4f}" + (f" ({value / random_l2:.2f}x)" if random_l2 else "")


def method_table(rows: list[dict[str, Any]], column: str, values: list[Any], label: Callable[[Any], str]) -> list[str]:
    """Markdown table: a row per method, a column per value of ``row[column]``.

    Each cell is the relative L2 and its ratio to random's among the rows that share that value.
    """
    lines = ["| method | " + " | ".join(map(label, values)) + " |", "|" + " --- |" * (1 + len(values))]
    for method in dict.fromkeys(row["method"] for row in rows):
        cells = []
        for value in values:
            same = [row for row in rows if row[column] == value]
            cells += [relative_to_random(same, row) for row in same if row["method"] == method] or ["-"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def sweep_tables(results: list[dict[str, Any]]) -> list[str]:
    """Markdown: for each norm attacked at several eps, relative L2 (ratio to random) per method and eps."""
    lines: list[str] = []
    for norm in dict.fromkeys(row["norm"] for row in results):
        rows = [row for row in results if row["norm"] == norm]
        epsilons = list(dict.fromkeys(row["eps"] for row in rows))
        if len(epsilons) > 1:
            lines += ["", f"## Sweep over {norm} eps: relative L2 (ratio to random)", "", f"![sweep](sweep_{norm}.png)"]
            lines += ["", *method_table(rows, "eps", epsilons, lambda eps: f"eps {eps:g}")]
    return lines


def transfer_tables(transfer: list[dict[str, Any]]) -> list[str]:
    """Markdown: per budget, relative L2 (ratio to random on the same model) of each method on each eval model."""
    lines: list[str] = []
    models = list(dict.fromkeys(row["eval_model"] for row in transfer))
    for norm, eps in dict.fromkeys((row["norm"], row["eps"]) for row in transfer):
        rows = [row for row in transfer if (row["norm"], row["eps"]) == (norm, eps)]
        lines += ["", f"## Transfer, {norm} eps = {eps:g}: relative L2 on other models (ratio to random there)", ""]
        lines += method_table(rows, "eval_model", models, lambda model: f"`{model}`")
    return lines
