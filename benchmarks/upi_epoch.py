"""A CIFAR-10-sized UPI-Grad epoch in samples per second, in float32 and as bf16 / channels-last variants.

Fits one epoch of ``fit_upi_grad`` (gradient maps of the logit, L2 dissimilarity, L2 eps 1, ReLU model,
clean maps computed: a first epoch) over ``--samples`` random ``[0, 1]`` images of ``--model``'s input
shape (default: 50,000 of 3x32x32 for the CIFAR ResNet-18, the issue 18 target being < 30 s on one
H200) in batches of ``--batch-size``, and prints seconds and samples per second for each variant:

* ``float32``: the reference;
* ``bf16``: the fit under ``torch.autocast(dtype=torch.bfloat16)``;
* ``channels_last``: the model and the images in ``torch.channels_last`` memory format.

Beside each, the agreement of the gradient maps of one batch with float32 (maximum absolute difference
relative to the largest absolute float32 entry, and the mean cosine similarity per sample).

    python benchmarks/upi_epoch.py --device cuda --threads 0                    # the GPU figure
    python benchmarks/upi_epoch.py --samples 256 --variants float32 bf16        # a CPU try
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from harness import MODELS, add_run_arguments, benchmark_model, machine_line, set_threads, timed, write_json
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from upi_lightning.attacks.upi_grad import fit_upi_grad
from upi_lightning.saliency import saliency_map
from upi_lightning.threat import threat_model

VARIANTS = ("float32", "bf16", "channels_last")
TARGET_SECONDS = 30.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="cifar_resnet18")
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    add_run_arguments(parser)
    return parser.parse_args()


@contextlib.contextmanager
def variant_context(variant: str, device: torch.device) -> Iterator[None]:
    """``torch.autocast`` to bfloat16 for ``bf16``, nothing for the others."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant == "bf16"):
        yield


def prepared(model: nn.Module, x: Tensor, variant: str) -> tuple[nn.Module, Tensor]:
    """``model`` and ``x`` in channels-last memory format for ``channels_last``, else as they are."""
    if variant != "channels_last":
        return model, x
    return model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, shape = benchmark_model(args.model, device)
    model.eval()
    images = torch.rand(args.samples, *shape, device=device)
    labels = torch.randint(0, 10, (args.samples,), device=device)
    probe, probe_labels = images[: args.batch_size], labels[: args.batch_size]
    reference = saliency_map(model, probe, probe_labels, "gradient")
    print(
        f"UPI-Grad epoch: {args.model}, {args.samples:,} random {'x'.join(map(str, shape))} images, "
        f"batch={args.batch_size}, L2 eps 1, gradient maps, {machine_line(device)}\n"
    )
    print("| variant | epoch s | samples/s | map max abs diff / max | map cosine | target |")
    print("|---|---:|---:|---:|---:|---|")
    rows = []
    cifar_sized = args.model == "cifar_resnet18" and args.samples == 50_000
    for variant in args.variants:
        net, x = prepared(model, images, variant)
        loader = DataLoader(TensorDataset(x, labels), batch_size=args.batch_size)
        with variant_context(variant, device):
            seconds = timed(lambda: fit_upi_grad(net, loader, threat_model("l2", 1.0), epochs=1), device)  # noqa: B023
            maps = saliency_map(net, prepared(net, probe, variant)[1], probe_labels, "gradient").float()
        net.to(memory_format=torch.contiguous_format)
        relative = ((maps - reference).abs().max() / reference.abs().max()).item()
        cosine = F.cosine_similarity(maps.flatten(1), reference.flatten(1), dim=1).mean().item()
        met = "met" if seconds < TARGET_SECONDS else "not met"
        verdict = f"< {TARGET_SECONDS:g} s: {met}" if cifar_sized and variant == "float32" else ""
        rows.append({"variant": variant, "seconds": seconds, "samples_per_s": args.samples / seconds})
        rows[-1] |= {"map_relative_max_diff": relative, "map_cosine": cosine}
        print(
            f"| {variant} | {seconds:.2f} | {args.samples / seconds:,.0f} | {relative:.2e} | {cosine:.5f} | "
            f"{verdict} |",
            flush=True,
        )
    payload = {"benchmark": "upi_epoch", "model": args.model, "samples": args.samples, "machine": machine_line(device)}
    write_json(args.json, payload | {"rows": rows})


if __name__ == "__main__":
    main()
