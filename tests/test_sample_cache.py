from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from upi_lightning.sample_cache import SampleCache, sample_keys


def squares(calls: list[int]) -> Callable[[Tensor, Tensor], Tensor]:
    def compute(x: Tensor, y: Tensor) -> Tensor:
        calls.append(len(x))
        return x.flatten(1).pow(2).sum(1) + y

    return compute


def test_each_distinct_sample_is_computed_once_in_any_order() -> None:
    x, y = torch.rand(8, 1, 4, 4), torch.arange(8)
    calls: list[int] = []
    cache = SampleCache()
    compute = squares(calls)
    first = cache(compute, x[:5], y[:5])
    mixed = cache(compute, x.flip(0), y.flip(0))  # 3 new samples and the 5 known ones, reversed
    again = cache(compute, x, y)
    reference = x.flatten(1).pow(2).sum(1) + y
    assert calls == [5, 3] and len(cache) == 8
    torch.testing.assert_close(first, reference[:5])
    torch.testing.assert_close(mixed, reference.flip(0))
    torch.testing.assert_close(again, reference)


def test_the_label_is_part_of_the_key() -> None:
    x = torch.rand(1, 1, 3, 3)
    keys = sample_keys(x.repeat(3, 1, 1, 1), torch.tensor([0, 1, 0]))
    assert keys[0] == keys[2] != keys[1]
    calls: list[int] = []
    cache = SampleCache()
    cache(squares(calls), x, torch.tensor([0]))
    cache(squares(calls), x, torch.tensor([1]))
    assert calls == [1, 1]


def test_results_are_stored_on_the_storage_device_and_returned_on_the_batch_device() -> None:
    cache = SampleCache(storage="cpu")
    x, y = torch.rand(2, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 1])
    out = cache(lambda a, b: a.flatten(1), x, y)
    assert out.device == x.device and out.dtype == torch.float64
    assert all(chunk.device.type == "cpu" for chunk in cache._chunks)


def test_a_sample_repeated_within_a_batch_is_computed_once() -> None:
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 2])
    calls: list[int] = []
    out = SampleCache()(squares(calls), x[[0, 1, 0, 2, 1]], y[[0, 1, 0, 2, 1]])
    assert calls == [3]
    torch.testing.assert_close(out, (x.flatten(1).pow(2).sum(1) + y)[[0, 1, 0, 2, 1]])
