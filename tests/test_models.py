from __future__ import annotations

import urllib.error
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from lightning.pytorch import LightningModule
from torch import nn
from torchvision.models._api import WeightsEnum

from upi_lightning.activations import SmoothReLU6
from upi_lightning.attacks.objective import UPIObjective
from upi_lightning.checkpoints import load_classifier
from upi_lightning.errors import UPIError
from upi_lightning.models import (
    MLP,
    CifarResNet18,
    Logits,
    Normalize,
    SmallCNN,
    build_classifier,
    build_net,
    replace_heads,
)
from upi_lightning.module import Classifier


@pytest.mark.parametrize(
    ("arch", "shape"),
    [("small_cnn", (1, 28, 28)), ("small_cnn", (3, 32, 32)), ("cifar_resnet18", (3, 32, 32)), ("mlp", (1, 28, 28))],
)
def test_classifier_shapes(arch: str, shape: tuple[int, int, int]) -> None:
    model = build_classifier(arch, 7, shape, [0.5] * shape[0], [0.25] * shape[0]).eval()
    assert model(torch.rand(2, *shape)).shape == (2, 7)


def test_normalization_is_the_first_layer() -> None:
    mean, std = [0.2, 0.4, 0.6], [0.1, 0.2, 0.3]
    model = build_classifier("cifar_resnet18", 10, (3, 32, 32), mean, std).eval()
    assert isinstance(model[0], Normalize)
    x = torch.rand(2, 3, 32, 32)
    standardized = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), model[1](standardized))


def test_activation_switch() -> None:
    relu_net = SmallCNN(activation="relu")
    soft_net = SmallCNN(activation="softplus", beta=5.0)
    assert any(isinstance(m, nn.ReLU) for m in relu_net.modules())
    softplus = [m for m in soft_net.modules() if isinstance(m, nn.Softplus)]
    assert len(softplus) == 3 and all(m.beta == 5.0 for m in softplus)
    assert not any(isinstance(m, nn.ReLU) for m in CifarResNet18(activation="softplus").modules())


def test_torchvision_model_by_name() -> None:
    model = build_classifier("torchvision.resnet18", 5, (3, 64, 64), [0.5] * 3, [0.25] * 3, activation="softplus")
    assert model.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 5)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


def test_softplus_torchvision_models_lose_every_relu_or_are_refused() -> None:
    mobilenet = build_classifier(
        "torchvision.mobilenet_v2", 5, (3, 32, 32), [0.5] * 3, [0.25] * 3, activation="softplus"
    )
    assert not any(isinstance(m, nn.ReLU | nn.ReLU6) for m in mobilenet.modules())
    assert sum(isinstance(m, SmoothReLU6) for m in mobilenet.modules()) == 35
    assert mobilenet.train()(torch.rand(2, 3, 32, 32)).shape == (2, 5)  # it trains
    with pytest.raises(UPIError, match=r"torchvision\.googlenet calls ReLU as a function 57 times"):
        build_classifier("torchvision.googlenet", 5, (3, 64, 64), [0.5] * 3, [0.25] * 3, activation="softplus")


def test_timm_models_by_name_are_built_for_the_images() -> None:
    pytest.importorskip("timm")
    vit = build_classifier(
        "timm.vit_tiny_patch16_224", 10, (3, 32, 32), [0.5] * 3, [0.25] * 3, arch_kwargs={"patch_size": 4, "depth": 1}
    )
    assert vit.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10) and isinstance(vit[-1], Logits)
    assert vit[1].patch_embed.grid_size == (8, 8)
    assert UPIObjective().describe_network(vit) == "the model itself (no ReLU to make smooth)"
    cnn = build_classifier("timm.resnet10t", 3, (1, 20, 20), [0.5], [0.25], activation="softplus")  # no img_size
    assert cnn.eval()(torch.rand(1, 1, 20, 20)).shape == (1, 3)
    assert not any(isinstance(m, nn.ReLU) for m in cnn.modules())
    with pytest.raises(UPIError, match="Unknown timm model 'nonet'"):
        build_classifier("timm.nonet", 3, (1, 20, 20), [0.5], [0.25])


def test_logits_of_output_objects() -> None:
    logits = torch.rand(2, 3)
    assert Logits()(logits) is logits
    assert Logits()(SimpleNamespace(logits=logits)) is logits  # a Hugging Face output
    with pytest.raises(UPIError, match=r"returned a tuple, neither a logits tensor nor an object with a \.logits"):
        Logits()((logits, logits))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "resnet9000"}, "Unknown model arch 'resnet9000'"),
        ({"arch": "torchvision.nonet"}, "Unknown torchvision model 'nonet'"),
        ({"activation": "tanh"}, "Unknown activation"),
        ({"mean": [0.1, 0.2]}, "one statistic per channel"),
        ({"arch_kwargs": {"depth": 2}}, "arch_kwargs .* are for torchvision and timm models"),
    ],
)
def test_bad_model_arguments_are_clear(kwargs: dict, message: str) -> None:
    args = {"arch": "small_cnn", "num_classes": 10, "input_shape": (1, 28, 28), "mean": [0.5], "std": [0.25]}
    with pytest.raises(UPIError, match=message):
        build_classifier(**(args | kwargs))


def test_mlp_is_the_composition_of_its_layers() -> None:
    torch.manual_seed(0)
    net = MLP((1, 4, 4), 3, hidden=5)
    x = torch.rand(2, 1, 4, 4)
    first, second, last = (m for m in net if isinstance(m, nn.Linear))
    expected = last(torch.relu(second(torch.relu(first(x.flatten(1))))))
    torch.testing.assert_close(net(x), expected)
    assert first.in_features == 16 and last.out_features == 3
    assert sum(isinstance(m, nn.Softplus) for m in MLP(activation="softplus").modules()) == 2


@pytest.mark.parametrize("activation", ["relu", "softplus"])
def test_small_cnn_pooling_first_is_the_conv_act_pool_network_to_second_order(activation: str) -> None:
    torch.manual_seed(0)
    net = SmallCNN((1, 8, 8), 3, activation=activation, beta=4.0).double()
    first, second = (m for m in net.features if isinstance(m, nn.Conv2d))
    fc, last = (m for m in net.classifier if isinstance(m, nn.Linear))
    act = torch.relu if activation == "relu" else (lambda z: nn.functional.softplus(z, beta=4.0))

    def literal(images: torch.Tensor) -> torch.Tensor:  # the oracle: conv - act - pool, as written in papers
        hidden = nn.functional.max_pool2d(act(first(images)), 2)
        hidden = nn.functional.max_pool2d(act(second(hidden)), 2)
        return last(act(fc(hidden.flatten(1))))

    x = torch.rand(4, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(net(x), literal(x))
    grads = [torch.autograd.grad(f(x)[:, 0].sum(), x, create_graph=True)[0] for f in (net, literal)]
    torch.testing.assert_close(grads[0], grads[1])
    direction = torch.randn_like(x)
    hvps = [torch.autograd.grad((g * direction).sum(), x, allow_unused=True)[0] for g in grads]
    if activation == "softplus":  # ReLU's input Hessian is 0 (no graph at all)
        assert hvps[1] is not None and hvps[1].abs().max() > 0
        torch.testing.assert_close(hvps[0], hvps[1])
    assert list(net.state_dict()) == [
        f"{part}.{i}.{p}"
        for part, i in (("features", 0), ("features", 3), ("classifier", 1), ("classifier", 3))
        for p in ("weight", "bias")
    ]


def offline_weights(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """torchvision's own builders load "pretrained" weights made here (random, ImageNet-shaped): no network.

    Returns the names of the models whose weights were loaded.
    """
    loaded: list[str] = []

    def state_dict(weights: WeightsEnum, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        name = type(weights).__name__.removesuffix("_Weights").lower()  # GoogLeNet_Weights -> googlenet
        loaded.append(name)
        aux = {"aux_logits": True, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
        return torchvision.models.get_model(name, weights=None, num_classes=1000, **aux).state_dict()

    monkeypatch.setattr(WeightsEnum, "get_state_dict", state_dict)
    return loaded


def test_a_pretrained_torchvision_model_gets_heads_of_the_data_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = offline_weights(monkeypatch)
    net = build_net("torchvision.inception_v3", 10, (3, 96, 96), pretrained=True)
    assert loaded == ["inception_v3"]
    heads = {path: module.out_features for path, module in net.named_modules() if isinstance(module, nn.Linear)}
    assert heads == {"AuxLogits.fc": 10, "fc": 10}  # the auxiliary head too
    assert net.eval()(torch.rand(2, 3, 96, 96)).shape == (2, 10)
    same = build_net("torchvision.resnet18", 1000, (3, 64, 64), pretrained=True)
    assert same.fc.out_features == 1000  # ImageNet data keeps the pretrained head


def test_a_pretrained_model_without_a_linear_head_is_refused() -> None:
    squeezenet = torchvision.models.get_model("squeezenet1_0", weights=None)
    with pytest.raises(UPIError, match="squeezenet1_0 predicts 1000 classes and has no linear head"):
        replace_heads(squeezenet, 1000, 10, "squeezenet1_0")


@pytest.mark.parametrize(("arch", "side"), [("resnet18", 32), ("googlenet", 64), ("inception_v3", 96)])
def test_a_fine_tuned_pretrained_checkpoint_loads_without_downloading_as_the_model_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, side: int
) -> None:
    # torchvision's builders change GoogLeNet's and Inception's arguments when they load weights
    # (transform_input, GoogLeNet's auxiliary heads dropped): the rebuilt model must have them too
    loaded = offline_weights(monkeypatch)
    shape = {"input_shape": (3, side, side), "mean": [0.5] * 3, "std": [0.25] * 3}
    model = Classifier(arch=f"torchvision.{arch}", num_classes=10, pretrained=True, **shape).eval()
    path = tmp_path / "fine_tuned.ckpt"
    hparams = {LightningModule.CHECKPOINT_HYPER_PARAMS_KEY: dict(model.hparams), "pytorch-lightning_version": "2.6"}
    torch.save({**hparams, "state_dict": model.state_dict()}, path)
    restored = load_classifier(path).eval()
    assert loaded == [arch]  # built once with weights, loaded without
    flags = [
        [(type(m).__name__, m.transform_input) for m in net.modules() if hasattr(m, "transform_input")]
        for net in (model, restored)
    ]
    assert flags[0] == flags[1]  # random weights can hide a skipped input transform from the logits
    x = torch.rand(2, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))


def test_pretrained_weights_out_of_reach_are_one_line_naming_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(name: str, weights: object = None, **kwargs: object) -> nn.Module:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models, "get_model", no_network)
    with pytest.raises(
        UPIError, match=r"pretrained weights of torchvision.resnet18 .* torch's cache .*pretrained=false"
    ):
        build_net("torchvision.resnet18", 10, (3, 32, 32), pretrained=True)
