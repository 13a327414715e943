from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from upi_lightning.errors import UPIError
from upi_lightning.models import (
    MLP,
    CifarResNet18,
    Normalize,
    SmallCNN,
    build_classifier,
    pool_before_activation,
    replace_relu,
    softplus_surrogate,
)
from upi_lightning.saliency import saliency_map


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


def test_softplus_surrogate_copies_and_approximates() -> None:
    torch.manual_seed(0)
    model = build_classifier("small_cnn", 10, (1, 28, 28), [0.5], [0.25]).eval()
    surrogate = softplus_surrogate(model, beta=200.0)
    assert any(isinstance(m, nn.ReLU) for m in model.modules())
    assert not any(isinstance(m, nn.ReLU) for m in surrogate.modules())
    assert not any(p.requires_grad for p in surrogate.parameters())
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(surrogate(x), model(x), atol=5e-2, rtol=0)


def test_surrogate_pools_before_softplus_with_the_same_maps_and_map_gradients() -> None:
    torch.manual_seed(0)
    model = build_classifier("small_cnn", 10, (1, 28, 28), [0.5], [0.25]).eval()
    surrogate = softplus_surrogate(model, beta=10.0).eval()
    literal = copy.deepcopy(model)  # the oracle: ReLU -> Softplus in place, nothing reordered
    replace_relu(literal, 10.0)
    features = [type(m).__name__ for m in surrogate[1].features]
    assert features == ["Conv2d", "MaxPool2d", "Softplus", "Conv2d", "MaxPool2d", "Softplus"]
    assert surrogate.state_dict().keys() == model.state_dict().keys()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    torch.testing.assert_close(surrogate(x), literal(x))
    clean = saliency_map(literal, x, y, "gradient")

    def map_change_gradient(net: nn.Module) -> torch.Tensor:
        delta = (0.05 * torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
        maps = saliency_map(net, (x + delta).clamp(0, 1), y, "gradient", create_graph=True)
        (grad,) = torch.autograd.grad((maps - clean).flatten(1).norm(dim=1).sum(), delta)
        return grad

    torch.testing.assert_close(saliency_map(surrogate, x, y, "gradient"), clean)
    oracle = map_change_gradient(literal)
    assert oracle.abs().max() > 0
    torch.testing.assert_close(map_change_gradient(surrogate), oracle)


@pytest.mark.parametrize(
    "pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), nn.AdaptiveMaxPool2d(3)]
)
@pytest.mark.parametrize("activation", [nn.ReLU(), nn.Softplus(beta=10.0), nn.Softplus(beta=-2.0)])
def test_pool_before_activation_computes_the_same_function(pool: nn.Module, activation: nn.Module) -> None:
    net = nn.Sequential(nn.Conv2d(2, 4, 3), activation, pool, nn.Flatten())
    swapped = copy.deepcopy(net)
    assert pool_before_activation(swapped) == 1
    assert isinstance(swapped[1], type(pool)) and isinstance(swapped[2], type(activation))
    x = torch.randn(3, 2, 9, 9, requires_grad=True)
    torch.testing.assert_close(swapped(x), net(x))
    (expected,) = torch.autograd.grad(net(x).square().sum(), x)
    (actual,) = torch.autograd.grad(swapped(x).square().sum(), x)
    torch.testing.assert_close(actual, expected)


def test_pool_before_activation_leaves_other_pairs_alone() -> None:
    net = nn.Sequential(
        nn.GELU(), nn.MaxPool2d(2), nn.ReLU(), nn.MaxPool2d(2, return_indices=True), nn.ReLU(), nn.AvgPool2d(2)
    )
    before = [type(m) for m in net]
    assert pool_before_activation(net) == 0
    assert [type(m) for m in net] == before


def test_torchvision_model_by_name() -> None:
    model = build_classifier("torchvision.resnet18", 5, (3, 64, 64), [0.5] * 3, [0.25] * 3, activation="softplus")
    assert model.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 5)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "resnet9000"}, "Unknown model arch 'resnet9000'"),
        ({"arch": "torchvision.nonet"}, "Unknown torchvision model 'nonet'"),
        ({"activation": "tanh"}, "Unknown activation"),
        ({"mean": [0.1, 0.2]}, "one statistic per channel"),
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
