r"""Interpretation regularization (Noack et al. 2021): align the input gradients with a teacher's maps.

.. math::

    R = l_{cs}\Big(1 - \frac1N \sum_i \cos(g_i, s_i)\Big) + l_{gm} \|G\|_F,
    \qquad g_i = \nabla_{x_i} z_{y_i}(x_i),

with ``s_i`` the (thresholded) SmoothGrad attribution of a frozen teacher network, read from the
checkpoint of a trained :class:`~upi_lightning.module.Classifier` by :func:`load_teacher` without
importing the LightningModule (:mod:`upi_lightning.module` imports this package).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from upi_lightning.errors import UPIError, check_count
from upi_lightning.models import build_classifier
from upi_lightning.regularizers.base import (
    Regularizer,
    TrainingBatch,
    check_weight,
    true_class_input_gradient,
)
from upi_lightning.saliency import attribution
from upi_lightning.sample_cache import SampleCache

TEACHER_CHUNK = 2048
"""Largest number of noisy copies the IR teacher differentiates in one backward pass (bounds memory)."""

NET_PREFIX = "net."
"""Prefix of the network's entries in a ``Classifier`` ``state_dict`` (the attribute ``Classifier.net``)."""


def load_teacher(path: Path, data: tuple[tuple[int, ...], int] | None = None) -> nn.Sequential:
    """Return ``Classifier.load_from_checkpoint(path, map_location="cpu", weights_only=True).net``.

    The network is rebuilt with :func:`~upi_lightning.models.build_classifier` from the checkpoint's
    hyperparameters, exactly as ``Classifier.__init__`` builds it (same modules, same draws from the
    global random generator), then its ``net.*`` weights are loaded strictly.

    Args:
        path: the teacher's checkpoint.
        data: ``(input_shape, num_classes)`` of the student's data, checked against the teacher's.

    Raises:
        UPIError: if the checkpoint lacks a hyperparameter of the classifier's network, or was trained on
            images or classes other than ``data``.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hparams = checkpoint.get(LightningModule.CHECKPOINT_HYPER_PARAMS_KEY, {})
    trained = (tuple(hparams.get("input_shape", ())), int(hparams.get("num_classes", 0)))
    if data is not None and "input_shape" in hparams and trained != (tuple(data[0]), int(data[1])):
        raise UPIError(
            f"IR teacher checkpoint {path} was trained on images {trained[0]} with {trained[1]} classes, but the "
            f"model being trained takes images {tuple(data[0])} with {data[1]} classes; give a teacher trained "
            "on the same data."
        )
    try:
        net = build_classifier(
            hparams["arch"],
            hparams["num_classes"],
            list(hparams["input_shape"]),
            list(hparams["mean"]),
            list(hparams["std"]),
            hparams["activation"],
            hparams["softplus_beta"],
            hparams["pretrained"],
        )
    except KeyError as err:
        raise UPIError(f"IR teacher checkpoint {path} is not a Classifier checkpoint: it lacks {err}.") from err
    state = checkpoint["state_dict"]
    net.load_state_dict({name.removeprefix(NET_PREFIX): t for name, t in state.items() if name.startswith(NET_PREFIX)})
    return net


def threshold_beyond_one_std(attr: Tensor) -> Tensor:
    r"""Keep, per sample, the entries farther than one std from the sample's mean; zero the others.

    :math:`t_j = a_j \cdot [\,|a_j - \mu| > \sigma\,]` with :math:`\mu, \sigma` the mean and std of the
    ``C * H * W`` entries of the sample (the IR authors' thresholding of SmoothGrad targets).
    """
    flat = attr.flatten(1)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, keepdim=True)
    return torch.where((flat - mean).abs() > std, flat, torch.zeros_like(flat)).view_as(attr)


class InterpretationRegularization(Regularizer):
    r"""Interpretation regularization (Noack et al. 2021) with SmoothGrad targets of a teacher.

    .. math::

        R = l_{cs}\Big(1 - \frac1N \sum_i \cos(g_i, s_i)\Big) + l_{gm} \|G\|_F,
        \qquad g_i = \nabla_{x_i} z_{y_i}(x_i),

    with ``G`` the ``N x (C H W)`` matrix of the signed true-class logit gradients of the batch (built with
    ``create_graph=True``) and ``s_i`` the SmoothGrad attribution of class ``y_i`` by the teacher
    (``n_samples`` noisy copies with noise std ``sigma`` in pixel units; by default thresholded with
    :func:`threshold_beyond_one_std`). The teacher is the network of the ``Classifier`` checkpoint
    ``teacher_ckpt`` (:func:`load_teacher`), loaded at fit start (or on first use), frozen and never part
    of the student's ``state_dict``.

    Target caching: with ``cache_targets`` the targets are memoized by image content (a hash of the
    pixels and the label), so each training image costs one teacher SmoothGrad for the whole run: the
    first epoch computes them, later epochs reuse them. The cache holds one float map per distinct
    image (on the CPU, not in checkpoints); with data augmentation almost every image is new, so
    disable caching (or augmentation) there.

    Args:
        teacher_ckpt: checkpoint of a trained :class:`~upi_lightning.module.Classifier`.
        l_cs: weight of the cosine term (IR on MNIST: 3.0; CIFAR-10 WRN: 0.75).
        l_gm: weight of the gradient-magnitude term (MNIST: 0.15; CIFAR-10 WRN: 0.005).
        n_samples: SmoothGrad noisy copies.
        sigma: SmoothGrad noise std (pixel units).
        threshold: apply :func:`threshold_beyond_one_std` to the targets.
        cache_targets: memoize the targets by image content.
    """

    name = "interpretation_regularization"
    needs_input_grad = True

    def __init__(
        self,
        teacher_ckpt: str,
        l_cs: float = 3.0,
        l_gm: float = 0.15,
        n_samples: int = 50,
        sigma: float = 0.15,
        threshold: bool = True,
        cache_targets: bool = True,
    ) -> None:
        self.teacher_ckpt = str(teacher_ckpt)
        self.l_cs = check_weight("l_cs", l_cs)
        self.l_gm = check_weight("l_gm", l_gm)
        self.n_samples = check_count("IR n_samples", n_samples)
        self.sigma = check_weight("IR SmoothGrad sigma", sigma)
        self.threshold = threshold
        self.cache_targets = cache_targets
        self._teacher: nn.Module | None = None
        self._data: tuple[tuple[int, ...], int] | None = None  # the student's (input_shape, num_classes)
        self._cache = SampleCache(storage="cpu")

    def teacher(self, device: torch.device) -> nn.Module:
        """Return the frozen eval-mode teacher network on ``device`` (loaded on first call).

        Raises:
            UPIError: if ``teacher_ckpt`` is not a file.
        """
        if self._teacher is None:
            path = Path(self.teacher_ckpt)
            if not path.is_file():
                raise UPIError(
                    f"IR teacher checkpoint {path} not found; train a teacher first (e.g. train.py fit "
                    "--config configs/mnist.yaml) and set teacher_ckpt to its checkpoint."
                )
            self._teacher = load_teacher(path, self._data).eval().requires_grad_(False)
        return self._teacher.to(device)

    def teacher_targets(self, x: Tensor, y: Tensor) -> Tensor:
        """Compute the (thresholded) teacher SmoothGrad attributions ``(N, C, H, W)`` of classes ``y``."""
        attr = attribution(
            self.teacher(x.device),
            x,
            y,
            "smoothgrad",
            n_samples=self.n_samples,
            sigma=self.sigma,
            internal_batch_size=TEACHER_CHUNK,
        )
        return threshold_beyond_one_std(attr) if self.threshold else attr

    def targets(self, x: Tensor, y: Tensor) -> Tensor:
        """Return the targets ``s`` ``(N, C, H, W)`` of a batch, from the cache where possible."""
        x, y = x.detach(), y.detach()
        if not self.cache_targets:
            return self.teacher_targets(x, y)
        return self._cache(self.teacher_targets, x, y)

    def __call__(self, batch: TrainingBatch) -> Tensor:
        grad = true_class_input_gradient(batch.logits, batch.x, batch.y)
        targets = self.targets(batch.x, batch.y)
        cosine = F.cosine_similarity(grad.flatten(1), targets.flatten(1), dim=1)
        return self.l_cs * (1 - cosine.mean()) + self.l_gm * torch.linalg.vector_norm(grad)

    def on_fit_start(self, module: LightningModule) -> None:
        """Load the teacher now, so a wrong path or a teacher of other data fails before training starts."""
        self._data = (tuple(module.hparams["input_shape"]), int(module.hparams["num_classes"]))
        self.teacher(module.device)
