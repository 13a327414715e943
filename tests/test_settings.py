"""The attack settings schema (``upi_lightning.attacks.settings``)."""

from __future__ import annotations

import pytest

from upi_lightning.attacks.settings import UPIGradSettings
from upi_lightning.errors import UPIError


def test_step_scale_sets_the_step_per_budget() -> None:
    assert UPIGradSettings().base_step(0.3) is None  # the fit's own default (eps/4 for L2)
    assert UPIGradSettings(step_scale=0.5).base_step(0.3) == pytest.approx(0.15)
    assert UPIGradSettings(step_size=0.2, step_scale=0.5).base_step(0.3) == 0.2
    with pytest.raises(UPIError, match="step_scale"):
        UPIGradSettings(step_scale=0.0)
