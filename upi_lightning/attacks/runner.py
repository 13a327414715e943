"""The attack pipeline behind ``attack.py``: fit every method, evaluate it beside the baselines, report.

For each budget (norm, eps) the runner fits the requested universal perturbations on the
``attack_fit`` split (UPI-Grad, UPI-PCA, the classification UAP), draws the random baseline, runs the
per-sample attack, evaluates everything on the held-out ``attack_eval`` split (correctly classified
samples, maps of the original model), and writes into the output folder:

* ``run.json`` first: the run's identity (:class:`~upi_lightning.attacks.run_folder.RunFolder`);
* ``perturbations/<method>_<norm>_eps<eps>.pt`` (:class:`~upi_lightning.perturbation.UniversalPerturbation`)
  and ``results/<method>_<norm>_eps<eps>.json`` (its result and transfer rows), as each method completes;
* at the end, from every saved result: ``figure_<saliency>_<norm>_eps<eps>.png`` and ``.pdf`` (clean
  images, their maps, the perturbed maps and the perturbations), the sweeps
  (:mod:`~upi_lightning.attacks.visuals`), ``tensorboard/`` (the stability metrics at the eps index of
  each norm, one chart per metric overlaying the methods, and the figures and perturbations as
  images), then ``report.json`` and ``report.md``.

Every file is written atomically, so an interrupted run leaves complete files or none; rerunning it
into the same folder skips the saved results and gives the report of an uninterrupted run. Every random
choice is seeded per fit, draw or evaluated batch, so a result does not depend on what ran before it.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.tensorboard import SummaryWriter

from upi_lightning.attacks.baselines import random_universal
from upi_lightning.attacks.engine import Batches, UPIFitResult
from upi_lightning.attacks.evaluate import (
    PerSampleDeltas,
    evaluate_draws,
    evaluate_perturbation,
    maps_under_perturbations,
)
from upi_lightning.attacks.methods import fit_method, per_sample_deltas
from upi_lightning.attacks.report import machine_description, markdown_report
from upi_lightning.attacks.run_folder import RunFolder, figure_name
from upi_lightning.attacks.settings import AttackSettings, Budget, MethodName, maps_name
from upi_lightning.attacks.visuals import log_metrics, write_sweeps
from upi_lightning.distributed import Processes, ShardedBatches
from upi_lightning.errors import UPIError
from upi_lightning.eta import TimeLeft
from upi_lightning.io import atomic_write_json, atomic_write_text
from upi_lightning.model_modes import evaluation_mode, model_device, model_logits
from upi_lightning.perturbation import UniversalPerturbation
from upi_lightning.plots import (
    budget_label,
    budget_title,
    figure_image,
    perturbation_figure,
    saliency_figure,
    save_figure,
)

Perturbation = Tensor | PerSampleDeltas | list[Tensor]
"""What a method evaluates: a universal delta, per-sample deltas of each batch, or random draws."""


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


def figure_batch(model: nn.Module, loader: Batches, count: int) -> tuple[Tensor, Tensor]:
    """The first ``count`` correctly classified held-out samples (for figures)."""
    device = model_device(model)
    images, labels = [], []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.no_grad(), evaluation_mode(model):  # a train-mode model's batch norm statistics stay
            correct = model_logits(model, x).argmax(1) == y
        images.append(x[correct])
        labels.append(y[correct])
        if sum(len(i) for i in images) >= count:
            break
    return torch.cat(images)[:count], torch.cat(labels)[:count]


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
        identity: what the run's numbers depend on, the ``run.json`` of :class:`RunFolder` (default: the
            description, the settings and the names of ``eval_models``): a rerun with the same identity
            resumes the run, another one is refused.
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
        identity: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.datamodule, self.settings = model, datamodule, settings
        self.eval_models = eval_models or {}
        self.output = Path(output)
        self.description = description or {}
        if identity is None:
            identity = {"description": self.description, "settings": asdict(settings), "eval": [*self.eval_models]}
        self.folder = RunFolder(self.output, identity)
        self.processes = processes or Processes()
        self.progress = progress and self.processes.is_main
        self.image_shape: tuple[int, ...] = ()  # set by run() from the data
        self.fit_shuffling: torch.Generator | None = None  # the fit loader's, set by run()

    def shard(self, loader: DataLoader) -> DataLoader | ShardedBatches:
        """``loader`` itself on one process, else this process's :class:`ShardedBatches` of it."""
        processes = self.processes
        return loader if processes.world_size == 1 else ShardedBatches(loader, processes.rank, processes.world_size)

    def run(self) -> dict[str, Any]:
        """Fit and evaluate what the folder does not hold yet, write everything; return the report.

        The report (also in ``report.json``) lists every (budget, method), in the order of the settings,
        whether computed now or read from ``results/``.
        """
        settings = self.settings
        fit_loader, eval_loader = attack_loaders(self.datamodule, settings)
        if len(figure_batch(self.model, eval_loader, 1)[0]) == 0:  # before any fit: nothing could be evaluated
            raise UPIError(
                f"the model classifies none of the {len(eval_loader.dataset)} held-out samples correctly, so "  # type: ignore[arg-type]
                "no map can be evaluated: check that the model fits the data (a head of other classes, e.g. "
                "pretrained and not fine-tuned; labels of another dataset), or give more --attack.eval_samples."
            )
        self.image_shape = tuple(fit_loader.dataset[0][0].shape)
        self.fit_shuffling = fit_loader.generator
        main = self.processes.is_main
        if main:
            self.folder.claim()
        fit_batches, eval_batches = self.shard(fit_loader), self.shard(eval_loader)
        started = time.perf_counter()
        self.time_left = TimeLeft(len(settings.budgets) * len(settings.methods))  # printed after each result
        records = [
            self.result(budget, method, fit_batches, eval_batches)
            for budget in settings.budgets
            for method in settings.methods
        ]
        results = [record["result"] for record in records]
        transfer = [row for record in records for row in record["transfer"]]
        if main:
            self.write_figures_and_tensorboard(results, *figure_batch(self.model, eval_loader, settings.figure_images))
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

    def result(self, budget: Budget, method: MethodName, fit_loader: Batches, eval_loader: Batches) -> dict[str, Any]:
        """``method``'s record in ``budget`` (``{"result": row, "transfer": rows}``): saved earlier, else computed.

        Every process reads the folder; they must agree (an output folder all of them share) since the
        processes that compute take part in collectives together.

        Raises:
            UPIError: if some processes find the result saved and others do not.
        """
        saved = self.folder.saved(method, budget)
        computed = saved is None
        found = self.processes.reduce(torch.tensor(float(saved is not None), device=model_device(self.model)))
        if 0 < found.item() < self.processes.world_size:
            raise UPIError(
                f"only some processes find {self.folder.result_path(method, budget)}: a resumed multi-process "
                "run needs an --output folder every process shares."
            )
        if saved is None:
            saved = self.attack(budget, method, fit_loader, eval_loader)
            if self.processes.is_main:
                self.folder.save(method, budget, saved)
        elif self.progress:
            print(f"[{budget.tag}] {method:10s} done before: {self.folder.result_path(method, budget)}", flush=True)
        if self.progress:
            print(f"[{budget.tag}] {method:10s} {self.time_left.step(computed)}", flush=True)
        return saved

    def attack(self, budget: Budget, method: MethodName, fit_loader: Batches, eval_loader: Batches) -> dict[str, Any]:
        """Fit or draw ``method`` in ``budget``, evaluate it on the model and on every ``eval_models``; its record."""
        started = time.perf_counter()
        fit_seconds = 0.0
        if method == "per_sample":
            perturbation: Perturbation = per_sample_deltas(self.model, budget, self.settings)
        elif method == "random":
            perturbation = self.random_draws(budget)
        else:
            fitted = self.fit(budget, method, fit_loader)
            perturbation, fit_seconds = fitted.delta, fitted.seconds
        metrics = self.evaluate(self.model, perturbation, eval_loader)
        if method == "per_sample":  # its fit is the whole per-sample attack of the evaluated samples
            fit_seconds = time.perf_counter() - started
        row = {
            "method": method,
            "norm": budget.norm,
            "eps": budget.eps,
            "fit_seconds": fit_seconds,
            "total_seconds": time.perf_counter() - started,
            "metrics": metrics,
        }
        if self.progress:
            print(
                f"[{budget.tag}] {method:10s} relative_l2={metrics['relative_l2']:.4f} "
                f"topk={metrics['topk_intersection']:.4f} flip={metrics['flip_rate']:.4f} "
                f"({row['total_seconds']:.1f}s)",
                flush=True,
            )
        # per-sample perturbations are made for the attacked model's batches: they have no transfer rows
        eval_models = {} if method == "per_sample" else self.eval_models
        transfer = [
            {"method": method, "norm": budget.norm, "eps": budget.eps, "eval_model": name}
            | {"metrics": self.evaluate(model, perturbation, eval_loader)}
            for name, model in eval_models.items()
        ]
        return {"result": row, "transfer": transfer}

    def fit(self, budget: Budget, method: MethodName, fit_loader: Batches) -> UPIFitResult:
        """Fit the universal ``method`` in ``budget`` and save its perturbation file (rank 0)."""
        if self.fit_shuffling is not None:  # every fit sees the same shuffles, whatever ran before it
            self.fit_shuffling.manual_seed(self.settings.seed)
        fitted = fit_method(
            method, self.model, fit_loader, budget, self.settings, progress=self.progress, reduce=self.processes.reduce
        )
        if self.processes.is_main:
            saliency = asdict(self.settings.saliency)
            perturbation = fitted.to_perturbation(**self.description, saliency=saliency, k=self.settings.k)
            perturbation.save(self.folder.perturbation_path(method, budget))
        return fitted

    def evaluate(self, model: nn.Module, perturbation: Perturbation, eval_loader: Batches) -> dict[str, float]:
        """Metrics of a perturbation (a delta, per-sample deltas, or random draws summarized) on ``model``."""
        options: dict[str, Any] = {
            "saliency": self.settings.evaluation_maps(),
            "k": self.settings.k,
            "progress": self.progress,
            "target": self.settings.target,
        }
        if isinstance(perturbation, list):
            return evaluate_draws(model, eval_loader, perturbation, **options)
        return evaluate_perturbation(model, eval_loader, perturbation, **options)

    def random_draws(self, budget: Budget) -> list[Tensor]:
        """The random baseline's draws in ``budget`` (seeded: the same at every call)."""
        count, seed = self.settings.baselines.random_draws, self.settings.seed
        return random_universal(self.image_shape, budget.threat, count, seed)

    def universal_deltas(self, budget: Budget) -> dict[str, Tensor]:
        """This budget's universal perturbations by method: the saved files, random's first draw."""
        return {
            method: self.random_draws(budget)[0]
            if method == "random"
            else UniversalPerturbation.load(self.folder.perturbation_path(method, budget), self.image_shape).delta
            for method in self.settings.methods
            if method != "per_sample"
        }

    def write_figures_and_tensorboard(self, results: list[dict[str, Any]], images: Tensor, labels: Tensor) -> None:
        """Figures, sweeps and TensorBoard of the whole run, from its rows and saved perturbations (rank 0).

        ``tensorboard/`` is emptied first, so a resumed run logs one point per tag and step, like a run
        that was never interrupted.
        """
        model, saliency = str(self.description.get("model", "model")), maps_name(asdict(self.settings))
        with SummaryWriter(str(self.folder.fresh_tensorboard())) as writer:
            for budget in self.settings.budgets:
                self.write_figure(budget, images, labels, self.universal_deltas(budget), writer)
            log_metrics(writer, results)
            write_sweeps(writer, self.output, results, model, saliency)

    def write_figure(
        self,
        budget: Budget,
        images: Tensor,
        labels: Tensor,
        deltas: dict[str, Tensor],
        writer: SummaryWriter,
    ) -> None:
        """PNG, PDF and TensorBoard figure of the maps before and after each universal perturbation."""
        maps = self.settings.evaluation_maps()
        clean, perturbed = maps_under_perturbations(self.model, images, labels, deltas, maps)
        model, saliency = str(self.description.get("model", "model")), maps_name(asdict(self.settings))
        for name, delta in deltas.items():
            figure = perturbation_figure(delta.cpu(), f"{name} · {budget_label(budget.norm, budget.eps)}")
            writer.add_image(f"perturbation/{name}/{budget.tag}", figure_image(figure))
        rows = [(name, perturbed[name], delta) for name, delta in deltas.items()]
        figure = saliency_figure(images.cpu(), clean, rows, budget_title(model, saliency, budget.norm, budget.eps))
        save_figure(figure, self.output / figure_name(saliency, budget))
        writer.add_image(f"figure/{budget.tag}", figure_image(figure))
