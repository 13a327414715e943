r"""The UPI objective: how much a perturbation changes the saliency maps of a batch.

For a batch ``x`` with classes ``y`` and a perturbation ``delta`` (universal ``(C, H, W)`` or per sample
``(N, C, H, W)``), the per-sample objective is

.. math::

    J_i(\delta) = \frac{1}{m}\sum_{j=1}^{m} D\big(I(\mathrm{clip}(x_i + \delta + Z_{ij}, 0, 1)), I(x_i)\big)
        - \lambda \max\big(0, \mathrm{CE}(f(\mathrm{clip}(x_i + \delta)), y_i) - \mathrm{CE}(f(x_i), y_i)\big)

with :math:`Z_{ij} \sim N(0, \sigma^2 I)` (``m = n_noise`` draws, none when ``sigma = 0``), ``I`` the
saliency map of class :math:`y_i` (:func:`upi_lightning.saliency.saliency_map`) and ``D`` a
:func:`map_dissimilarity`. The second term ("keep the prediction", weight ``lambda``) penalizes any
increase of the cross-entropy so the label does not flip while the map does.

Which network: with ``surrogate_beta`` set (the default, 10) and a model built with ``nn.ReLU`` modules,
``f`` and ``I`` are those of :func:`upi_lightning.surrogate.softplus_surrogate` (every ReLU replaced by
``Softplus(beta)``), for the clean maps *and* the perturbed maps, so :math:`J = 0` at :math:`\delta = 0`
and the objective is smooth. A model with no ``nn.ReLU`` module (e.g. a GELU ViT, smooth already) is
differentiated as it is.
Attacks are always *evaluated* on the original model (:mod:`upi_lightning.attacks.evaluate`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upi_lightning.errors import UPIError
from upi_lightning.model_modes import evaluation_mode, gradients_enabled, model_logits
from upi_lightning.noise import sample_normal
from upi_lightning.saliency import SaliencySettings
from upi_lightning.sample_cache import SampleCache
from upi_lightning.surrogate import refold_batchnorm, softplus_surrogate, surrogate_applies
from upi_lightning.threat import straight_through_clip

OBJECTIVE_NOISE_SEED = 1
"""Seed of the objective's SmoothGrad draws: not the evaluation's (0), so that an attack fitted on the
evaluated images (the per-sample baseline) is not scored on the very draws it was fitted to."""

Dissimilarity = Literal["l2", "topk_mass", "cosine"]
DISSIMILARITIES: tuple[str, ...] = get_args(Dissimilarity)
SALIENCY_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SaliencySettings))


def map_dissimilarity(perturbed: Tensor, clean: Tensor, kind: Dissimilarity = "l2", k: int = 100) -> Tensor:
    r"""Per-sample dissimilarity ``(N,)`` of saliency maps ``(N, H, W)``, differentiable in ``perturbed``.

    Maps are expected L1-normalized (:func:`upi_lightning.saliency.normalize_map`).

    * ``l2``: :math:`\|a - b\|_2`.
    * ``topk_mass``: the fraction of the clean top-``k`` mass lost,
      :math:`1 - \sum_{S} a / \sum_{S} b` with ``S`` the ``k`` largest pixels of the clean map ``b``
      (``<= 1``; negative when the perturbed map puts more mass there).
    * ``cosine``: :math:`1 - \cos(a, b)`.

    Args:
        perturbed: maps ``a`` of the perturbed images.
        clean: maps ``b`` of the clean images (no gradient flows into them).
        kind: ``l2``, ``topk_mass`` or ``cosine``.
        k: size of the top-k set for ``topk_mass``, ``1 <= k <= H * W``.

    """
    if kind not in DISSIMILARITIES:
        raise UPIError(f"Unknown dissimilarity {kind!r}: use one of {', '.join(map(repr, DISSIMILARITIES))}.")
    if perturbed.shape != clean.shape or perturbed.dim() != 3:
        raise UPIError(f"maps must both be (N, H, W), got {tuple(perturbed.shape)} and {tuple(clean.shape)}.")
    a, b = perturbed.flatten(1), clean.detach().flatten(1)
    if kind == "l2":
        return torch.linalg.vector_norm(a - b, dim=1)
    if kind == "cosine":
        return 1 - F.cosine_similarity(a, b, dim=1)
    if not 1 <= k <= b.shape[1]:
        raise UPIError(f"top-k size k={k} must lie in [1, H*W={b.shape[1]}].")
    top = b.topk(k, dim=1).indices
    kept = a.gather(1, top).sum(dim=1)
    reference = b.gather(1, top).sum(dim=1)
    return 1 - kept / torch.where(reference > 0, reference, torch.ones_like(reference))


def clip(x: Tensor, straight_through: bool = False) -> Tensor:
    """``x`` clipped to ``[0, 1]``: :func:`~upi_lightning.threat.straight_through_clip` or ``torch.clamp``."""
    return straight_through_clip(x) if straight_through else x.clamp(0.0, 1.0)


def _normal_tensor(x: Tensor) -> Tensor:
    """Clone an inference tensor (made under ``torch.inference_mode``) so that autograd can save it."""
    return x.clone() if x.is_inference() else x


def _structure_key(model: nn.Module) -> tuple[Any, ...]:
    """Identity and device of every parameter/buffer (changes when tensors are replaced or moved)."""
    tensors = [*model.parameters(), *model.buffers()]
    return (id(model), *((id(t), t.device) for t in tensors))


def _values_key(model: nn.Module) -> tuple[int, ...]:
    """In-place version counter of every parameter/buffer (changes on optimizer steps, ``copy_``...)."""
    return tuple(t._version for t in [*model.parameters(), *model.buffers()])


UPI_PCA_SIGMA = 0.1
"""Default smoothing noise std of UPI-PCA (pixel units): its rows are gradients at noisy copies ``x + Z``."""


@dataclass
class ObjectiveSettings:
    """How a UPI objective is differentiated, with the one set of defaults every entry point shares.

    :class:`UPIObjective` (the Python API), ``attack.py``'s ``upi_grad`` / ``upi_pca`` sections and the
    ``UPIAttack`` callback (:mod:`upi_lightning.attacks.settings`) all inherit these fields.

    Attributes:
        dissimilarity: ``D``: ``l2``, ``topk_mass`` or ``cosine`` (:func:`map_dissimilarity`).
        surrogate_beta: differentiate a softplus(beta) copy of a model's ``nn.ReLU`` modules
            (:func:`~upi_lightning.surrogate.softplus_surrogate`); a model with none (e.g. a GELU ViT)
            is differentiated as it is. ``null``/``None``: always the model itself, whose ReLU maps have
            no gradient w.r.t. the input.
        sigma: std of the Gaussian smoothing noise ``Z`` in pixel units; ``0`` = no smoothing.
        n_noise: draws of ``Z`` per sample (stacked into one batch), used when ``sigma > 0``.
        keep_prediction: ``lambda >= 0``, weight of the cross-entropy-increase penalty.
    """

    dissimilarity: Dissimilarity = "l2"
    surrogate_beta: float | None = 10.0
    sigma: float = 0.0
    n_noise: int = 1
    keep_prediction: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            (self.dissimilarity in DISSIMILARITIES, f"dissimilarity {self.dissimilarity!r}: {DISSIMILARITIES}"),
            (self.sigma >= 0, f"sigma={self.sigma}: the smoothing noise std must be >= 0 (0 = off)"),
            (self.n_noise >= 1, f"n_noise={self.n_noise}: at least one noise draw per sample"),
            (self.keep_prediction >= 0, f"keep_prediction={self.keep_prediction}: lambda must be >= 0"),
            (
                self.surrogate_beta is None or self.surrogate_beta > 0,
                f"surrogate_beta={self.surrogate_beta}: use None (no surrogate) or a softplus beta > 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UPIError(f"Invalid UPI objective setting: {message}.")

    def objective(self, saliency: SaliencySettings, k: int) -> UPIObjective:
        """The objective of these settings on the given saliency maps (``k``: top-k size of ``topk_mass``)."""
        shared = {f.name: getattr(self, f.name) for f in fields(ObjectiveSettings)}
        return UPIObjective(saliency=saliency, k=k, **shared)


@dataclass
class UPIObjective(ObjectiveSettings):
    """Configuration and evaluation of the UPI objective (see the module docstring for the formula).

    The fields of :class:`ObjectiveSettings` (``dissimilarity``, ``surrogate_beta``, ``sigma``,
    ``n_noise``, ``keep_prediction``), with the same defaults as ``attack.py``, and:

    Attributes:
        saliency: the maps under attack (method, class score and the method's options).
        k: top-k size for ``topk_mass``.

    The softplus surrogate (``surrogate_beta``) is built once per model, refreshed in place when the
    model's weights change (in-place version counters) and rebuilt when they are replaced or move.
    """

    saliency: SaliencySettings = field(default_factory=SaliencySettings)
    k: int = 100
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.saliency, SaliencySettings):
            raise UPIError(f"Invalid UPI objective setting: saliency={self.saliency!r}: give a SaliencySettings.")
        if self.k < 1:
            raise UPIError(f"Invalid UPI objective setting: k={self.k}: the top-k size must be >= 1.")

    def settings(self) -> dict[str, Any]:
        """Return the configuration fields as a plain dict (for reports and perturbation metadata)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init} | {"saliency": asdict(self.saliency)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UPIObjective:
        """Build an objective from a YAML mapping of its fields (``saliency``: a mapping of its fields).

        The flat form of earlier versions (``method``, ``score`` and ``method_kwargs`` beside the other
        fields), which older checkpoints hold, is read too.

        Raises:
            UPIError: on an unknown key or an invalid value.
        """
        config = dict(config)
        saliency = config.pop("saliency", None) or {}
        if isinstance(saliency, Mapping):
            legacy = {key: config.pop(key) for key in ("method", "score") if key in config}
            saliency = {**legacy, **config.pop("method_kwargs", {}), **saliency}
        known = [f.name for f in fields(cls) if f.init]
        if not isinstance(saliency, Mapping) or set(config) - set(known) or set(saliency) - set(SALIENCY_FIELDS):
            raise UPIError(
                f"Invalid UPI objective settings {config} (saliency: {saliency}): use the keys {known}, "
                f"with saliency a mapping of {list(SALIENCY_FIELDS)}."
            )
        return cls(saliency=SaliencySettings(**saliency), **config)

    def network(self, model: nn.Module) -> nn.Module:
        """Return the network the objective differentiates: ``model`` or its cached softplus surrogate.

        ``model`` itself without ``surrogate_beta``, or when it has no ReLU to replace
        (:func:`~upi_lightning.surrogate.surrogate_applies`: e.g. a GELU ViT, smooth already).
        """
        if self.surrogate_beta is None:
            return model
        structure, values = _structure_key(model), _values_key(model)
        cache = self._cache
        if cache.get("structure") != structure:
            surrogate = softplus_surrogate(model, self.surrogate_beta) if surrogate_applies(model) else None
            # the folded pairs are kept beside the surrogate, which a deep copy may strip (softplus_surrogate)
            folded = [] if surrogate is None else cast(list[tuple[str, str]], surrogate.folded_batchnorms)
            cache.update(surrogate=surrogate, structure=structure, folded=folded)
        elif cache["surrogate"] is not None and cache.get("values") != values:
            refold_batchnorm(cache["surrogate"], model, cache["folded"])
        cache["values"] = values
        return model if cache["surrogate"] is None else cache["surrogate"]

    def describe_network(self, model: nn.Module) -> str:
        """Which network :meth:`network` differentiates for ``model``, in words (for fit reports)."""
        if self.network(model) is not model:
            return f"softplus surrogate (beta={self.surrogate_beta:g})"
        if self.surrogate_beta is None:
            return "the model itself (surrogate_beta=None)"
        return "the model itself (no ReLU to make smooth)"

    def clean_maps(self, model: nn.Module, x: Tensor, y: Tensor, cache: SampleCache | None = None) -> Tensor:
        """Compute the detached reference maps :math:`I(x)` ``(N, H, W)`` (on the surrogate if configured).

        With a ``cache``, each distinct sample's map is computed once per cache: use one cache per fit,
        while the model does not change.
        """
        net = self.network(model)

        def compute(images: Tensor, classes: Tensor) -> Tensor:
            return self.saliency.maps(net, images, classes, noise_seed=OBJECTIVE_NOISE_SEED).detach()

        return compute(x, y) if cache is None else cache(compute, x, y)

    def dissimilarity_term(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        delta: Tensor,
        clean_maps: Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        create_graph: bool = False,
        straight_through: bool = False,
    ) -> Tensor:
        r"""Return the smoothed map change ``(N,)``.

        :math:`\frac{1}{m}\sum_j D(I(\mathrm{clip}(x + \delta + Z_j)), I(x))`, ``Z_j ~ N(0, sigma^2 I)``.
        With ``create_graph`` the perturbed maps keep their graph, so the result is differentiable w.r.t.
        ``delta`` (when it requires grad) and the network's parameters. The ``n_noise`` noisy copies form
        one batch of ``N * n_noise`` images (one forward and one backward pass). The noise is keyed by
        sample (:func:`~upi_lightning.noise.sample_normal`: one draw from ``generator`` per call),
        so it does not depend on how the samples are batched or sharded across processes.
        ``straight_through``: clip with :func:`~upi_lightning.threat.straight_through_clip` (see
        :meth:`per_sample`).
        """
        net = self.network(model)
        with evaluation_mode(net), gradients_enabled():
            x, y = _normal_tensor(x), _normal_tensor(y)
            if clean_maps is None:
                clean_maps = self.clean_maps(model, x, y)
            shifted = x + delta
            draws = self.n_noise if self.sigma > 0 else 1
            if self.sigma > 0:
                noise = sample_normal(x, y, draws, generator)
                shifted = shifted.unsqueeze(0) + self.sigma * noise
            batch = clip(shifted.expand(draws, *x.shape).flatten(0, 1), straight_through)
            maps = self.saliency.maps(
                net, batch, y, clean=x, noise_seed=OBJECTIVE_NOISE_SEED, create_graph=create_graph
            )
            references = clean_maps.repeat(draws, 1, 1)
            values = map_dissimilarity(maps, references, self.dissimilarity, self.k)
            return values.view(draws, -1).mean(dim=0)

    def prediction_penalty(
        self, model: nn.Module, x: Tensor, y: Tensor, delta: Tensor, straight_through: bool = False
    ) -> Tensor:
        r"""Return the cross-entropy increase ``(N,)``.

        :math:`\max(0, \mathrm{CE}(f(\mathrm{clip}(x + \delta)), y) - \mathrm{CE}(f(x), y))`, differentiable
        w.r.t. ``delta`` (through a straight-through clip with ``straight_through``).
        """
        net = self.network(model)
        with evaluation_mode(net), gradients_enabled():
            x, y = _normal_tensor(x), _normal_tensor(y)
            with torch.no_grad():
                clean = F.cross_entropy(model_logits(net, x), y, reduction="none")
            perturbed = F.cross_entropy(model_logits(net, clip(x + delta, straight_through)), y, reduction="none")
            return (perturbed - clean).clamp_min(0.0)

    def per_sample(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        delta: Tensor,
        clean_maps: Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        create_graph: bool = False,
        straight_through: bool = False,
    ) -> Tensor:
        r"""Return the per-sample objective :math:`J_i(\delta)` ``(N,)`` of the module docstring.

        Args:
            model: the original classifier (the surrogate, if any, is derived from it).
            x: clean images ``(N, C, H, W)`` in ``[0, 1]``.
            y: classes ``(N,)`` whose maps are attacked (true labels, or predictions).
            delta: ``(C, H, W)`` universal or ``(N, C, H, W)`` per-sample perturbation.
            clean_maps: precomputed :meth:`clean_maps` of ``x`` (recomputed when ``None``).
            generator: random generator of the smoothing noise.
            create_graph: build the perturbed maps with a graph, so the objective can be differentiated
                w.r.t. ``delta`` (make it require grad) or the parameters; off, the maps are detached.
            straight_through: differentiate through :func:`~upi_lightning.threat.straight_through_clip`
                instead of ``torch.clamp``, so that pixels clipped to 0 or 1 still get a gradient. For
                per-sample perturbations and gradients (the per-sample attack, UPI-PCA's rows); UPI-Grad's
                universal ``delta`` keeps the exact gradient of the plain clamp.

        """
        values = self.dissimilarity_term(
            model, x, y, delta, clean_maps, generator, create_graph=create_graph, straight_through=straight_through
        )
        if self.keep_prediction > 0:
            values = values - self.keep_prediction * self.prediction_penalty(model, x, y, delta, straight_through)
        return values
