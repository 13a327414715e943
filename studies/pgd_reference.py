"""Compare :func:`upi_lightning.attacks.pgd.pgd_attack` with a textbook PGD on a checkpoint (issue 14).

Three attacks, all 40 steps of ``2.5 eps / 40`` from the same uniform random start in the ball, on the first
``--samples`` images of the held-out ``attack_eval`` split:

* ``clamp gradient``: the formulation before issue 14, the gradient w.r.t. ``delta`` of
  ``CE(f(clip(x + delta)))`` through ``torch.clamp``, which is zero for every pixel on 0 or 1;
* ``pgd_attack``: the library's PGD;
* ``textbook``: Madry et al.'s PGD written out here, the gradient w.r.t. the clipped ``x_adv``.

Prints a Markdown table of robust accuracy per budget, and the share of pixels on the box's faces
after the random start of the first budget.

Run: ``python studies/pgd_reference.py --ckpt runs/mnist/version_0/checkpoints/last.ckpt --data-root data``
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from upi_lightning.attacks.pgd import pgd_attack  # noqa: E402
from upi_lightning.checkpoints import load_classifier  # noqa: E402
from upi_lightning.data import MNISTDataModule  # noqa: E402
from upi_lightning.noise import make_generator  # noqa: E402
from upi_lightning.threat import Norm, ThreatModel, apply_perturbation, threat_model  # noqa: E402

BUDGETS: list[tuple[Norm, float]] = [("linf", 0.1), ("linf", 0.2), ("linf", 0.3), ("l2", 1.5)]
Attack = Callable[[nn.Module, Tensor, Tensor, ThreatModel, int, Tensor], Tensor]


def clamp_gradient_pgd(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, steps: int, start: Tensor
) -> Tensor:
    """PGD as it was before issue 14: the gradient w.r.t. ``delta`` flows through ``torch.clamp``."""
    delta = apply_perturbation(x, start) - x
    for _ in range(steps):
        variable = delta.requires_grad_(True)
        loss = F.cross_entropy(model(apply_perturbation(x, variable)), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, variable)
        delta = threat.step(delta.detach(), grad, 2.5 * threat.eps / steps, per_sample=True)
        delta = apply_perturbation(x, delta) - x
    return apply_perturbation(x, delta).detach()


def library_pgd(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, steps: int, start: Tensor) -> Tensor:
    """:func:`pgd_attack` with generator seed 0, the one that drew ``start``."""
    return pgd_attack(model, x, y, threat, steps=steps, generator=make_generator(0))


def textbook_pgd(model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, steps: int, start: Tensor) -> Tensor:
    """Madry et al.'s PGD: gradient w.r.t. the clipped ``x_adv``, sign or unit step, projection, clip."""
    eps = threat.eps
    step_size = 2.5 * eps / steps
    x_adv = (x + start).clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        if threat.norm == "linf":
            moved = (x_adv.detach() + step_size * grad.sign() - x).clamp(-eps, eps)
        else:
            unit = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            moved = x_adv.detach() + step_size * unit - x
            moved = moved * (eps / moved.flatten(1).norm(dim=1)).clamp(max=1).view(-1, 1, 1, 1)
        x_adv = (x + moved).clamp(0, 1)
    return x_adv.detach()


ATTACKS: dict[str, Attack] = {"clamp gradient": clamp_gradient_pgd, "pgd_attack": library_pgd, "textbook": textbook_pgd}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="Classifier checkpoint (train.py).")
    parser.add_argument("--data-root", default="data", help="Folder holding MNIST/raw.")
    parser.add_argument("--samples", type=int, default=300, help="Held-out images attacked.")
    parser.add_argument("--steps", type=int, default=40, help="PGD steps.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Print the robust accuracy of every attack at every budget as a Markdown table."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_classifier(args.ckpt).eval()
    dm = MNISTDataModule(root=args.data_root)
    dm.setup()
    x, y = next(iter(torch.utils.data.DataLoader(dm.splits["attack_eval"], batch_size=args.samples)))

    def accuracy(images: Tensor) -> float:
        with torch.no_grad():
            return (model(images).argmax(dim=1) == y).float().mean().item()

    first_norm, first_eps = BUDGETS[0]
    first_start = threat_model(first_norm, first_eps).random_start(tuple(x.shape), make_generator(0), per_sample=True)
    start = apply_perturbation(x, first_start)
    on_faces = ((start == 0) | (start == 1)).float().mean().item()
    print(f"{len(x)} held-out images, clean accuracy {accuracy(x):.3f}, {args.steps} steps of 2.5 eps / steps")
    print(f"pixels on 0 or 1 after the random start ({first_norm} {first_eps:g}): {on_faces:.1%}\n")
    print("| budget | " + " | ".join(ATTACKS) + " |")
    print("|---|" + "---:|" * len(ATTACKS))
    for norm, eps in BUDGETS:
        threat = threat_model(norm, eps)
        start = threat.random_start(tuple(x.shape), make_generator(0), per_sample=True)
        cells = [f"{accuracy(attack(model, x, y, threat, args.steps, start)):.3f}" for attack in ATTACKS.values()]
        print(f"| {norm} {eps:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
