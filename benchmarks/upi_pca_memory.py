"""Peak memory of UPI-PCA's streaming power solver against the exact route, as the fit set grows.

For each ``n`` of ``--sizes`` and each solver (``fit_upi_pca(..., solver="power")`` and
``solver="svd"``), runs the fit in a **fresh subprocess** and reads the child's peak resident set
(``VmHWM`` of ``/proc/self/status``) before and after the fit, so peaks never mix. Prints, per ``n``
and solver, the peak RSS, its increase during the fit, the wall time, the solver diagnostics, and the
``|cosine|`` between the two solvers' perturbations; then checks that the exact route refuses, with a
clear ``UPIError``, a matrix over its ``max_bytes`` (the message is shown).

Data: **synthetic** uniform random ``[0, 1]`` images with random labels, generated batch by batch from a
seed (the same batches every pass, nothing held in memory), so the measured growth is the solver's own.
Model: an untrained classifier, by default a tiny ReLU MLP (``Normalize - Flatten - Linear(d, 64) -
ReLU - Linear(64, 10)``) to keep the run cheap; ``--model small_cnn`` uses the MNIST SmallCNN. The
objective is the attack configs' UPI-PCA one (gradient maps of the logit, L2, ``sigma=0.1``, softplus(10)
surrogate).

    python benchmarks/upi_pca_memory.py                              # n = 1k, 5k, 20k, MNIST shape
    python benchmarks/upi_pca_memory.py --sizes 1000 5000 20000 60000
    python benchmarks/upi_pca_memory.py --input-shape 3 32 32        # CIFAR shape: d = 3072
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from upi_lightning.attacks.objective import UPIObjective
from upi_lightning.attacks.upi_pca import fit_upi_pca, svd_bytes
from upi_lightning.errors import UPIError
from upi_lightning.models import Normalize, build_classifier
from upi_lightning.threat import L2Ball

SOLVER_NAMES = ("power", "svd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 5000, 20000], help="fit-set sizes n")
    parser.add_argument("--input-shape", nargs=3, type=int, default=[1, 28, 28], metavar=("C", "H", "W"))
    parser.add_argument("--model", choices=("mlp", "small_cnn"), default="mlp")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--n-iter", type=int, default=10, help="power passes at most")
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--eps", type=float, default=1.0, help="L2 radius")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads; 0 = torch's default")
    parser.add_argument(
        "--cache-clean-maps", action="store_true", help="fit_upi_pca(cache_clean_maps=True): memory then grows with n"
    )
    parser.add_argument("--child", choices=SOLVER_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class SyntheticBatches:
    """Re-iterable ``(x, y)`` batches of uniform ``[0, 1]`` images, regenerated from a seed on every pass."""

    def __init__(self, n: int, shape: tuple[int, ...], batch_size: int, seed: int = 0) -> None:
        self.n, self.shape, self.batch_size, self.seed = n, shape, batch_size, seed

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for index in range(len(self)):
            generator = torch.Generator().manual_seed(self.seed + index)
            size = min(self.batch_size, self.n - index * self.batch_size)
            x = torch.rand(size, *self.shape, generator=generator)
            yield x, torch.randint(0, 10, (size,), generator=generator)


def build_model(name: str, shape: tuple[int, ...]) -> nn.Module:
    """The untrained classifier of ``[0, 1]`` images (fixed seed)."""
    torch.manual_seed(0)
    mean, std = (0.5,) * shape[0], (0.25,) * shape[0]
    if name == "small_cnn":
        return build_classifier("small_cnn", 10, shape, mean, std).eval()
    d = shape[0] * shape[1] * shape[2]
    return nn.Sequential(Normalize(mean, std), nn.Flatten(), nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def peak_rss_mib() -> float:
    """``VmHWM`` (peak resident set) of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def objective() -> UPIObjective:
    """The attack configs' UPI-PCA objective."""
    return UPIObjective(sigma=0.1, surrogate_beta=10.0)


def run_child(args: argparse.Namespace) -> None:
    """Fit once with solver ``args.child`` on ``args.n`` samples; write peaks, time and delta to ``args.out``."""
    shape = tuple(args.input_shape)
    model = build_model(args.model, shape)
    batches = SyntheticBatches(args.n, shape, args.batch_size)
    before = peak_rss_mib()
    start = time.perf_counter()
    result = fit_upi_pca(
        model,
        batches,
        L2Ball(args.eps),
        objective=objective(),
        solver=args.child,
        n_iter=args.n_iter,
        block_size=args.block_size,
        tol=args.tol,
        cache_clean_maps=args.cache_clean_maps,
    )
    seconds = time.perf_counter() - start
    info = {key: result.info.get(key) for key in ("passes", "converged", "relative_residual", "eigenvalue")}
    record = {"before": before, "peak": peak_rss_mib(), "seconds": seconds, "info": info}
    torch.save({"record": record, "delta": result.delta}, args.out)


def measure(args: argparse.Namespace, solver: str, n: int, folder: str) -> tuple[dict[str, object], Tensor]:
    """Run one fit in a fresh interpreter and return its record and perturbation."""
    out = os.path.join(folder, f"{solver}_{n}.pt")
    command = [sys.executable, os.path.abspath(__file__), "--child", solver, "--n", str(n), "--out", out]
    command += ["--input-shape", *map(str, args.input_shape), "--model", args.model]
    command += ["--batch-size", str(args.batch_size), "--n-iter", str(args.n_iter)]
    command += ["--block-size", str(args.block_size), "--tol", str(args.tol), "--eps", str(args.eps)]
    command += ["--threads", str(args.threads)] + (["--cache-clean-maps"] if args.cache_clean_maps else [])
    subprocess.run(command, check=True)
    saved = torch.load(out)
    return saved["record"], saved["delta"]


def refusal_message(args: argparse.Namespace) -> str:
    """The exact route's error when ``max_bytes`` is half of what it needs (:func:`svd_bytes`)."""
    shape = tuple(args.input_shape)
    d = shape[0] * shape[1] * shape[2]
    try:
        fit_upi_pca(
            build_model(args.model, shape),
            SyntheticBatches(8, shape, 8),
            L2Ball(args.eps),
            objective=objective(),
            solver="svd",
            max_bytes=svd_bytes(d) // 2,
        )
    except UPIError as err:
        return f"UPIError: {err}"
    return "NOT REFUSED (expected a UPIError)"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        run_child(args)
        return
    shape = tuple(args.input_shape)
    d = shape[0] * shape[1] * shape[2]
    print(
        f"UPI-PCA peak memory: {args.model} (untrained), synthetic uniform random images {'x'.join(map(str, shape))} "
        f"(d={d}) generated per batch, batch={args.batch_size}, power n_iter<={args.n_iter}, "
        f"block_size={args.block_size}, tol={args.tol}, cache_clean_maps={args.cache_clean_maps}, "
        "sigma=0.1, surrogate beta=10, "
        f"threads={torch.get_num_threads()}, torch {torch.__version__}; svd arrays 5*8d^2 = "
        f"{svd_bytes(d) / 2**20:.1f} MiB, power basis 3*block*d*4 = {3 * args.block_size * d * 4 / 2**20:.2f} MiB\n"
    )
    print("| n | solver | peak RSS MiB | before fit MiB | fit increase MiB | seconds | passes | converged | |cos| |")
    print("|---:|---|---:|---:|---:|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for n in args.sizes:
            results = {solver: measure(args, solver, n, folder) for solver in SOLVER_NAMES}
            power, svd = results["power"][1].flatten(), results["svd"][1].flatten()
            cosine = abs(torch.nn.functional.cosine_similarity(power, svd, dim=0).item())
            for solver in SOLVER_NAMES:
                record, _ = results[solver]
                info = record["info"]
                assert isinstance(info, dict)
                before, peak = float(record["before"]), float(record["peak"])
                print(
                    f"| {n:,} | {solver} | {peak:.1f} | {before:.1f} | {peak - before:.1f} | "
                    f"{float(record['seconds']):.1f} | {info['passes']} | "
                    f"{info.get('converged', '-') if solver == 'power' else '(exact)'} | {cosine:.6f} |",
                    flush=True,
                )
    print(f"\nExact route over max_bytes (max_bytes = half of 5*8d^2): {refusal_message(args)}")


if __name__ == "__main__":
    main()
