"""Classifiers: a small MNIST CNN, a CIFAR ResNet-18, an MLP, any torchvision or timm model, and their wrappers.

Every classifier built here takes images in pixel space ``[0, 1]`` and starts with a
:class:`Normalize` layer, so that perturbation budgets (``eps``) mean the same thing for every
dataset; torchvision and timm models end with :class:`Logits`, which returns the logits tensor of a
model that returns an output object. The activation is switchable between ``relu`` and ``softplus`` (with ``beta``);
:func:`upi_lightning.surrogate.softplus_surrogate` turns any trained ReLU network into a smooth copy
for attacks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torchvision
from torch import Tensor, nn

from upi_lightning.activations import Activation, functional_relus, make_activation, replace_relu, replace_relu6
from upi_lightning.errors import UPIError, one_line
from upi_lightning.model_modes import logits_of

OUR_ARCHS = ("small_cnn", "cifar_resnet18", "mlp")
TORCHVISION_PREFIX = "torchvision."
TIMM_PREFIX = "timm."


class Normalize(nn.Module):
    r"""Per-channel standardization :math:`(x - \mu) / \sigma` as the first layer of a model.

    Args:
        mean: per-channel mean (one value per input channel).
        std: per-channel standard deviation, all entries > 0.
    """

    mean: Tensor
    std: Tensor

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


torch.fx.wrap("logits_of")  # one call node in torch.fx graphs, so the surrogate's rewrites still trace the model


class Logits(nn.Module):
    """The logits of a model's output: a tensor as it is, or the ``.logits`` of an output object.

    Hugging Face classifiers return such objects, and torchvision's GoogLeNet and Inception do in train
    mode; ``nn.Sequential(model, Logits())`` makes any of them a classifier the attacks and metrics take.
    """

    def forward(self, output: Any) -> Tensor:
        """:func:`logits_of` the output."""
        return logits_of(output)


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
    r"""Two conv blocks and two linear layers; ~99% on MNIST in a few CPU epochs.

    ``conv3x3(32) - act - maxpool2 - conv3x3(64) - act - maxpool2 - fc(128) - act - fc(classes)``,
    computed with each max-pool *before* its activation: both activations are non-decreasing, so
    :math:`\max_{j \in W} f(z_j) = f(\max_{j \in W} z_j)` and the network is the same function with the
    same derivatives of every order (up to ties inside a pooling window, where ReLU's gradient is 0
    anyway), while the activation and its backward passes run on a quarter of the elements
    (:func:`upi_lightning.surrogate.pool_before_activation` explains the identity). The ``state_dict``
    keys are those of the conv - act - pool order.

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
            nn.MaxPool2d(2),
            make_activation(activation, beta),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.MaxPool2d(2),
            make_activation(activation, beta),
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


def build_net(
    arch: str,
    num_classes: int,
    input_shape: Sequence[int],
    activation: Activation = "relu",
    beta: float = 10.0,
    pretrained: bool = False,
    arch_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build the bare network (no normalization) named ``arch``.

    Args:
        arch: ``small_cnn``, ``cifar_resnet18``, ``mlp``, ``torchvision.<name>`` for any torchvision
            classification model (for example ``torchvision.resnet50``), or ``timm.<name>`` for any timm
            model (``pip install 'upi-lightning[timm]'``; for example ``timm.vit_tiny_patch16_224``, built
            for the images' size and channels).
        num_classes: number of output logits.
        input_shape: ``(C, H, W)`` of one image.
        activation: ``relu`` or ``softplus`` (torchvision and timm models get their ``nn.ReLU`` and
            ``nn.ReLU6`` modules replaced; one that calls ``F.relu`` in its forward is refused).
        beta: softplus sharpness.
        pretrained: load the library's pretrained weights (needs network or a filled cache).
        arch_kwargs: more keyword arguments of a torchvision or timm model (e.g. ``{"patch_size": 4}``).
    """
    if activation not in ("relu", "softplus"):
        raise UPIError(f"Unknown activation {activation!r}: use 'relu' or 'softplus'.")
    if arch_kwargs and arch in OUR_ARCHS:
        raise UPIError(f"arch_kwargs {dict(arch_kwargs)} are for torchvision and timm models, not {arch!r}.")
    if arch == "small_cnn":
        return SmallCNN(input_shape, num_classes, activation, beta)
    if arch == "cifar_resnet18":
        return CifarResNet18(input_shape, num_classes, activation, beta)
    if arch == "mlp":
        return MLP(input_shape, num_classes, activation, beta)
    if arch.startswith(TORCHVISION_PREFIX):
        net = torchvision_net(arch[len(TORCHVISION_PREFIX) :], num_classes, pretrained, arch_kwargs or {})
    elif arch.startswith(TIMM_PREFIX):
        net = timm_net(arch[len(TIMM_PREFIX) :], num_classes, input_shape, pretrained, arch_kwargs or {})
    else:
        raise UPIError(
            f"Unknown model arch {arch!r}. Choose one of {', '.join(OUR_ARCHS)}, 'torchvision.<name>' for a "
            "torchvision classifier (e.g. torchvision.resnet18) or 'timm.<name>' for a timm one."
        )
    if activation == "softplus":
        replace_relu(net, beta)
        replace_relu6(net, beta)
        calls = functional_relus(net)
        if calls:
            raise UPIError(
                f"{arch} calls ReLU as a function {calls} times in its forward (F.relu), which activation: softplus "
                "cannot replace in a network that trains; choose a model built with nn.ReLU modules (e.g. "
                "torchvision.resnet18), or train it with ReLUs and attack it through the softplus surrogate."
            )
    return net


def torchvision_net(name: str, num_classes: int, pretrained: bool, kwargs: Mapping[str, Any]) -> nn.Module:
    """The torchvision classifier ``name`` with ``num_classes`` outputs.

    With ``pretrained``, its default weights; when their classes are not ``num_classes`` (ImageNet's 1000
    against CIFAR-10's 10), every ``nn.Linear`` head of that many outputs (auxiliary heads included) is
    replaced by a new one of ``num_classes`` (:func:`replace_heads`), the pretrained features kept for
    fine-tuning, as timm does.
    """
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise UPIError(
            f"Unknown torchvision model {name!r}. Choose one of torchvision.models.list_models(), "
            f"e.g. {', '.join(available[:5])}."
        )
    if not pretrained:
        return torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        net = torchvision.models.get_model(name, weights=weights, **kwargs)
    except OSError as err:  # urllib's URLError too: no network and no cached file
        raise UPIError(
            f"Cannot load the pretrained weights of torchvision.{name} ({one_line(err)}): they download on first "
            f"use (network), then come from torch's cache ({torch.hub.get_dir()}/checkpoints, or $TORCH_HOME); "
            "copy the file there, or use pretrained=false."
        ) from None
    return replace_heads(net, len(weights.meta["categories"]), num_classes, name)


def rebuilt_arch_kwargs(arch: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``arch_kwargs`` that rebuild a pretrained ``arch`` without its weights (``kwargs`` given win).

    torchvision's builders change some arguments when they load weights: GoogLeNet and Inception v3
    normalize their input as ImageNet's (``transform_input``) and GoogLeNet drops its auxiliary heads; ViTs
    and MaxViT take the weights' image size. A checkpoint of a fine-tuned pretrained model is loaded without
    downloading the weights again (:func:`upi_lightning.checkpoints.load_classifier`), with these
    arguments, so that it has the architecture it was trained with.
    """
    if not arch.startswith(TORCHVISION_PREFIX):
        return dict(kwargs)
    name = arch[len(TORCHVISION_PREFIX) :]
    meta = torchvision.models.get_model_weights(name).DEFAULT.meta
    implied: dict[str, Any] = {}
    if name in ("googlenet", "inception_v3"):
        implied |= {"transform_input": True, "aux_logits": name == "inception_v3"}
    if name.startswith("vit_"):
        implied["image_size"] = meta["min_size"][0]
    if name.startswith("maxvit_"):
        implied["input_size"] = meta["min_size"]
    return {**implied, **kwargs}


def replace_heads(net: nn.Module, pretrained_classes: int, num_classes: int, name: str) -> nn.Module:
    """Replace every ``nn.Linear`` of ``pretrained_classes`` outputs of ``net`` by a new one of ``num_classes``.

    Raises:
        UPIError: if the classes differ and ``net`` has no such ``nn.Linear`` head (e.g. SqueezeNet's
            convolution head).
    """
    if pretrained_classes == num_classes:
        return net
    heads = [
        (path, module)
        for path, module in net.named_modules()
        if isinstance(module, nn.Linear) and module.out_features == pretrained_classes
    ]
    if not heads:
        raise UPIError(
            f"Pretrained torchvision.{name} predicts {pretrained_classes} classes and has no linear head to "
            f"replace for the data's {num_classes}; choose another model or pretrained=false."
        )
    for path, head in heads:
        parent_path, _, attribute = path.rpartition(".")
        new_head = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
        setattr(net.get_submodule(parent_path), attribute, new_head)
    return net


def timm_net(
    name: str, num_classes: int, input_shape: Sequence[int], pretrained: bool, kwargs: Mapping[str, Any]
) -> nn.Module:
    """The timm model ``name`` for ``num_classes`` and the images' channels and, where it takes one, their size.

    Vision transformers and other models with an ``img_size`` argument get ``input_shape``'s ``(H, W)``
    (``arch_kwargs`` such as ``patch_size`` adapt them further); convolutional ones take any size.

    Raises:
        UPIError: if timm is not installed or has no model ``name``.
    """
    try:
        import timm
    except ImportError:
        raise UPIError(f"timm.{name} needs the timm package: pip install 'upi-lightning[timm]'.") from None
    if not timm.is_model(name):
        raise UPIError(f"Unknown timm model {name!r}; list them with timm.list_models('*vit*') (for example).")

    def create(**extra: Any) -> nn.Module:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=input_shape[0], **extra)

    try:
        return create(**{"img_size": tuple(input_shape[1:]), **kwargs})
    except TypeError as err:
        if "img_size" not in str(err):
            raise
    return create(**kwargs)  # a model of any image size (a CNN)


def build_classifier(
    arch: str,
    num_classes: int,
    input_shape: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    activation: Activation = "relu",
    beta: float = 10.0,
    pretrained: bool = False,
    arch_kwargs: Mapping[str, Any] | None = None,
) -> nn.Sequential:
    """``nn.Sequential(Normalize(mean, std), net)``: a classifier of ``[0, 1]`` pixel-space images.

    :func:`build_net`'s arguments; a torchvision or timm ``net`` is followed by :class:`Logits`.
    """
    if len(mean) != input_shape[0]:
        raise UPIError(
            f"mean/std have {len(mean)} entries but images have {input_shape[0]} channels; "
            "give one statistic per channel."
        )
    net = build_net(arch, num_classes, input_shape, activation, beta, pretrained, arch_kwargs)
    return nn.Sequential(Normalize(mean, std), net, *([] if arch in OUR_ARCHS else [Logits()]))
