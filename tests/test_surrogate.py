from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from upi_lightning.activations import SmoothReLU6, functional_relus, replace_relu
from upi_lightning.attacks.objective import UPIObjective
from upi_lightning.errors import UPIError
from upi_lightning.models import CifarResNet18, SmallCNN, build_classifier
from upi_lightning.saliency import saliency_map
from upi_lightning.surrogate import (
    fold_batchnorm,
    pool_before_activation,
    refold_batchnorm,
    softplus_surrogate,
    surrogate_applies,
)


def test_softplus_surrogate_copies_and_approximates() -> None:
    torch.manual_seed(0)
    model = build_classifier("small_cnn", 10, (1, 28, 28), [0.5], [0.25]).eval()
    surrogate = softplus_surrogate(model, beta=200.0)
    assert any(isinstance(m, nn.ReLU) for m in model.modules())
    assert not any(isinstance(m, nn.ReLU) for m in surrogate.modules())
    assert not any(p.requires_grad for p in surrogate.parameters())
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(surrogate(x), model(x), atol=5e-2, rtol=0)


def map_change_gradient(net: nn.Module, reference: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. a universal ``delta`` of the L2 map change of ``net`` (second order in ``net``)."""
    clean = saliency_map(reference, x, y, "gradient")
    noise = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(1))
    delta = (0.05 * noise).requires_grad_(True)
    maps = saliency_map(net, (x + delta).clamp(0, 1), y, "gradient", create_graph=True)
    (grad,) = torch.autograd.grad((maps - clean).flatten(1).norm(dim=1).sum(), delta)
    return grad


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
    torch.testing.assert_close(saliency_map(surrogate, x, y, "gradient"), saliency_map(literal, x, y, "gradient"))
    oracle = map_change_gradient(literal, literal, x, y)
    assert oracle.abs().max() > 0
    torch.testing.assert_close(map_change_gradient(surrogate, literal, x, y), oracle)


def assert_same_function(rewritten: nn.Module, original: nn.Module, x: torch.Tensor) -> None:
    """``rewritten`` and ``original`` agree on ``x`` in value and in the input gradient of a loss."""
    x = x.detach().requires_grad_(True)
    torch.testing.assert_close(rewritten(x), original(x))
    (expected,) = torch.autograd.grad(original(x).square().sum(), x)
    (actual,) = torch.autograd.grad(rewritten(x).square().sum(), x)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize(
    "pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), nn.AdaptiveMaxPool2d(3)]
)
@pytest.mark.parametrize("activation", [nn.ReLU(), nn.Softplus(beta=10.0), nn.Softplus(beta=-2.0)])
def test_pool_before_activation_computes_the_same_function(pool: nn.Module, activation: nn.Module) -> None:
    net = nn.Sequential(nn.Conv2d(2, 4, 3), activation, pool, nn.Flatten())
    swapped = copy.deepcopy(net)
    assert pool_before_activation(swapped) == 1
    assert isinstance(swapped[1], type(pool)) and isinstance(swapped[2], type(activation))
    assert_same_function(swapped, net, torch.randn(3, 2, 9, 9))


def test_pool_before_activation_swaps_a_hand_written_stem_but_not_a_shared_activation() -> None:
    class Stem(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.relu, self.pool = nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2)
            self.shared, self.shared_pool = nn.ReLU(), nn.MaxPool2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.pool(self.relu(self.conv(x)))  # swapped
            return self.shared_pool(self.shared(h)) + self.shared(h).mean()  # self.shared runs twice: kept

    net = Stem()
    swapped = copy.deepcopy(net)
    assert pool_before_activation(swapped) == 1
    assert isinstance(swapped.relu, nn.MaxPool2d) and isinstance(swapped.pool, nn.ReLU)
    assert isinstance(swapped.shared, nn.ReLU) and isinstance(swapped.shared_pool, nn.MaxPool2d)
    assert_same_function(swapped, net, torch.randn(2, 1, 10, 10))


class RewriteTraps(nn.Module):
    """Pairs that look foldable or swappable but are not: an alias, a hooked conv, in-place and thresholds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.alias = self.conv  # one module under two names: rewriting "conv" would miss "alias"
        self.spectral, self.spectral_norm = nn.utils.spectral_norm(nn.Conv2d(2, 2, 1)), nn.BatchNorm2d(2)
        self.inplace, self.pool = nn.ReLU(inplace=True), nn.MaxPool2d(2)
        self.clipped, self.clipped_pool = nn.Softplus(beta=1.0, threshold=1.0), nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.alias(x))
        h = self.spectral_norm(self.spectral(h))
        pooled = self.pool(self.inplace(h))  # the in-place ReLU also changes h, used below
        return pooled + self.clipped_pool(self.clipped(h))


def test_rewrites_skip_aliases_hooks_in_place_activations_and_non_monotone_softplus() -> None:
    torch.manual_seed(0)
    net, rewritten = eval_and_copy(RewriteTraps())
    assert pool_before_activation(rewritten) == 0
    assert fold_batchnorm(rewritten) == []
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(rewritten(x), net(x))
    # the same module without its traps is rewritten
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Softplus(beta=1.0), nn.MaxPool2d(2)).eval()
    assert pool_before_activation(plain) == 1 and fold_batchnorm(plain) == [("0", "1")]


def test_pool_before_activation_leaves_other_pairs_alone() -> None:
    net = nn.Sequential(
        nn.GELU(), nn.MaxPool2d(2), nn.ReLU(), nn.MaxPool2d(2, return_indices=True), nn.ReLU(), nn.AvgPool2d(2)
    )
    before = [type(m) for m in net]
    assert pool_before_activation(net) == 0
    assert [type(m) for m in net] == before


class ConvNormCases(nn.Module):
    """A conv-BN pair to fold, a conv feeding BN and a skip, a BN after a non-conv, a BN without statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.shared, self.shared_norm = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.pool_norm = nn.BatchNorm2d(4)
        self.plain, self.stateless = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.conv(x)))
        s = self.shared(h)
        h = self.shared_norm(s) + s  # the conv output is used twice: not folded
        h = self.pool_norm(nn.functional.avg_pool2d(h, 1))  # not after a conv
        return self.stateless(self.plain(h))  # batch statistics even in eval mode: not folded


def randomize_batchnorm(model: nn.Module) -> None:
    """Give every batch norm non-trivial statistics and affine parameters, as after training."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator))


def eval_and_copy(net: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``net`` with trained-looking batch-norm statistics, in eval mode, and a deep copy of it to rewrite."""
    randomize_batchnorm(net)
    net.eval()
    return net, copy.deepcopy(net)


def test_fold_batchnorm_folds_only_exclusive_conv_norm_pairs() -> None:
    torch.manual_seed(0)
    net, folded = eval_and_copy(ConvNormCases())
    assert fold_batchnorm(folded) == [("conv", "norm")]
    assert isinstance(folded.norm, nn.Identity) and folded.conv.bias is not None
    assert all(isinstance(m, nn.BatchNorm2d) for m in (folded.shared_norm, folded.pool_norm, folded.stateless))
    assert_same_function(folded, net, torch.randn(3, 2, 5, 5))


def test_fold_batchnorm_leaves_an_untraceable_module_alone() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x)) if x.sum() > 0 else x

    net = DataDependent().eval()
    assert fold_batchnorm(net) == [] and isinstance(net.norm, nn.BatchNorm2d)


@pytest.mark.parametrize(("arch", "size"), [("cifar_resnet18", 32), ("torchvision.resnet18", 64)])
def test_resnet_surrogate_folds_every_batchnorm_and_keeps_the_eval_mode_function(arch: str, size: int) -> None:
    torch.manual_seed(0)
    model = build_classifier(arch, 10, (3, size, size), [0.5] * 3, [0.25] * 3)
    randomize_batchnorm(model)
    model.train()
    surrogate = softplus_surrogate(model, beta=10.0)
    assert model.training and not surrogate.training
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in surrogate.modules())
    if arch.startswith("torchvision."):  # the stem's ReLU -> max-pool, a hand-written forward
        assert isinstance(surrogate[1].relu, nn.MaxPool2d) and isinstance(surrogate[1].maxpool, nn.Softplus)
    literal = copy.deepcopy(model).eval()
    replace_relu(literal, 10.0)
    x, y = torch.rand(2, 3, size, size), torch.tensor([3, 7])
    torch.testing.assert_close(surrogate(x), literal(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        saliency_map(surrogate, x, y, "gradient"), saliency_map(literal, x, y, "gradient"), rtol=1e-3, atol=1e-7
    )
    oracle = map_change_gradient(literal, literal, x, y)
    actual = map_change_gradient(surrogate, literal, x, y)
    assert torch.linalg.vector_norm(actual - oracle) <= 1e-3 * torch.linalg.vector_norm(oracle)


def test_surrogate_follows_weight_changes_by_refolding() -> None:
    torch.manual_seed(0)
    model = build_classifier("cifar_resnet18", 10, (3, 32, 32), [0.5] * 3, [0.25] * 3)
    randomize_batchnorm(model)
    surrogate = softplus_surrogate(model, beta=10.0)
    assert len(surrogate.folded_batchnorms) == 20  # every conv -> BN pair of ResNet-18, shortcuts included
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.rand(4, 3, 32, 32)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()  # new weights, and train mode moved the running statistics
    refold_batchnorm(surrogate, model, surrogate.folded_batchnorms)
    fresh = softplus_surrogate(model, beta=10.0)
    for name, tensor in fresh.state_dict().items():
        torch.testing.assert_close(surrogate.state_dict()[name], tensor, msg=name)


@pytest.mark.parametrize(
    ("factory", "shape"),
    [
        (lambda: build_classifier("small_cnn", 10, (1, 28, 28), [0.5], [0.25]), (2, 1, 28, 28)),
        (lambda: CifarResNet18(num_classes=10), (2, 3, 32, 32)),
        (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (2, 3, 32, 32)),
        (lambda: torchvision.models.vgg11(weights=None, num_classes=10), (1, 3, 32, 32)),
    ],
    ids=["small_cnn", "cifar_resnet18", "tv_resnet18", "tv_vgg11"],
)
def test_softplus_surrogate(factory: Callable[[], nn.Module], shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)  # what the autouse seed of test_saliency.py, its former home, did
    model = factory()
    model.eval()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    x = torch.rand(shape)
    with torch.no_grad():
        reference = model(x)
        surrogate = softplus_surrogate(model, beta=1e4)
        error = (surrogate(x) - reference).abs().max().item()
    assert surrogate is not model
    assert not any(isinstance(m, nn.ReLU) for m in surrogate.modules())
    assert sum(isinstance(m, nn.Softplus) for m in surrogate.modules()) == relus > 0
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == relus
    assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert 0 < error < 1e-2 * reference.abs().max().item()


def test_softplus_surrogate_error_shrinks_with_beta() -> None:
    torch.manual_seed(0)  # what the autouse seed of test_saliency.py, its former home, did
    model = SmallCNN().eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        reference = model(x)
        errors = [(softplus_surrogate(model, beta)(x) - reference).abs().max().item() for beta in (1, 10, 100, 1e3)]
    assert errors == sorted(errors, reverse=True)


class FunctionalReLUNet(nn.Module):
    """Conv - BN - ReLU as ``F.relu``, ``torch.relu_`` and ``Tensor.relu`` calls, then ``F.relu6``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.norm(self.conv(x)), inplace=True)
        z = torch.relu_(self.conv2(z)).relu()
        return self.head(F.relu6(8 * z).flatten(1))


class SoftplusReference(FunctionalReLUNet):
    """The oracle: the same network written with softplus and the smooth ReLU6 by hand."""

    beta = 10.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def softplus(z: torch.Tensor) -> torch.Tensor:
            return F.softplus(z, self.beta)

        z = softplus(self.norm(self.conv(x)))
        z = softplus(softplus(self.conv2(z)))
        return self.head((softplus(8 * z) - softplus(8 * z - 6)).flatten(1))


def test_relus_called_as_functions_and_relu6_are_made_smooth() -> None:
    torch.manual_seed(0)
    model = FunctionalReLUNet()
    randomize_batchnorm(model)
    model.eval()
    assert surrogate_applies(model) and functional_relus(model) == 4
    surrogate = softplus_surrogate(model, beta=10.0)
    assert functional_relus(surrogate) == 0
    assert surrogate.state_dict().keys() - {"norm.weight", "norm.bias"} <= model.state_dict().keys()
    reference = SoftplusReference().eval()
    reference.load_state_dict(model.state_dict())
    x, y = torch.rand(5, 1, 6, 6), torch.tensor([0, 1, 2, 0, 1])
    torch.testing.assert_close(surrogate(x), reference(x))
    oracle = map_change_gradient(reference, reference, x, y)
    assert oracle.abs().max() > 0
    torch.testing.assert_close(map_change_gradient(surrogate, reference, x, y), oracle)
    assert isinstance(model.conv, nn.Conv2d) and functional_relus(model) == 4  # the original is untouched
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    model.eval()
    refold_batchnorm(surrogate, model, surrogate.folded_batchnorms)  # the graph module follows new weights
    torch.testing.assert_close(surrogate(x), softplus_surrogate(model, beta=10.0)(x))


def test_relu6_modules_become_smooth_and_approach_relu6() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU6(), nn.Linear(16, 3)).eval()
    assert surrogate_applies(model)
    x = 4 * torch.randn(8, 1, 6, 6)
    errors = []
    for beta in (1.0, 10.0, 100.0):
        surrogate = softplus_surrogate(model, beta)
        assert isinstance(surrogate[2], SmoothReLU6) and not any(isinstance(m, nn.ReLU6) for m in surrogate.modules())
        errors.append((surrogate(x) - model(x)).abs().max().item())
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.05


def test_a_model_whose_relus_cannot_be_found_has_no_surrogate() -> None:
    class Dynamic(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x) if bool(x.sum() > 0) else x

    assert not surrogate_applies(Dynamic())
    with pytest.raises(UPIError, match="no ReLU to replace"):
        softplus_surrogate(Dynamic())


class InPlaceReLUNet(nn.Module):
    """In-place ReLUs whose *input* is read again afterwards, and a ReLU given by keyword."""

    def __init__(self, smooth: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(3 * 6 * 6, 3)
        self.smooth = smooth  # the oracle: the same function written with softplus

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.smooth:
            y = 2 * F.softplus(y, 10.0)  # relu(y) + the rewritten y
            y = F.softplus(y - 1, 10.0)
            y = 2 * (F.softplus(y, 10.0) - F.softplus(y - 6, 10.0))
            return self.head(F.softplus(y, 10.0).flatten(1))
        out = F.relu(y, inplace=True)
        y = out + y  # y was rewritten by the in-place ReLU: 2 relu(y)
        y = y - 1
        y.relu_()  # result unused: later readers of y read it
        F.relu6(y, inplace=True)
        return self.head(torch.relu(input=2 * y).flatten(1))


def test_in_place_relus_rewrite_their_input_for_later_readers() -> None:
    torch.manual_seed(0)
    model = InPlaceReLUNet().eval()
    reference = InPlaceReLUNet(smooth=True).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.rand(4, 1, 6, 6)
    surrogate = softplus_surrogate(model, beta=10.0)
    assert functional_relus(model) == 4 and functional_relus(surrogate) == 0
    torch.testing.assert_close(surrogate(x), reference(x))


def test_untraceable_models_warn_and_train_mode_relus_do_not_count() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x) if bool(x.sum() > 0) else x

    with pytest.warns(UserWarning, match="torch.fx cannot trace Dynamic"):
        surrogate = softplus_surrogate(Dynamic())
    assert isinstance(surrogate.layer[1], nn.Softplus)

    class TrainOnly(nn.Module):  # the surrogate is the eval-mode network: no ReLU there
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x) if self.training else x

    model = TrainOnly().train()
    assert not surrogate_applies(model) and model.training
    with pytest.raises(UPIError, match="no ReLU to replace"):
        softplus_surrogate(model)


def test_a_deep_copied_objective_refreshes_its_graph_module_surrogate() -> None:
    torch.manual_seed(0)
    model = FunctionalReLUNet()
    randomize_batchnorm(model)
    model.eval()
    objective = UPIObjective(surrogate_beta=10.0)
    assert isinstance(objective.network(model), torch.fx.GraphModule)
    copied = copy.deepcopy(objective)
    with torch.no_grad():
        model.conv.weight.mul_(2)  # in place: the copy must refold, not rebuild
    x = torch.rand(3, 1, 6, 6)
    torch.testing.assert_close(copied.network(model)(x), softplus_surrogate(model, beta=10.0)(x))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("googlenet", {"aux_logits": False, "init_weights": True}), ("densenet121", {}), ("mobilenet_v2", {})],
)
def test_torchvision_models_that_call_relu_functions_get_a_smooth_surrogate(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10, **kwargs).eval()
    relus = functional_relus(model) + sum(isinstance(m, nn.ReLU | nn.ReLU6) for m in model.modules())
    surrogate = softplus_surrogate(model, beta=10.0)
    assert relus > 0 and functional_relus(surrogate) == 0
    assert not any(isinstance(m, nn.ReLU | nn.ReLU6) for m in surrogate.modules())
    x, y = torch.rand(2, 3, 64, 64), torch.tensor([1, 7])
    assert map_change_gradient(surrogate, model, x, y).abs().max() > 0  # the maps move with delta
