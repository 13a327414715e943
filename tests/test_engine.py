"""The shared ascent engine of the universal attacks (``upi_lightning.attacks.engine``)."""

from __future__ import annotations

import math

import pytest

from upi_lightning.attacks.engine import step_size_at
from upi_lightning.errors import UPIError


def test_step_size_schedules_closed_form() -> None:
    assert step_size_at("constant", 0.4, 7, None) == 0.4
    assert step_size_at("cosine", 0.4, 0, 10) == 0.4
    assert math.isclose(step_size_at("cosine", 0.4, 5, 10), 0.2)
    assert [round(step_size_at("step", 1.0, t, 8), 6) for t in range(8)] == [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]
    with pytest.raises(UPIError, match="constant"):
        step_size_at("cosine", 0.4, 0, None)
