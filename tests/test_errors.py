from __future__ import annotations

from upi_lightning.errors import one_line


def test_one_line_quotes_the_first_line_without_colour_codes() -> None:
    err = RuntimeError("\n\x1b[1mWeights only load failed.\x1b[0m\nmore detail\n")
    assert one_line(err) == "RuntimeError: Weights only load failed."
    assert one_line(ValueError("x" * 500), limit=10) == "ValueError: " + "x" * 10
