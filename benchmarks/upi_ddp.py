"""UPI fits on 1 and on several CPU processes (DDP over gloo): same ``delta``, time per fit, bytes all-reduced.

Each of ``--world-size`` processes (``torch.multiprocessing.spawn``, ``torch.distributed`` with gloo,
``--threads`` torch threads each) fits on its shard of the fit set: shard ``r`` holds rows ``r, r + W,
...`` of every global batch, and ``reduce`` is ``dist.all_reduce(SUM)``, so every step averages the
gradient over the whole global batch as one process does on the unsharded data. One process then fits
on the global batches alone, and the table compares:

* ``fit s``: wall time of ``fit_upi_grad`` / ``fit_upi_pca`` (the slowest rank);
* ``all-reduces`` and ``bytes each``: the calls of ``reduce`` and the bytes of the tensor each sums
  (UPI-Grad: the gradient, the objective sum and the count, ``(d + 2)`` float32 per step; UPI-PCA power:
  ``M Q`` and the count per pass, then the objective of both signs);
* ``max |delta - delta_1|`` and ``|cos|``: the largest difference to the 1-process perturbation and the
  cosine between them, for UPI-Grad also after every step, to show where the paths part
  (UPI-PCA's smoothing noise is keyed by sample, so 2 processes solve the same
  problem; an unconverged power iterate still amplifies summation-order rounding).

Model: the MNIST small CNN (untrained, fixed seed) on synthetic ``[0, 1]`` images with random labels;
objective as in the attack configs (softplus(10) surrogate, gradient maps of the logit, L2).

    python benchmarks/upi_ddp.py                        # 2 processes, 2,048 fit samples, 1 thread each
    python benchmarks/upi_ddp.py --world-size 2 --samples 4096 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import benchmark_model, machine_line, set_threads
from torch import Tensor

from upi_lightning.attacks.engine import UPIFitResult
from upi_lightning.attacks.objective import UPIObjective
from upi_lightning.attacks.upi_grad import fit_upi_grad
from upi_lightning.attacks.upi_pca import fit_upi_pca
from upi_lightning.threat import L2Ball

METHODS = ("upi_grad", "upi_pca")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2048, help="fit samples (all processes together)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch (all processes together)")
    parser.add_argument("--epochs", type=int, default=1, help="UPI-Grad epochs")
    parser.add_argument("--n-iter", type=int, default=5, help="UPI-PCA power passes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    return parser.parse_args()


def global_batches(args: argparse.Namespace) -> list[tuple[Tensor, Tensor]]:
    """The fit set as global batches of synthetic MNIST-shaped images (fixed seed)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(args.samples, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (args.samples,), generator=generator)
    return list(zip(x.split(args.batch_size), y.split(args.batch_size), strict=True))


def fit(
    method: str, batches: list[tuple[Tensor, Tensor]], args: argparse.Namespace, reduce: Callable, path: list[Tensor]
) -> UPIFitResult:
    """One fit of ``method`` on ``batches`` with the given ``reduce`` (the same model weights on every rank).

    UPI-Grad appends ``delta`` after every step to ``path``.
    """
    torch.manual_seed(0)
    model, _ = benchmark_model("small_cnn", torch.device("cpu"))
    model.eval().requires_grad_(False)
    threat = L2Ball(1.0)
    if method == "upi_grad":
        objective = UPIObjective(surrogate_beta=10.0)

        def on_step(step: int, delta: Tensor, value: float) -> None:
            path.append(delta.clone())

        return fit_upi_grad(
            model, batches, threat, objective=objective, epochs=args.epochs, on_step=on_step, reduce=reduce
        )
    objective = UPIObjective(surrogate_beta=10.0, sigma=0.1)
    return fit_upi_pca(model, batches, threat, objective=objective, n_iter=args.n_iter, tol=0.0, reduce=reduce)


def run(rank: int, world_size: int, args: argparse.Namespace, address: str, folder: str) -> None:
    """Fit both methods on this rank's shard and save ``delta``, seconds and the all-reduce sizes."""
    set_threads(args.threads)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world_size)
    shard = [(x[rank::world_size], y[rank::world_size]) for x, y in global_batches(args)]
    records = {}
    for method in METHODS:
        sizes: list[int] = []

        def reduce(tensor: Tensor, sizes: list[int] = sizes) -> Tensor:
            sizes.append(tensor.numel() * tensor.element_size())
            if world_size > 1:
                dist.all_reduce(tensor)
            return tensor

        if world_size > 1:
            dist.barrier()
        start = time.perf_counter()
        path: list[Tensor] = []
        result = fit(method, shard, args, reduce, path)
        seconds = time.perf_counter() - start
        records[method] = {"delta": result.delta, "seconds": seconds, "sizes": sizes, "path": path}
    torch.save(records, Path(folder) / f"rank{rank}.pt")
    if world_size > 1:
        dist.destroy_process_group()


def free_address() -> str:
    """A ``tcp://127.0.0.1:port`` rendezvous on a free port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def measure(world_size: int, args: argparse.Namespace) -> list[dict]:
    """Run ``world_size`` processes (1: in this process) and return each rank's records."""
    with tempfile.TemporaryDirectory() as folder:
        if world_size == 1:
            run(0, 1, args, "", folder)
        else:
            mp.spawn(run, args=(world_size, args, free_address(), folder), nprocs=world_size, join=True)
        return [torch.load(Path(folder) / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    set_threads(args.threads)
    print(
        f"UPI fits over DDP (gloo, CPU): small CNN (untrained), {args.samples} synthetic 1x28x28 fit samples, global "
        f"batch {args.batch_size}, UPI-Grad {args.epochs} epoch(s), UPI-PCA {args.n_iter} power passes, "
        f"{args.threads} thread(s) per process, {machine_line(torch.device('cpu'))}\n"
    )
    print(
        "| processes | method | fit s | all-reduces | bytes each | bytes in all | max abs(delta - delta_1) "
        "| abs(cos) | same on ranks |"
    )
    print("|---:|---|---:|---:|---|---:|---:|---:|---|")
    alone = measure(1, args)[0]
    sharded = measure(args.world_size, args)
    for world_size, ranks in ((1, [alone]), (args.world_size, sharded)):
        for method in METHODS:
            records = [rank[method] for rank in ranks]
            sizes = records[0]["sizes"]
            distinct = sorted(set(sizes))
            each = ", ".join(f"{size:,}" for size in distinct[:3]) + (" ..." if len(distinct) > 3 else "")
            difference = max((r["delta"] - alone[method]["delta"]).abs().max().item() for r in records)
            same = all(torch.equal(r["delta"], records[0]["delta"]) for r in records)
            cosine = torch.nn.functional.cosine_similarity(
                records[0]["delta"].flatten(), alone[method]["delta"].flatten(), dim=0
            )
            print(
                f"| {world_size} | {method} | {max(r['seconds'] for r in records):.1f} | {len(sizes)} | {each} | "
                f"{sum(sizes):,} | {difference:.2e} | {cosine.abs().item():.6f} | {'yes' if same else 'NO'} |",
                flush=True,
            )
    steps = [
        f"{(ours - alone_delta).abs().max().item():.1e}"
        for ours, alone_delta in zip(sharded[0]["upi_grad"]["path"], alone["upi_grad"]["path"], strict=True)
    ]
    print(f"\nUPI-Grad, max |delta_{args.world_size} - delta_1| after each step: {', '.join(steps)}")


if __name__ == "__main__":
    main()
