"""Cost of one UPI-Grad step against one plain training step (issue 7 target: <= 3.5x).

For each model, on one batch of ``--batch-size`` random ``[0, 1]`` images with random labels, times:

* **train**: one plain training step in train mode: forward, cross-entropy, ``backward``, ``SGD.step``;
* **UPI-Grad**: one step of a real ``fit_upi_grad`` run (``fit_universal``: batch checks, the maps of
  ``clip(x + delta)`` built with ``create_graph``, ``torch.autograd.grad`` w.r.t. ``delta``, the packed
  reduce, the projected step), through the softplus(beta) surrogate as the attack configs do
  (``surrogate_beta: 10.0``) and on the ReLU model itself. Each round runs a 2-step fit on the batch and
  times its second step (from ``on_step`` to ``on_step``), once with the clean maps cached (the default:
  in every epoch after the first they come from the cache) and once with ``cache_clean_maps=False``
  (recomputed at every step, as in the first epoch).

The candidates run in turn (round-robin), ``--warmup`` untimed rounds then ``--repeats`` timed ones (the
ResNet: ``--resnet-repeats``), so a slowdown of a shared machine hits all of them alike; the table
shows the median and the minimum of each and their ratios to the training step. The models are
untrained (timing does not depend on the weights).

    python benchmarks/upi_step_cost.py                         # SmallCNN and CifarResNet18, 2 threads
    python benchmarks/upi_step_cost.py --models small_cnn --repeats 20
    python benchmarks/upi_step_cost.py --threads 0 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
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
    train_step_fn,
    with_default_eps,
    write_json,
)
from torch import Tensor, nn

from upi_lightning.attacks.objective import UPIObjective
from upi_lightning.attacks.upi_grad import fit_upi_grad
from upi_lightning.threat import threat_model

TARGET = 3.5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median kept)")
    parser.add_argument("--resnet-repeats", type=int, default=1, help="timed runs for cifar_resnet18")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    parser.add_argument("--beta", type=float, default=10.0, help="softplus surrogate beta")
    add_budget_arguments(parser)
    add_run_arguments(parser)
    return with_default_eps(parser.parse_args())


def upi_step_fn(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    objective: UPIObjective,
    args: argparse.Namespace,
    cache: bool,
    chunk_size: int | None = None,
) -> Callable[[], float]:
    """Seconds of the second step of a 2-step ``fit_upi_grad`` on ``(x, y)`` (clean maps cached or not, by chunks)."""
    device = x.device

    def second_step() -> float:
        stamps: list[float] = []

        def on_step(step: int, delta: Tensor, value: float) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())

        fit_upi_grad(
            model,
            [(x, y)],
            threat_model(args.norm, args.eps),
            objective=objective,
            epochs=2,
            schedule="constant",
            cache_clean_maps=cache,
            on_step=on_step,
            chunk_size=chunk_size,
        )
        return stamps[1] - stamps[0]

    return second_step


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(
        f"UPI-Grad step vs training step: batch={args.batch_size}, norm={args.norm}, eps={args.eps}, "
        f"surrogate beta={args.beta}, gradient maps of the logit, L2 dissimilarity, {machine_line(device)}; "
        "untrained models, random images\n"
    )
    print("| model | input | repeats | step | clean maps | median s | min s | median ratio | min ratio | target |")
    print("|---|---|---:|---|---|---:|---:|---:|---:|---|")
    rows = []
    for name in args.models:
        repeats = args.resnet_repeats if name == "cifar_resnet18" else args.repeats
        model, shape = benchmark_model(name, device)
        x = torch.rand(args.batch_size, *shape, device=device)
        y = torch.randint(0, 10, (args.batch_size,), device=device)
        # The training step mutates its own copy; the attacked model keeps fixed weights as in a fit.
        fns: dict[tuple[str, str], Callable[[], float]] = {
            ("train (SGD)", ""): train_step_fn(copy.deepcopy(model), x, y)
        }
        for label, beta in (("UPI softplus surrogate", args.beta), ("UPI ReLU model", None)):
            objective = UPIObjective(surrogate_beta=beta)
            for cache in (True, False):
                fns[(label, "cached" if cache else "recomputed")] = upi_step_fn(model, x, y, objective, args, cache)
        times = interleaved_seconds(fns, repeats, args.warmup)
        train_median, train_min = statistics.median(times[("train (SGD)", "")]), min(times[("train (SGD)", "")])
        size = "x".join(map(str, shape))
        for (label, clean), values in times.items():
            median, fastest = statistics.median(values), min(values)
            ratio = median / train_median
            rows.append({"model": name, "step": label, "clean_maps": clean, "median_s": median, "ratio": ratio})
            verdict = "" if not clean else f"<= {TARGET}x: {'met' if ratio <= TARGET else 'not met'}"
            print(
                f"| {name} | {size} | {repeats} | {label} | {clean} | {median:.3f} | {fastest:.3f} | "
                f"{ratio:.2f}x | {fastest / train_min:.2f}x | {verdict} |",
                flush=True,
            )
    write_json(args.json, {"benchmark": "upi_step_cost", "machine": machine_line(device), "rows": rows})


if __name__ == "__main__":
    main()
