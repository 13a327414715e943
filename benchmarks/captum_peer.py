"""Our batched saliency maps against Captum's, same model and batch (issue 18 target: ours / Captum <= 1.0).

For each model, on one batch of ``--batch-size`` random ``[0, 1]`` images (of the model's size, or
``--image-size`` square) and random target classes (logit score, eval mode), times
``upi_lightning.attribution.attribution`` and its Captum peer:

* ``gradient`` against ``Saliency(abs=False)``;
* ``integrated_gradients`` (``--n-steps`` midpoint points, black baseline) against
  ``IntegratedGradients(method="riemann_middle")`` (the same midpoint rule);
* ``smoothgrad`` (``--n-samples`` copies, noise std ``--sigma``) against ``NoiseTunnel(Saliency)``
  (``nt_type="smoothgrad"``, ``stdevs=sigma``, ``abs=False``).

Each side draws its own SmoothGrad noise when timed; for the agreement columns our map is computed from
Captum's draw (Captum's ``torch.normal`` from a reseeded global generator, laid out as its
``repeat_interleave`` of the samples), so both maps use the same noise and must agree to float rounding.
The two run in turn (``--repeats`` rounds after one warm-up); the table prints the median seconds of
each, ours / Captum, and the maximum absolute difference of the maps, also relative to the largest
absolute entry of Captum's.
Captum is a benchmark extra (``pip install -e ".[bench]"``), not a runtime dependency.

    python benchmarks/captum_peer.py                          # MNIST SmallCNN and CifarResNet18, 2 threads
    python benchmarks/captum_peer.py --models small_cnn --device cuda --threads 0
    python benchmarks/captum_peer.py --models cifar_resnet18 --batch-size 1 --image-size 4 --threads 1 --repeats 200
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable
from functools import partial

import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
from harness import (
    MODELS,
    add_run_arguments,
    benchmark_model,
    interleaved_seconds,
    machine_line,
    set_threads,
    timed,
    write_json,
)
from torch import Tensor, nn

from upi_lightning.attribution import attribution

TARGET = 1.0
SEED = 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-steps", type=int, default=16, help="integrated gradients points")
    parser.add_argument("--n-samples", type=int, default=16, help="SmoothGrad noisy copies")
    parser.add_argument("--sigma", type=float, default=0.15, help="SmoothGrad noise std (pixel units)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median kept)")
    parser.add_argument(
        "--image-size",
        type=int,
        help="side of the square images (default: the model's own); a tiny side such as 4 makes each call's "
        "per-operation overhead dominate, as kernel launches do on a GPU at these batch sizes",
    )
    add_run_arguments(parser)
    args = parser.parse_args()
    if args.image_size is not None and args.image_size < 1:
        parser.error(f"--image-size is a side in pixels and must be >= 1, got {args.image_size}")
    return args


def captum_noise(x: Tensor, n_samples: int) -> Tensor:
    """Reseed with ``SEED`` and redraw Captum's standard-normal SmoothGrad noise, as ``(n_samples, N, ...)``."""
    torch.manual_seed(SEED)
    draw = torch.normal(0, torch.tensor(1.0, device=x.device).repeat(len(x) * n_samples, *x.shape[1:]))
    return draw.view(len(x), n_samples, *x.shape[1:]).transpose(0, 1)


def pairs(
    model: nn.Module, x: Tensor, target: Tensor, args: argparse.Namespace
) -> dict[str, tuple[Callable[..., Tensor], Callable[[], Tensor]]]:
    """``method -> (ours(noise=None), Captum's)`` map functions."""
    saliency = Saliency(model)
    return {
        "gradient": (
            lambda noise=None: attribution(model, x, target),
            lambda: saliency.attribute(x, target, abs=False),
        ),
        "integrated_gradients": (
            lambda noise=None: attribution(model, x, target, "integrated_gradients", n_steps=args.n_steps),
            lambda: IntegratedGradients(model).attribute(
                x, target=target, n_steps=args.n_steps, method="riemann_middle"
            ),
        ),
        "smoothgrad": (
            lambda noise=None: attribution(
                model, x, target, "smoothgrad", n_samples=args.n_samples, sigma=args.sigma, noise=noise
            ),
            lambda: NoiseTunnel(saliency).attribute(
                x, nt_type="smoothgrad", nt_samples=args.n_samples, stdevs=args.sigma, target=target, abs=False
            ),
        ),
    }


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
    set_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(SEED)
    images = "the model's images" if args.image_size is None else f"{args.image_size}x{args.image_size} images"
    print(
        f"our maps vs Captum's: batch={args.batch_size}, {images}, "
        f"IG n_steps={args.n_steps}, SmoothGrad "
        f"n_samples={args.n_samples} sigma={args.sigma}, logit score, {machine_line(device)}; untrained models, "
        "random images\n"
    )
    print("| model | method | ours s | Captum s | ours / Captum | max abs diff | relative | target |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    rows = []
    for name in args.models:
        model, shape = benchmark_model(name, device, args.image_size)
        model.eval()
        x = torch.rand(args.batch_size, *shape, device=device)
        target = torch.randint(0, 10, (args.batch_size,), device=device)
        for method, (ours, theirs) in pairs(model, x, target, args).items():
            times = interleaved_seconds(
                {"ours": partial(timed, ours, device), "captum": partial(timed, theirs, device)},
                args.repeats,
                warmup=1,
            )
            ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["captum"])
            torch.manual_seed(SEED)
            reference = theirs()
            noise = captum_noise(x, args.n_samples) if method == "smoothgrad" else None  # Captum's draw again
            difference = (ours(noise) - reference).abs().max().item()
            relative = difference / reference.abs().max().item()
            ratio = ours_s / theirs_s
            verdict = f"<= {TARGET}: {'met' if ratio <= TARGET else 'not met'}"
            rows.append(
                {
                    "model": name,
                    "method": method,
                    "ours_s": ours_s,
                    "captum_s": theirs_s,
                    "ratio": ratio,
                    "max_abs_diff": difference,
                    "relative_diff": relative,
                }
            )
            print(
                f"| {name} | {method} | {ours_s:.4f} | {theirs_s:.4f} | {ratio:.2f} | {difference:.2e} | "
                f"{relative:.2e} | {verdict} |",
                flush=True,
            )
    write_json(
        args.json,
        {
            "benchmark": "captum_peer",
            "machine": machine_line(device),
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
