"""The ReLU family of a network and its smooth replacements, wherever the ReLUs are.

A network's ReLUs are ``nn.ReLU`` / ``nn.ReLU6`` modules, or calls in its ``forward`` (``F.relu``,
``torch.relu``, ``x.relu()``, ``F.relu6``: torchvision's GoogLeNet, Inception and DenseNet), which only a
``torch.fx`` trace finds. :func:`replace_relu`, :func:`replace_relu6` and :func:`smooth_functional_relus`
replace each kind with a smooth module (``nn.Softplus(beta)``, :class:`SmoothReLU6`), for softplus
networks (:func:`upi_lightning.models.build_net`) and the attacks' surrogate
(:func:`upi_lightning.surrogate.softplus_surrogate`).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from typing import Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from upi_lightning.errors import UPIError
from upi_lightning.model_modes import evaluation_mode

Activation = Literal["relu", "softplus"]


def make_activation(activation: Activation, beta: float = 10.0) -> nn.Module:
    """Return a fresh activation module: ``nn.ReLU`` or ``nn.Softplus(beta)``."""
    if activation == "relu":
        return nn.ReLU()
    if activation == "softplus":
        if beta <= 0:
            raise UPIError(f"softplus beta must be > 0, got {beta}.")
        return nn.Softplus(beta=beta)
    raise UPIError(f"Unknown activation {activation!r}: use 'relu' or 'softplus'.")


def _replace_modules(module: nn.Module, kind: type[nn.Module], make: Callable[[], nn.Module]) -> int:
    """Replace, in place, every submodule of class ``kind`` by a fresh ``make()``; return how many."""
    names = [name for name, child in module.named_modules(remove_duplicate=False) if isinstance(child, kind)]
    for name in names:
        module.set_submodule(name, make())
    return len(names)


def replace_relu(module: nn.Module, beta: float) -> int:
    """Replace, in place, every ``nn.ReLU`` submodule of ``module`` by ``nn.Softplus(beta)``.

    Returns:
        The number of modules replaced.
    """
    return _replace_modules(module, nn.ReLU, lambda: nn.Softplus(beta=beta))


class SmoothReLU6(nn.Module):
    r"""The smooth ReLU6 of the surrogate: :math:`\mathrm{softplus}_\beta(z) - \mathrm{softplus}_\beta(z - 6)`.

    Non-decreasing, with a non-zero second derivative; tends to :math:`\min(\max(z, 0), 6)` as
    :math:`\beta \to \infty`, within :math:`\log 2 / \beta` everywhere.
    """

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, z: Tensor) -> Tensor:
        """Apply the smooth ReLU6 elementwise."""
        return F.softplus(z, self.beta) - F.softplus(z - 6.0, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


RELU_FUNCTIONS: dict[object, str] = {
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu: "relu",
    F.relu_: "relu",
    F.relu6: "relu6",
}
"""The ReLU functions :func:`smooth_functional_relus` replaces, with their kind."""
RELU_METHODS = {"relu": "relu", "relu_": "relu"}
"""The ``Tensor`` ReLU methods it replaces."""


def _relu_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The tensor a ReLU call applies to (its first argument or ``input=``), if it is a graph node."""
    source = node.args[0] if node.args else node.kwargs.get("input")
    return source if isinstance(source, torch.fx.Node) else None


def _relu_kind(node: torch.fx.Node) -> str | None:
    """``relu`` or ``relu6`` for a graph node that calls a ReLU on a tensor as a function or method, else ``None``."""
    if node.op == "call_function":
        kind = RELU_FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        kind = RELU_METHODS.get(str(node.target))
    else:
        return None
    return kind if _relu_input(node) is not None else None


def _in_place(node: torch.fx.Node) -> bool:
    """Whether a ReLU call also writes its result into its input (``relu_``, ``inplace=True``)."""
    name = getattr(node.target, "__name__", node.target)
    return str(name).endswith("_") or node.kwargs.get("inplace") is True or node.args[1:2] == (True,)


def _traced(module: nn.Module) -> torch.fx.GraphModule | None:
    """``torch.fx.symbolic_trace`` of ``module`` in eval mode (the surrogate's), ``None`` if it cannot be traced."""
    try:
        with evaluation_mode(module):
            return torch.fx.symbolic_trace(module)
    except Exception:  # tracing fails in many ways on dynamic models; callers fall back to the modules alone
        return None


def functional_relus(module: nn.Module) -> int:
    """How many ReLUs ``module``'s eval-mode forward calls as functions or methods (0 if it cannot be traced)."""
    traced = _traced(module)
    return 0 if traced is None else sum(_relu_kind(node) is not None for node in traced.graph.nodes)


def smooth_functional_relus(module: nn.Module, beta: float) -> nn.Module:
    """``module`` with every ReLU it calls as a function or method replaced by a smooth module.

    ``relu`` becomes an ``nn.Softplus(beta)`` and ``relu6`` a :class:`SmoothReLU6`, each registered as a
    submodule (``smooth_relu_0``, ``smooth_relu_1``, ...) of the ``torch.fx`` graph module of the
    eval-mode ``forward`` returned. An in-place ReLU's later readers of its input read the smooth result,
    as they read the ReLU's. The graph module holds the submodules the forward calls under their names
    (``state_dict`` keys a subset of ``module``'s: unused heads such as GoogLeNet's auxiliary classifiers
    are dropped), runs the eval-mode branches whatever its mode, and is no ``nn.Sequential`` to index.
    Returns ``module`` itself when it calls no ReLU function, or, with a ``UserWarning``, when ``torch.fx``
    cannot trace it.
    """
    traced = _traced(module)
    if traced is None:
        warnings.warn(
            f"torch.fx cannot trace {type(module).__name__}, so ReLUs its forward calls as functions (F.relu), if "
            "any, stay piecewise linear in the softplus surrogate; nn.ReLU and nn.ReLU6 modules are replaced.",
            UserWarning,
            stacklevel=3,
        )
        return module
    order = {node: index for index, node in enumerate(traced.graph.nodes)}
    nodes = [node for node in traced.graph.nodes if _relu_kind(node) is not None]
    if not nodes:
        return module
    taken = {name for name, _ in traced.named_modules()}
    names = (name for name in map("smooth_relu_{}".format, itertools.count()) if name not in taken)
    for node, name in zip(nodes, names, strict=False):
        source = _relu_input(node)
        traced.add_submodule(name, nn.Softplus(beta=beta) if _relu_kind(node) == "relu" else SmoothReLU6(beta))
        with traced.graph.inserting_after(node):
            replacement = traced.graph.call_module(name, (source,))
        node.replace_all_uses_with(replacement)
        if _in_place(node) and source is not None:  # readers of the input after the call read the result

            def later(user: torch.fx.Node, new: torch.fx.Node = replacement, at: int = order[node]) -> bool:
                return user is not new and order.get(user, -1) > at

            source.replace_all_uses_with(replacement, delete_user_cb=later)
        traced.graph.erase_node(node)
    traced.recompile()
    return traced


def replace_relu6(module: nn.Module, beta: float) -> int:
    """Replace, in place, every ``nn.ReLU6`` submodule of ``module`` by :class:`SmoothReLU6` ``(beta)``.

    Returns:
        The number of modules replaced.
    """
    return _replace_modules(module, nn.ReLU6, lambda: SmoothReLU6(beta))
