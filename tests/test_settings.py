"""The attack settings schema (``upi_lightning.attacks.settings``)."""

from __future__ import annotations

import pytest

from upi_lightning.attack_cli import attack_parser
from upi_lightning.attacks.objective import UPI_PCA_SIGMA, UPIObjective
from upi_lightning.attacks.settings import AttackSettings, UPIGradSettings, UPIPCASettings
from upi_lightning.captum_maps import CaptumSaliency
from upi_lightning.errors import UPIError
from upi_lightning.saliency import SaliencySettings


def test_step_scale_sets_the_step_per_budget() -> None:
    assert UPIGradSettings().base_step(0.3) is None  # the fit's own default (eps/4 for L2)
    assert UPIGradSettings(step_scale=0.5).base_step(0.3) == pytest.approx(0.15)
    assert UPIGradSettings(step_size=0.2, step_scale=0.5).base_step(0.3) == 0.2
    with pytest.raises(UPIError, match="step_scale"):
        UPIGradSettings(step_scale=0.0)


def test_upi_grad_chunk_size_reaches_the_fit_and_is_checked() -> None:
    parsed = attack_parser().parse_args(["--attack.upi_grad.chunk_size", "4"]).attack
    assert parsed.upi_grad.chunk_size == 4 and UPIGradSettings().chunk_size is None
    with pytest.raises(UPIError, match="chunk_size"):
        UPIGradSettings(chunk_size=0)


def test_attack_py_and_the_python_api_share_the_default_objectives() -> None:
    assert UPIGradSettings().objective(SaliencySettings(), 100) == UPIObjective()
    assert UPIPCASettings().objective(SaliencySettings(), 100) == UPIObjective(sigma=UPI_PCA_SIGMA)
    defaults = attack_parser().get_defaults().attack
    assert defaults.upi_grad.surrogate_beta == UPIObjective().surrogate_beta == 10.0
    assert defaults.upi_pca.sigma == UPI_PCA_SIGMA
    with pytest.raises(UPIError, match="surrogate_beta"):
        UPIGradSettings(surrogate_beta=0.0)  # checked when the schema's object is built, as the API's


def test_evaluation_maps_are_captum_s_when_set_and_the_attack_keeps_its_own() -> None:
    assert AttackSettings().evaluation_maps() == SaliencySettings()
    captum = CaptumSaliency("IntegratedGradients", attribute_kwargs={"n_steps": 8})
    assert AttackSettings(captum=captum).evaluation_maps() is captum
    args = ["--model=torchvision.resnet18", "--data=upi_lightning.data.SyntheticDataModule"]
    config = attack_parser().parse_args([*args, "--attack.captum.method=IntegratedGradients"])
    assert config.attack.captum.method == "IntegratedGradients" and config.attack.saliency.method == "gradient"
