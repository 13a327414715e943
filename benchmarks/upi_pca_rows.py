"""UPI-PCA gradient rows: one batched call against a per-sample loop (issue 7 target: >= 20x).

For each model, computes the rows ``g_i`` of ``G`` with
``upi_lightning.attacks.upi_pca.per_sample_gradient_rows(model, x, y, objective, generator)`` on a batch
of ``--batch-size`` random ``[0, 1]`` images at once, and by calling the same function on one image
at a time (on ``--loop-samples`` images: a loop's rate is the same for any number of images), and
prints rows per second and their ratio as a Markdown table. It also times a plain training step on the
same batch and prints the cost of one row, batched and looped, in units of a training step's cost per
sample: a row needs a forward pass, a backward pass that builds the saliency graph and a backward pass
through it (about 3 training steps of arithmetic, issue 7), so a batched row near 3 units does no wasted
work, and the ratio can reach 20x only where the loop's row costs about 60 units: where the overhead
of each call, not its arithmetic, sets the loop's pace. The objective is the attack configs' UPI-PCA
objective: gradient maps of the logit, L2 dissimilarity, ``sigma=0.1``, one noise draw, softplus(10)
surrogate (``--beta 0`` differentiates the ReLU model itself). Untrained models.

    python benchmarks/upi_pca_rows.py                          # SmallCNN and CifarResNet18, 2 threads
    python benchmarks/upi_pca_rows.py --models small_cnn --loop-samples 128
    python benchmarks/upi_pca_rows.py --threads 0 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from harness import (
    MODELS,
    add_run_arguments,
    benchmark_model,
    machine_line,
    median_seconds,
    set_threads,
    train_step_fn,
    write_json,
)
from torch import Tensor

from upi_lightning.attacks.objective import UPIObjective
from upi_lightning.attacks.upi_pca import per_sample_gradient_rows
from upi_lightning.noise import make_generator

TARGET = 20.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--loop-samples", type=int, default=32, help="images timed in the per-sample loop (capped at the batch)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median kept)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    parser.add_argument("--sigma", type=float, default=0.1, help="smoothing noise std (pixel units), > 0")
    parser.add_argument("--beta", type=float, default=10.0, help="softplus surrogate beta; 0 = the ReLU model")
    add_run_arguments(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    objective = UPIObjective(sigma=args.sigma, surrogate_beta=args.beta or None)
    loop_samples = min(args.loop_samples, args.batch_size)
    print(
        f"UPI-PCA gradient rows: batch={args.batch_size}, loop over {loop_samples} images, sigma={args.sigma}, "
        f"surrogate beta={args.beta or 'none'}, {machine_line(device)}; untrained models, random images\n"
    )
    print(
        "| model | input (d) | batched rows/s | loop rows/s | ratio | training samples/s "
        "| batched row (training steps) | looped row (training steps) | target |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    for name in args.models:
        model, shape = benchmark_model(name, device)
        model.eval()
        x = torch.rand(args.batch_size, *shape, device=device)
        y = torch.randint(0, 10, (args.batch_size,), device=device)
        generator = make_generator(0, device)

        def batched() -> Tensor:
            return per_sample_gradient_rows(model, x, y, objective, generator)  # noqa: B023

        def loop() -> Tensor:
            return torch.cat(
                [
                    per_sample_gradient_rows(model, x[i : i + 1], y[i : i + 1], objective, generator)  # noqa: B023
                    for i in range(loop_samples)
                ]
            )

        batched_rate = len(x) / median_seconds(batched, args.repeats, device, args.warmup)
        loop_rate = loop_samples / median_seconds(loop, args.repeats, device, args.warmup)
        train = train_step_fn(copy.deepcopy(model), x, y)
        train_rate = len(x) / statistics.median([train() for _ in range(args.warmup + args.repeats)][args.warmup :])
        ratio = batched_rate / loop_rate
        d = x[0].numel()
        rows.append({"model": name, "batched_rows_per_s": batched_rate, "loop_rows_per_s": loop_rate, "ratio": ratio})
        print(
            f"| {name} | {'x'.join(map(str, shape))} ({d}) | {batched_rate:,.1f} | {loop_rate:,.1f} | "
            f"{ratio:.1f}x | {train_rate:,.1f} | {train_rate / batched_rate:.1f} | {train_rate / loop_rate:.1f} | "
            f">= {TARGET:g}x: {'met' if ratio >= TARGET else 'not met'} |",
            flush=True,
        )
    write_json(args.json, {"benchmark": "upi_pca_rows", "machine": machine_line(device), "rows": rows})


if __name__ == "__main__":
    main()
