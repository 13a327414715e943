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

import time
from contextlib import nullcontext
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from upi_lightning.attacks.baselines import random_universal
from upi_lightning.attacks.engine import Batches
from upi_lightning.attacks.evaluate import evaluate_draws, evaluate_perturbation, maps_under_perturbations
from upi_lightning.attacks.methods import fit_method, per_sample_deltas
from upi_lightning.attacks.report import TABLE_METRICS, machine_description, markdown_report
from upi_lightning.attacks.settings import AttackSettings, Budget
from upi_lightning.charts import line_chart
from upi_lightning.distributed import Processes, ShardedBatches
from upi_lightning.errors import UPIError
from upi_lightning.figures import perturbation_image, saliency_figure, save_png
from upi_lightning.io import atomic_write_json, atomic_write_text
from upi_lightning.model_modes import model_device


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
        with torch.no_grad():
            correct = model(x).argmax(1) == y
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
                budget_results, deltas = self.attack_budget(budget, fit_batches, eval_batches)
                results.extend(budget_results)
                transfer.extend(self.transfer_budget(budget, deltas, eval_batches))
                if not main:
                    continue
                self.write_figure(budget, images, labels, deltas, writer)
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
        self, budget: Budget, fit_loader: Batches, eval_loader: Batches
    ) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
        """Run every method in one budget; return the result rows and the universal deltas by method."""
        rows: list[dict[str, Any]] = []
        deltas: dict[str, Tensor] = {}
        evaluate = self.evaluation_options()
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
                    saliency = asdict(self.settings.saliency)
                    fitted.to_perturbation(**self.description, saliency=saliency, k=self.settings.k).save(path)
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

    def evaluation_options(self) -> dict[str, Any]:
        """The keyword arguments of every evaluation of this run (maps, top-k size, progress bars)."""
        return {"saliency": self.settings.saliency, "k": self.settings.k, "progress": self.progress}

    def random_draws(self, budget: Budget) -> list[Tensor]:
        """The random baseline's draws in ``budget`` (seeded: the same at every call)."""
        count, seed = self.settings.baselines.random_draws, self.settings.seed
        return random_universal(self.image_shape, budget.threat, count, seed)

    def transfer_budget(self, budget: Budget, deltas: dict[str, Tensor], eval_loader: Batches) -> list[dict[str, Any]]:
        """Evaluate this budget's universal perturbations (random: every draw) on each of ``eval_models``."""
        rows = []
        evaluate = self.evaluation_options()
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
    ) -> None:
        """PNG and TensorBoard figure of the maps before and after each universal perturbation."""
        clean, perturbed = maps_under_perturbations(self.model, images, labels, deltas, self.settings.saliency)
        for name, delta in deltas.items():
            writer.add_image(f"perturbation/{name}/{budget.tag}", perturbation_image(delta.cpu()))
        rows = [(name, perturbed[name], delta) for name, delta in deltas.items()]
        figure = saliency_figure(images.cpu(), clean, rows)
        save_png(figure, self.output / f"figure_{budget.tag}.png")
        writer.add_image(f"figure/{budget.tag}", figure)
