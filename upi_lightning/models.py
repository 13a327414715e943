"""Classifiers: a small MNIST CNN, a CIFAR ResNet-18, any torchvision model, and their wrappers.

Every classifier built here takes images in pixel space ``[0, 1]`` and starts with a
:class:`Normalize` layer, so that perturbation budgets (``eps``) mean the same thing for every
dataset. The activation is switchable between ``relu`` and ``softplus`` (with ``beta``), and
:func:`softplus_surrogate` turns any trained ReLU network into a smooth copy for attacks.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import torch
import torch.fx
import torchvision
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights
from torch.nn.utils.parametrize import is_parametrized

from upi_lightning.errors import UPIError

Activation = Literal["relu", "softplus"]

OUR_ARCHS = ("small_cnn", "cifar_resnet18", "mlp")
TORCHVISION_PREFIX = "torchvision."


class Normalize(nn.Module):
    r"""Per-channel standardization :math:`(x - \mu) / \sigma` as the first layer of a model.

    Args:
        mean: per-channel mean (one value per input channel).
        std: per-channel standard deviation, all entries > 0.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise UPIError(f"Normalize needs as many means as stds, got {len(mean)} and {len(std)}.")
        if min(std) <= 0:
            raise UPIError(f"Normalize needs every std > 0, got {list(std)}.")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Standardize a batch ``(N, C, H, W)`` channel by channel."""
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        """Show the statistics in ``print(model)``."""
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def make_activation(activation: Activation, beta: float = 10.0) -> nn.Module:
    """Return a fresh activation module: ``nn.ReLU`` or ``nn.Softplus(beta)``."""
    if activation == "relu":
        return nn.ReLU()
    if activation == "softplus":
        if beta <= 0:
            raise UPIError(f"softplus beta must be > 0, got {beta}.")
        return nn.Softplus(beta=beta)
    raise UPIError(f"Unknown activation {activation!r}: use 'relu' or 'softplus'.")


class MLP(nn.Sequential):
    """A fully connected classifier: ``flatten - fc(hidden) - act - fc(hidden) - act - fc(classes)``.

    A second architecture of a different kind than the CNNs, e.g. for transfer studies (~98% on MNIST
    in two CPU epochs).

    Args:
        input_shape: ``(C, H, W)`` of one image.
        num_classes: number of output logits.
        activation: ``relu`` or ``softplus``.
        beta: softplus sharpness (ignored for relu).
        hidden: width of the two hidden layers.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        activation: Activation = "relu",
        beta: float = 10.0,
        hidden: int = 256,
    ) -> None:
        super().__init__(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden),
            make_activation(activation, beta),
            nn.Linear(hidden, hidden),
            make_activation(activation, beta),
            nn.Linear(hidden, num_classes),
        )


class SmallCNN(nn.Module):
    """Two conv blocks and two linear layers; ~99% on MNIST in a few CPU epochs.

    ``conv3x3(32) - act - maxpool2 - conv3x3(64) - act - maxpool2 - fc(128) - act - fc(classes)``.

    Args:
        input_shape: ``(C, H, W)`` of one image.
        num_classes: number of output logits.
        activation: ``relu`` or ``softplus``.
        beta: softplus sharpness (ignored for relu).
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        activation: Activation = "relu",
        beta: float = 10.0,
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            make_activation(activation, beta),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            make_activation(activation, beta),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * (height // 4) * (width // 4), 128),
            make_activation(activation, beta),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``(N, num_classes)``."""
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """The two-conv residual block of ResNet-18 with a switchable activation."""

    def __init__(self, in_planes: int, planes: int, stride: int, activation: Activation, beta: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = make_activation(activation, beta)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = make_activation(activation, beta)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        """Residual forward pass."""
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stem with stride 1 and no max-pool (He et al., CIFAR variant).

    Args:
        input_shape: ``(C, H, W)`` of one image.
        num_classes: number of output logits.
        activation: ``relu`` or ``softplus``.
        beta: softplus sharpness (ignored for relu).
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        activation: Activation = "relu",
        beta: float = 10.0,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], 64, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64),
            make_activation(activation, beta),
        )
        layers: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(BasicBlock(in_planes, planes, stride, activation, beta))
            layers.append(BasicBlock(planes, planes, 1, activation, beta))
            in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``(N, num_classes)``."""
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def replace_relu(module: nn.Module, beta: float) -> int:
    """Replace, in place, every ``nn.ReLU`` submodule of ``module`` by ``nn.Softplus(beta)``.

    Returns:
        The number of modules replaced.
    """
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.Softplus(beta=beta))
            replaced += 1
        else:
            replaced += replace_relu(child, beta)
    return replaced


def _plain(module: nn.Module) -> bool:
    """Whether ``module`` computes what its class says: no forward hooks and no parametrizations."""
    return not module._forward_hooks and not module._forward_pre_hooks and not is_parametrized(module)


def exclusive_module_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """Return ``(first, second)`` submodule names where ``second`` is applied to ``first``'s output alone.

    Read from the ``torch.fx`` graph of ``module``: ``second(first(...))`` with no other argument, the
    output of ``first`` used nowhere else, each of the two modules called once in ``forward``,
    registered under one name only and free of hooks and parametrizations, so that swapping or
    replacing them changes exactly this one composition. Empty for a module that ``torch.fx`` cannot
    trace (data-dependent control flow).
    """
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # tracing fails in many ways on dynamic models, and the callers are only speed-ups
        return []
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    names = Counter(id(child) for _, child in module.named_modules(remove_duplicate=False))

    def movable(target: object) -> bool:
        child = module.get_submodule(str(target))
        return calls[target] == 1 and names[id(child)] == 1 and _plain(child)

    pairs: list[tuple[str, str]] = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        (source,) = node.args
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and len(source.users) == 1
            and movable(source.target)
            and movable(node.target)
        ):
            pairs.append((str(source.target), str(node.target)))
    return pairs


MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
"""Max-pooling modules, which commute with a non-decreasing elementwise activation."""

SOFTPLUS_MONOTONE_THRESHOLD = 20.0
r"""Smallest ``nn.Softplus`` threshold swapped: above ``threshold / beta`` softplus returns ``z`` and drops
by :math:`\log(1 + e^{-t}) / \beta` there, below float32 rounding for ``t >= 20`` (the default)."""


def _monotone(activation: nn.Module) -> bool:
    """Whether ``activation`` is an out-of-place ReLU or softplus that never decreases in float32."""
    if isinstance(activation, nn.ReLU):
        return not activation.inplace
    return isinstance(activation, nn.Softplus) and activation.threshold >= SOFTPLUS_MONOTONE_THRESHOLD


def pool_before_activation(module: nn.Module) -> int:
    r"""Swap, in place, every activation that feeds a max-pool with that max-pool.

    For a non-decreasing elementwise ``f``, :math:`\max_{j \in W} f(z_j) = f(\max_{j \in W} z_j)` and
    the gradient reaches the same arg-max, so the network computes the same function with the same
    derivatives of every order (up to ties inside a pooling window) while ``f`` and its backward passes
    run on the pooled tensor: ``k`` times fewer elements for a ``k``-element window. This matters for
    the softplus surrogate, whose saliency maps are differentiated twice. Swapped: an out-of-place
    ``nn.ReLU``, or an ``nn.Softplus`` with the default threshold (:data:`SOFTPLUS_MONOTONE_THRESHOLD`),
    followed by a max-pool without ``return_indices``, found by :func:`exclusive_module_pairs` (in
    ``nn.Sequential`` containers and hand-written ``forward`` methods alike). The two modules trade
    places under their names, so the ``state_dict`` keys do not change.

    Returns:
        The number of pairs swapped (0 for a module ``torch.fx`` cannot trace).
    """
    swapped = 0
    for first, second in exclusive_module_pairs(module):
        activation, pool = module.get_submodule(first), module.get_submodule(second)
        if _monotone(activation) and isinstance(pool, MAX_POOLS) and not pool.return_indices:
            module.set_submodule(first, pool)
            module.set_submodule(second, activation)
            swapped += 1
    return swapped


CONV_NORM_PAIRS = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))
"""Convolution and batch-norm classes whose eval-mode composition :func:`fold_batchnorm` folds."""


def fold_batchnorm(module: nn.Module) -> list[tuple[str, str]]:
    r"""Fold, in place, every eval-mode batch norm applied right after a convolution into that convolution.

    In eval mode :math:`\mathrm{BN}(Wx + b) = \gamma (Wx + b - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta`
    is one convolution with rescaled weights and a new bias (``torch.nn.utils.fusion.fuse_conv_bn_weights``),
    so the folded network computes the same function up to float rounding, without the normalization's
    forward and backward passes (and, for saliency maps differentiated twice, its double backward).
    Folded: a ``BatchNorm{1,2,3}d`` with running statistics applied to the output of a ``Conv{1,2,3}d``
    of the same dimension (:func:`exclusive_module_pairs`). The convolution is replaced by the folded
    one and the batch norm by ``nn.Identity``; the module keeps its classes and ``forward``.
    :func:`refold_batchnorm` later refreshes the folded weights from the unfolded original.

    Only valid while the result is used in eval mode; the caller puts ``module`` in eval mode first.

    Returns:
        The ``(convolution, batch norm)`` names folded (none for a module ``torch.fx`` cannot trace).
    """
    folded = []
    for first, second in exclusive_module_pairs(module):
        layer, norm = module.get_submodule(first), module.get_submodule(second)
        if not any(isinstance(layer, conv) and isinstance(norm, bn) for conv, bn in CONV_NORM_PAIRS):
            continue
        if norm.running_mean is None or norm.running_var is None:
            continue
        module.set_submodule(first, fuse_conv_bn_eval(layer, norm))
        module.set_submodule(second, nn.Identity())
        folded.append((first, second))
    return folded


def refold_batchnorm(folded_module: nn.Module, source: nn.Module, folded: list[tuple[str, str]]) -> None:
    """Copy ``source``'s current weights into ``folded_module``, a copy of it folded by :func:`fold_batchnorm`.

    Every parameter and buffer is copied under its name, except the folded convolutions, which get the
    fold of ``source``'s convolution and batch norm. Much cheaper than copying and folding again.

    Args:
        folded_module: the folded copy (same submodule names as ``source``).
        source: the unfolded module, e.g. after an optimizer step.
        folded: the pairs :func:`fold_batchnorm` returned for ``folded_module``.
    """
    convolutions = {conv for conv, _ in folded}
    state = source.state_dict()
    with torch.no_grad():
        for name, tensor in folded_module.state_dict().items():
            if name.rpartition(".")[0] not in convolutions:
                tensor.copy_(state[name])
        for conv_name, norm_name in folded:
            conv, norm = source.get_submodule(conv_name), source.get_submodule(norm_name)
            weight, bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
            )
            target = folded_module.get_submodule(conv_name)
            target.weight.copy_(weight)
            target.bias.copy_(bias)


def softplus_surrogate(model: nn.Module, beta: float = 10.0) -> nn.Module:
    r"""Deep copy of ``model`` with every ``nn.ReLU`` replaced by ``nn.Softplus(beta)``.

    ``softplus_beta(z) = log(1 + exp(beta z)) / beta`` tends to ReLU as ``beta -> inf`` but has a
    non-zero second derivative, so saliency maps of the copy are differentiable w.r.t. the input
    (Dombrowski et al. 2019). The original model is left untouched; the copy is frozen
    (``requires_grad=False``) and in eval mode, and two rewrites that keep its function make its maps
    cheaper to differentiate twice: it max-pools before the activation instead of after
    (:func:`pool_before_activation`: a quarter of the softplus work behind a 2x2 pool), and its batch
    norms are folded into the convolutions before them (:func:`fold_batchnorm`), so the copy computes
    the *eval-mode* network and must stay in eval mode. The folded pairs are kept in the copy's
    ``folded_batchnorms`` attribute, for :func:`refold_batchnorm` to refresh the copy when the model's
    weights change.

    Raises:
        UPIError: if ``beta <= 0`` or the model has no ``nn.ReLU`` module to replace (for example a
            model that only calls ``F.relu``), since the copy would silently equal the original.
    """
    if beta <= 0:
        raise UPIError(f"softplus surrogate beta must be > 0, got {beta}.")
    surrogate = copy.deepcopy(model)
    if replace_relu(surrogate, beta) == 0 and not any(isinstance(m, nn.Softplus) for m in model.modules()):
        raise UPIError(
            f"{type(model).__name__} has no nn.ReLU module to replace with Softplus; the surrogate would "
            "equal the original. Use a model built with nn.ReLU modules, or attack without a surrogate."
        )
    surrogate.eval()
    pool_before_activation(surrogate)
    surrogate.folded_batchnorms = fold_batchnorm(surrogate)
    return surrogate.requires_grad_(False)


def build_net(
    arch: str,
    num_classes: int,
    input_shape: Sequence[int],
    activation: Activation = "relu",
    beta: float = 10.0,
    pretrained: bool = False,
) -> nn.Module:
    """Build the bare network (no normalization) named ``arch``.

    Args:
        arch: ``small_cnn``, ``cifar_resnet18``, ``mlp``, or ``torchvision.<name>`` for any torchvision
            classification model (for example ``torchvision.resnet50``).
        num_classes: number of output logits.
        input_shape: ``(C, H, W)`` of one image.
        activation: ``relu`` or ``softplus`` (torchvision models get their ReLUs replaced).
        beta: softplus sharpness.
        pretrained: load torchvision's default weights (needs network or a filled torch hub cache).
    """
    if activation not in ("relu", "softplus"):
        raise UPIError(f"Unknown activation {activation!r}: use 'relu' or 'softplus'.")
    if arch == "small_cnn":
        return SmallCNN(input_shape, num_classes, activation, beta)
    if arch == "cifar_resnet18":
        return CifarResNet18(input_shape, num_classes, activation, beta)
    if arch == "mlp":
        return MLP(input_shape, num_classes, activation, beta)
    if arch.startswith(TORCHVISION_PREFIX):
        name = arch[len(TORCHVISION_PREFIX) :]
        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            raise UPIError(
                f"Unknown torchvision model {name!r}. Choose one of torchvision.models.list_models(), "
                f"e.g. {', '.join(available[:5])}."
            )
        weights = "DEFAULT" if pretrained else None
        kwargs = {} if pretrained else {"num_classes": num_classes}
        net = torchvision.models.get_model(name, weights=weights, **kwargs)
        if activation == "softplus":
            replace_relu(net, beta)
        return net
    raise UPIError(
        f"Unknown model arch {arch!r}. Choose one of {', '.join(OUR_ARCHS)}, "
        "or 'torchvision.<name>' for a torchvision classifier (e.g. torchvision.resnet18)."
    )


def build_classifier(
    arch: str,
    num_classes: int,
    input_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    activation: Activation = "relu",
    beta: float = 10.0,
    pretrained: bool = False,
) -> nn.Sequential:
    """``nn.Sequential(Normalize(mean, std), net)``: a classifier of ``[0, 1]`` pixel-space images."""
    if len(mean) != input_shape[0]:
        raise UPIError(
            f"mean/std have {len(mean)} entries but images have {input_shape[0]} channels; "
            "give one statistic per channel."
        )
    return nn.Sequential(Normalize(mean, std), build_net(arch, num_classes, input_shape, activation, beta, pretrained))
