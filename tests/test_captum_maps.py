"""Captum's maps for the evaluation (``upi_lightning.captum_maps``), checked against our own maps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import TinyCNN, make_batches
from upi_lightning.attack_cli import attack_main
from upi_lightning.attacks.evaluate import evaluate_perturbation
from upi_lightning.captum_maps import CaptumSaliency
from upi_lightning.errors import UPIError
from upi_lightning.saliency import SaliencySettings
from upi_lightning.threat import L2Ball

captum_attr = pytest.importorskip("captum.attr")


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (SaliencySettings("gradient"), CaptumSaliency.of(captum_attr.Saliency)),
        (SaliencySettings("gradient", score="probability"), CaptumSaliency("Saliency", score="probability")),
        (SaliencySettings("grad_x_input"), CaptumSaliency("InputXGradient")),
        (
            SaliencySettings("integrated_gradients", n_steps=8),
            CaptumSaliency("IntegratedGradients", attribute_kwargs={"n_steps": 8, "method": "riemann_middle"}),
        ),
        (  # IG is not scale-invariant: the log-probability's map is not the probability's
            SaliencySettings("integrated_gradients", n_steps=8, score="log_probability"),
            CaptumSaliency(
                "IntegratedGradients",
                score="log_probability",
                attribute_kwargs={"n_steps": 8, "method": "riemann_middle"},
            ),
        ),
    ],
    ids=["gradient", "probability", "grad_x_input", "integrated_gradients", "ig_log_probability"],
)
def test_captum_maps_equal_our_maps(ours: SaliencySettings, theirs: CaptumSaliency) -> None:
    model = TinyCNN()
    x, y = make_batches(1, 6, shape=(1, 6, 6), low=0.1, high=0.9)[0]
    torch.testing.assert_close(theirs.maps(model, x, y), ours.maps(model, x, y), rtol=1e-4, atol=1e-6)
    copies = torch.cat([x, x.flip(-1)])
    torch.testing.assert_close(theirs.maps(model, copies, y, clean=x), ours.maps(model, copies, y, clean=x))
    torch.testing.assert_close(theirs.maps(model, x, None), ours.maps(model, x, None))  # the predicted classes


def test_evaluation_with_captum_maps_equals_ours() -> None:
    model = TinyCNN()
    batches = make_batches(2, 8, shape=(1, 6, 6), low=0.1, high=0.9)
    delta = L2Ball(0.5).random_on_sphere((1, 6, 6), torch.Generator().manual_seed(0))
    ours = evaluate_perturbation(model, batches, delta, k=5, only_correct=False)
    theirs = evaluate_perturbation(model, batches, delta, k=5, only_correct=False, saliency=CaptumSaliency())
    assert theirs == pytest.approx(ours, rel=1e-4, abs=1e-6)


def test_captum_maps_refuse_graphs_and_unknown_classes() -> None:
    model = TinyCNN()
    x, y = make_batches(1, 2, shape=(1, 6, 6))[0]
    with pytest.raises(UPIError, match="cannot be differentiated"):
        CaptumSaliency().maps(model, x, y, create_graph=True)
    with pytest.raises(UPIError, match=r"No attribution class 'Nope' in captum\.attr"):
        CaptumSaliency("Nope").maps(model, x, y)
    with pytest.raises(UPIError, match="need nowhere"):
        CaptumSaliency("nowhere.Saliency").attribution_class()
    with pytest.raises(UPIError, match="Unknown score"):
        CaptumSaliency(score="logits")  # type: ignore[arg-type]


def test_an_attack_run_on_captum_maps_names_them_in_its_report_and_figures(checkpoint: Path, tmp_path: Path) -> None:
    attack_main(
        [
            f"--ckpt={checkpoint}",
            "--data=upi_lightning.data.SyntheticDataModule",
            "--attack.budgets=[{norm: l2, eps: 1.0}]",
            "--attack.methods=[random]",
            "--attack.eval_samples=32",
            "--attack.batch_size=16",
            "--attack.k=20",
            "--attack.captum.method=Saliency",
            "--progress=false",
            f"--output={tmp_path}",
        ]
    )
    report = (tmp_path / "report.md").read_text()
    assert "saliency: Captum's `Saliency` (evaluated; the attacks differentiate `gradient` (logit))" in report
    assert "![maps](figure_captum_Saliency_l2_eps1.png)" in report
    assert (tmp_path / "figure_captum_Saliency_l2_eps1.png").is_file()
    assert not list(tmp_path.glob("figure_gradient_*"))
