"""Saliency-map throughput: one batched backward pass against a naive per-sample loop.

For each model, computes ``saliency_map(model, x, target, method, create_graph=...)`` on a batch of
``--batch-size`` random images at once, and one image at a time (on ``--loop-samples`` images, the
rate of a loop being the same for any number of images), and prints maps per second and the ratio
as a Markdown table. ``create_graph=True`` times building the differentiable map (what attacks and
regularized training pay before their own backward pass), not a second backward pass.

    python benchmarks/saliency_throughput.py                      # MNIST SmallCNN and CifarResNet18, 1 thread
    python benchmarks/saliency_throughput.py --threads 0          # all of torch's CPU threads
    python benchmarks/saliency_throughput.py --device cuda --method integrated_gradients

On a CPU the work is compute-bound, so batching mostly saves the per-call overhead; the large ratios
show on a GPU, where a one-image call is bound by kernel launches.
"""

from __future__ import annotations

import argparse

import torch
from harness import MODELS, add_run_arguments, benchmark_model, machine_line, median_seconds, set_threads, write_json
from torch import Tensor, nn

from upi_lightning.saliency import SALIENCY_METHODS, saliency_map


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--method", choices=SALIENCY_METHODS, default="gradient")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--loop-samples", type=int, default=8, help="images timed in the per-sample loop")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (median kept)")
    add_run_arguments(parser, threads=1)  # 1 thread keeps CPU timings stable on a shared machine
    return parser.parse_args()


def measure(
    model: nn.Module, x: Tensor, target: Tensor, args: argparse.Namespace, create_graph: bool
) -> tuple[float, float]:
    """Maps per second, batched and in a per-sample loop."""

    def batched() -> Tensor:
        return saliency_map(model, x, target, args.method, create_graph=create_graph)

    def loop() -> Tensor:
        return torch.cat(
            [
                saliency_map(model, x[i : i + 1], target[i : i + 1], args.method, create_graph=create_graph)
                for i in range(args.loop_samples)
            ]
        )

    batched_rate = len(x) / median_seconds(batched, args.repeats, x.device)
    loop_rate = args.loop_samples / median_seconds(loop, args.repeats, x.device)
    return batched_rate, loop_rate


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"saliency throughput: method={args.method}, batch={args.batch_size}, {machine_line(device)}\n")
    print("| model | input | create_graph | batched maps/s | per-sample loop maps/s | ratio |")
    print("|---|---|---|---:|---:|---:|")
    rows = []
    for name in args.models:
        model, shape = benchmark_model(name, device)
        model.eval()
        x = torch.rand(args.batch_size, *shape, device=device)
        target = torch.randint(0, 10, (args.batch_size,), device=device)
        for create_graph in (False, True):
            batched_rate, loop_rate = measure(model, x, target, args, create_graph)
            rows.append(
                {"model": name, "create_graph": create_graph, "batched_per_s": batched_rate, "loop_per_s": loop_rate}
                | {"ratio": batched_rate / loop_rate}
            )
            print(
                f"| {name} | {'x'.join(map(str, shape))} | {create_graph} | {batched_rate:,.1f} | "
                f"{loop_rate:,.1f} | {batched_rate / loop_rate:.1f}x |",
                flush=True,
            )
    payload = {"benchmark": "saliency_throughput", "method": args.method, "batch_size": args.batch_size}
    write_json(args.json, payload | {"machine": machine_line(device), "rows": rows})


if __name__ == "__main__":
    main()
