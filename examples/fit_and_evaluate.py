"""The Python API end to end on synthetic data, in seconds.

Train any ``nn.Module``, fit universal perturbations for interpretation (UPI-Grad, UPI-PCA) on a
``DataLoader``, evaluate them beside a random perturbation of the same norm, save and reload one, and
compute the stability metrics by hand.

    python examples/fit_and_evaluate.py --output /tmp/upi_example

docs/API.md walks through the same steps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from upi_lightning.attacks import (
    L2Ball,
    LinfBall,
    UPIObjective,
    evaluate_perturbation,
    fit_upi_grad,
    fit_upi_pca,
    random_universal,
)
from upi_lightning.data import SyntheticDataModule
from upi_lightning.metrics import AttributionStability
from upi_lightning.perturbation import UniversalPerturbation
from upi_lightning.saliency import SaliencySettings
from upi_lightning.threat import apply_perturbation

IMAGE = (1, 16, 16)


def train(model: nn.Module, loader: DataLoader, epochs: int = 8) -> None:
    """A plain PyTorch training loop: the API needs no Lightning module, any classifier of [0, 1] images works."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the example; return relative L2 and top-k intersection by method (and print them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="Folder for the saved perturbation.")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    # data: any DataLoader of (images in [0, 1], labels) batches; here the in-memory synthetic set
    data = SyntheticDataModule(num_train=1024, num_test=256, input_shape=IMAGE, separation=0.5, batch_size=64)
    data.setup()
    fit_loader, eval_loader = data.attack_fit_dataloader(), data.attack_eval_dataloader()

    # the model: any nn.Module returning logits; a ReLU CNN here
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)
    )
    train(model, data.train_dataloader())

    # UPI-Grad in an L2 ball: the default objective is attack.py's (gradient maps, L2 dissimilarity,
    # differentiated through a softplus(10) copy of the ReLUs)
    threat = L2Ball(1.0)
    grad = fit_upi_grad(model, fit_loader, threat, epochs=2)
    # UPI-PCA in the same ball (its default objective adds Gaussian smoothing, sigma 0.1)
    pca = fit_upi_pca(model, fit_loader, threat, n_iter=5)
    random = random_universal(IMAGE, threat, n_draws=1, seed=0)[0]

    saliency = SaliencySettings("gradient")  # the maps compared (or captum_maps.CaptumSaliency)
    results = {
        name: evaluate_perturbation(model, eval_loader, delta, saliency=saliency, k=20)
        for name, delta in (("upi_grad", grad.delta), ("upi_pca", pca.delta), ("random", random))
    }
    seen = results["random"]
    print(f"clean accuracy {seen['clean_accuracy']:.3f}; L2 eps 1.0, maps of {seen['n_samples']:.0f} images")
    for name, metrics in results.items():
        print(f"{name:9s} relative_l2={metrics['relative_l2']:.3f} topk={metrics['topk_intersection']:.3f}")

    # save and reload (tensors and primitives only: read back with weights_only=True)
    path = grad.to_perturbation(model="example cnn").save(args.output / "upi_grad_l2_eps1.pt")
    loaded = UniversalPerturbation.load(path, expected_shape=IMAGE)
    print(f"saved {path} ({loaded.norm}, eps {loaded.eps}, fitted in {loaded.metadata['seconds']:.1f} s)")

    # the stability metrics by hand, on one batch, in an Linf ball
    linf = fit_upi_grad(model, fit_loader, LinfBall(0.05), objective=UPIObjective(dissimilarity="cosine"), epochs=1)
    x, y = next(iter(eval_loader))
    stability = AttributionStability(k=20)
    stability.update(saliency.maps(model, x, y), saliency.maps(model, apply_perturbation(x, linf.delta), y, clean=x))
    rounded = {key: round(value.item(), 3) for key, value in stability.compute().items()}
    print("Linf 0.05 (cosine objective), one batch:", rounded)
    return {name: {key: row[key] for key in ("relative_l2", "topk_intersection")} for name, row in results.items()}


if __name__ == "__main__":
    main()
