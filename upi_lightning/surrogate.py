r"""The softplus surrogate of a ReLU network, and the graph rewrites that make its maps cheap to differentiate.

For a ReLU network the input gradient is piecewise constant, so a saliency map has no useful derivative
w.r.t. the input. :func:`softplus_surrogate` copies the network with every ReLU replaced by

.. math::

    \mathrm{softplus}_\beta(z) = \frac1\beta \log(1 + e^{\beta z}) \xrightarrow[\beta \to \infty]{} \max(z, 0),

whose second derivative is not zero (Dombrowski et al. 2019): ``nn.ReLU`` modules and ReLUs called as
functions (``F.relu``, ``torch.relu``, ``x.relu()``, as torchvision's GoogLeNet, Inception and DenseNet do),
and ``ReLU6`` (MobileNet) by :class:`~upi_lightning.activations.SmoothReLU6`. Two rewrites keep the
copy's function and cut the cost of differentiating its maps twice: :func:`pool_before_activation` (max-pool before a
non-decreasing activation) and :func:`fold_batchnorm` (eval-mode batch norms folded into the
convolutions before them, refreshed by :func:`refold_batchnorm`). Both find their pairs in the
``torch.fx`` graph (:func:`exclusive_module_pairs`).
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import cast

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights
from torch.nn.utils.parametrize import is_parametrized

from upi_lightning.activations import (
    functional_relus,
    replace_relu,
    replace_relu6,
    smooth_functional_relus,
)
from upi_lightning.errors import UPIError


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
        module.set_submodule(first, fuse_conv_bn_eval(cast(_ConvNd, layer), cast(_BatchNorm, norm)))
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
            conv = cast(_ConvNd, source.get_submodule(conv_name))
            norm = cast(_BatchNorm, source.get_submodule(norm_name))
            assert norm.running_mean is not None and norm.running_var is not None  # fold_batchnorm checked it
            weight, bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
            )
            target = cast(_ConvNd, folded_module.get_submodule(conv_name))
            target.weight.copy_(weight)
            cast(Tensor, target.bias).copy_(bias)


def surrogate_applies(model: nn.Module) -> bool:
    """Whether ``model`` has a ReLU for :func:`softplus_surrogate` to make smooth (or an ``nn.Softplus``).

    A ReLU is an ``nn.ReLU`` or ``nn.ReLU6`` module or a ReLU called as a function
    (:func:`~upi_lightning.activations.functional_relus`); a model without any (GELU or tanh activations)
    has no surrogate.
    """
    modules = any(isinstance(module, nn.ReLU | nn.ReLU6 | nn.Softplus) for module in model.modules())
    return modules or functional_relus(model) > 0


def softplus_surrogate(model: nn.Module, beta: float = 10.0) -> nn.Module:
    r"""Deep copy of ``model`` with every ReLU replaced by ``nn.Softplus(beta)`` (ReLU6 by ``SmoothReLU6``).

    ReLUs are ``nn.ReLU`` and ``nn.ReLU6`` modules, and ReLUs called as functions or methods in a
    ``forward`` (:func:`~upi_lightning.activations.smooth_functional_relus`; the copy is then a
    ``torch.fx`` graph module of the eval-mode forward, whose ``state_dict`` keys are those of the
    submodules it calls). Not detected: clamps written as ``F.hardtanh(x, 0, 6)``, ``x.clamp(min=0)`` or
    ``nn.Hardtanh``.

    ``softplus_beta(z) = log(1 + exp(beta z)) / beta`` tends to ReLU as ``beta -> inf`` but has a
    non-zero second derivative, so saliency maps of the copy are differentiable w.r.t. the input
    (Dombrowski et al. 2019). The original model is left untouched; the copy is frozen
    (``requires_grad=False``) and in eval mode, and two rewrites that keep its function make its maps
    cheaper to differentiate twice: it max-pools before the activation instead of after
    (:func:`pool_before_activation`: a quarter of the softplus work behind a 2x2 pool), and its batch
    norms are folded into the convolutions before them (:func:`fold_batchnorm`), so the copy computes
    the *eval-mode* network and must stay in eval mode. The folded pairs are kept in the copy's
    ``folded_batchnorms`` attribute, for :func:`refold_batchnorm` to refresh the copy when the model's
    weights change (a deep copy of a graph-module copy drops the attribute: keep the pairs beside it).

    Raises:
        UPIError: if ``beta <= 0`` or the model has no ReLU to replace (no ``nn.ReLU`` or ``nn.ReLU6``
            module, and a ``forward`` that calls none or cannot be traced), since the copy would silently
            equal the original.
    """
    if beta <= 0:
        raise UPIError(f"softplus surrogate beta must be > 0, got {beta}.")
    if not surrogate_applies(model):
        raise UPIError(
            f"{type(model).__name__} has no ReLU to replace with Softplus (no nn.ReLU or nn.ReLU6 module, and no "
            "F.relu call that torch.fx can trace); the surrogate would equal the original. Attack it without a "
            "surrogate (surrogate_beta: null)."
        )
    surrogate = copy.deepcopy(model)
    replace_relu(surrogate, beta)
    replace_relu6(surrogate, beta)
    surrogate = smooth_functional_relus(surrogate, beta).eval()  # it traces the eval-mode forward
    pool_before_activation(surrogate)
    surrogate.folded_batchnorms = fold_batchnorm(surrogate)  # type: ignore[assignment]  # a plain attribute
    return surrogate.requires_grad_(False)
