"""A learnable image dataset generated in memory: no files, no network (tests, demos)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from upi_lightning.data.base import ImageDataModule
from upi_lightning.errors import UPIError


class SyntheticDataModule(ImageDataModule):
    """A learnable dataset generated in memory: needs nothing on disk and no network.

    Class ``c`` has a fixed smooth random template ``T_c``; a sample is
    ``clip(0.5 + s * a * (T_c - 0.5) + noise)`` with separation ``s``, a random contrast ``a`` in
    ``[0.5, 1]`` and Gaussian pixel noise, so a small CNN learns it in seconds without reaching 100%
    (the defaults give roughly 90% validation accuracy) and its saliency maps stay non-trivial.

    Args:
        num_train: training samples (before the validation split).
        num_test: test samples (split into attack fit/eval halves).
        num_classes: number of classes.
        input_shape: ``(C, H, W)``.
        separation: how far the class templates are from mid-grey (smaller is harder).
        noise: std of the pixel noise.
        **kwargs: see :class:`ImageDataModule` (``seed`` also seeds the generator).
    """

    def __init__(
        self,
        num_train: int = 2048,
        num_test: int = 512,
        num_classes: int = 10,
        input_shape: Sequence[int] = (1, 28, 28),
        separation: float = 0.3,
        noise: float = 0.3,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise UPIError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape}.")
        self.num_train, self.num_test = num_train, num_test
        self.separation, self.noise = separation, noise
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)  # type: ignore[assignment]
        self.mean = [0.5] * input_shape[0]
        self.std = [0.25] * input_shape[0]

    def templates(self) -> Tensor:
        """One smooth template per class, ``(num_classes, C, H, W)`` in ``[0, 1]``."""
        generator = torch.Generator().manual_seed(self.seed)
        channels, height, width = self.input_shape
        coarse = torch.rand(self.num_classes, channels, max(height // 4, 1), max(width // 4, 1), generator=generator)
        return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)

    def load_arrays(self, train: bool) -> tuple[Tensor, Tensor]:
        """Draw the training or the test samples (different seeds, same templates)."""
        count = self.num_train if train else self.num_test
        generator = torch.Generator().manual_seed(self.seed * 2 + (0 if train else 1) + 1)
        labels = torch.randint(self.num_classes, (count,), generator=generator)
        contrast = torch.empty(count, 1, 1, 1).uniform_(0.5, 1.0, generator=generator)
        noise = torch.randn(count, *self.input_shape, generator=generator) * self.noise
        images = 0.5 + self.separation * contrast * (self.templates()[labels] - 0.5) + noise
        images = images.clamp(0, 1)
        return images.mul(255).round().to(torch.uint8), labels
