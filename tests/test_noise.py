"""Keyed random draws (``upi_lightning.noise``)."""

from __future__ import annotations

import torch

from upi_lightning.noise import make_generator, sample_normal


def test_sample_normal_is_keyed_by_sample_not_by_batch() -> None:
    x, y = torch.rand(6, 1, 4, 4, generator=make_generator(0)), torch.arange(6)
    whole = sample_normal(x, y, 3, make_generator(7))
    assert whole.shape == (3, 6, 1, 4, 4)
    # each half alone (what two processes see), and the batch reversed, give every sample the same noise
    first, second = sample_normal(x[:3], y[:3], 3, make_generator(7)), sample_normal(x[3:], y[3:], 3, make_generator(7))
    assert torch.equal(torch.cat([first, second], dim=1), whole)
    assert torch.equal(sample_normal(x.flip(0), y.flip(0), 3, make_generator(7)), whole.flip(1))
    # the next call (next step) and another seed draw new noise; a sample's draws are not all equal
    generator = make_generator(7)
    sample_normal(x, y, 3, generator)
    assert not torch.equal(sample_normal(x, y, 3, generator), whole)
    assert not torch.equal(sample_normal(x, y, 3, make_generator(8)), whole)
    assert not torch.equal(whole[0], whole[1])
    assert abs(whole.mean().item()) < 0.2 and abs(whole.std().item() - 1) < 0.2
