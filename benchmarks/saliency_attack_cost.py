"""The UPI-Grad step on IG and SmoothGrad maps against the step on gradient maps (issue 18 target: <= 1.2 x points).

An IG map of ``n_steps`` path points or a SmoothGrad map of ``n_samples`` noisy copies stacks that many
images into the batch of its one forward and backward pass, so its attack step should cost at most
``1.2 x n_steps`` (resp. ``n_samples``) gradient-map steps. For each model, on one batch of
``--batch-size`` random ``[0, 1]`` images with random labels, times the second step of a 2-step
``fit_upi_grad`` (clean maps cached or recomputed, ReLU model; ``upi_step_cost.upi_step_fn``) for each
saliency method, in turn (round-robin) ``--repeats`` times after ``--warmup`` rounds, and prints the
median seconds, the multiple of the gradient-map step, the number of points and ``multiple / points``.
IG and SmoothGrad run on the whole batch at once (chunk ``all``: a stack of ``points x batch`` images)
and by chunks of ``--chunk-size`` samples (``fit_upi_grad(chunk_size=...)``, the same step); the
gradient step, the reference, always runs on the whole batch.

    python benchmarks/saliency_attack_cost.py                       # small CNN, n_steps = n_samples = 16
    python benchmarks/saliency_attack_cost.py --models cifar_resnet18 --clean-maps cached --warmup 0 --repeats 1
    python benchmarks/saliency_attack_cost.py --models cifar_resnet18 --device cuda --threads 0
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from harness import (
    MODELS,
    add_budget_arguments,
    add_run_arguments,
    benchmark_model,
    interleaved_seconds,
    machine_line,
    set_threads,
    with_default_eps,
    write_json,
)
from upi_step_cost import upi_step_fn

from upi_lightning.attacks.objective import UPIObjective
from upi_lightning.attribution import SaliencyMethod
from upi_lightning.saliency import SaliencySettings

TARGET = 1.2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["small_cnn"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-steps", type=int, default=16, help="integrated gradients points")
    parser.add_argument("--n-samples", type=int, default=16, help="SmoothGrad noisy copies")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median kept)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    add_budget_arguments(parser)
    parser.add_argument("--chunk-size", type=int, default=4, help="samples per chunk of the chunked rows (0: none)")
    parser.add_argument("--clean-maps", choices=("cached", "recomputed", "both"), default="both")
    add_run_arguments(parser)
    return with_default_eps(parser.parse_args())


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    points: dict[SaliencyMethod, int] = {
        "gradient": 1,
        "integrated_gradients": args.n_steps,
        "smoothgrad": args.n_samples,
    }
    print(
        f"UPI-Grad step by saliency method: batch={args.batch_size}, norm={args.norm}, eps={args.eps}, "
        f"ReLU model, L2 dissimilarity, {machine_line(device)}; untrained models, random images\n"
    )
    header = "| model | method | points | clean maps | chunk | median s | multiple of gradient | multiple / points |"
    print(f"{header} target |")
    print("|---|---|---:|---|---:|---:|---:|---:|---|")
    caches = {"cached": (True,), "recomputed": (False,), "both": (True, False)}[args.clean_maps]
    rows = []
    for name in args.models:
        model, shape = benchmark_model(name, device)
        x = torch.rand(args.batch_size, *shape, device=device)
        y = torch.randint(0, 10, (args.batch_size,), device=device)
        fns: dict[tuple[SaliencyMethod, str, int | None], Callable[[], float]] = {}
        for method in points:
            saliency = SaliencySettings(method=method, n_steps=args.n_steps, n_samples=args.n_samples)
            chunks = [None] if method == "gradient" or not args.chunk_size else [None, args.chunk_size]
            for cache in caches:
                for chunk in chunks:
                    step = upi_step_fn(model, x, y, UPIObjective(saliency=saliency), args, cache, chunk)
                    fns[(method, "cached" if cache else "recomputed", chunk)] = step
        times = interleaved_seconds(fns, args.repeats, args.warmup)
        for (method, clean, chunk), values in times.items():
            median = statistics.median(values)
            multiple = median / statistics.median(times[("gradient", clean, None)])
            ratio = multiple / points[method]
            verdict = "" if method == "gradient" else f"<= {TARGET}: {'met' if ratio <= TARGET else 'not met'}"
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "clean_maps": clean,
                    "chunk_size": chunk,
                    "seconds": median,
                    "ratio": ratio,
                }
            )
            print(
                f"| {name} | {method} | {points[method]} | {clean} | {chunk or 'all'} | {median:.3f} | "
                f"{multiple:.2f}x | {ratio:.2f} | {verdict} |",
                flush=True,
            )
    write_json(args.json, {"benchmark": "saliency_attack_cost", "machine": machine_line(device), "rows": rows})


if __name__ == "__main__":
    main()
