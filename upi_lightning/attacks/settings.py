"""The attack settings: the schema of ``attack.py``'s ``attack:`` section, shared with the callback.

Plain dataclasses, so ``jsonargparse`` reads them from YAML and the command line, and ``asdict`` writes
them into the report. Values are checked when an object is built, once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from upi_lightning.attacks.engine import Schedule
from upi_lightning.attacks.objective import DISSIMILARITIES, UPI_PCA_SIGMA, Dissimilarity, ObjectiveSettings
from upi_lightning.attribution import check_choice
from upi_lightning.captum_maps import CaptumSaliency
from upi_lightning.errors import UPIError, check_count
from upi_lightning.saliency import SaliencyMaps, SaliencySettings
from upi_lightning.threat import Norm, ThreatModel, threat_model

T = TypeVar("T")

MethodName = Literal["upi_grad", "upi_pca", "random", "per_sample", "uap"]
ALL_METHODS: tuple[MethodName, ...] = ("upi_grad", "upi_pca", "random", "per_sample", "uap")
FITTED_METHODS: tuple[MethodName, ...] = ("upi_grad", "upi_pca", "uap")
"""The methods :func:`fit_method` fits (``random`` is drawn, ``per_sample`` is fitted per evaluated batch)."""
Target = Literal["label", "predicted"]
"""Whose class the maps explain: each sample's true ``label``, or the class the model ``predicted`` for it."""
TARGETS: tuple[Target, ...] = ("label", "predicted")


@dataclass
class Budget:
    """One perturbation budget as YAML names it, ``{norm: l2, eps: 1.0}``: the ball ``||delta||_norm <= eps``.

    Checked once, when built; :attr:`threat` is the threat model the attacks take.
    """

    norm: Norm = "l2"
    eps: float = 1.0

    def __post_init__(self) -> None:
        self.eps = self.threat.eps  # checked (and a float) once, here

    @property
    def threat(self) -> ThreatModel:
        """The threat model the attacks take (rebuilt from ``norm`` and ``eps``; no state of its own)."""
        return threat_model(self.norm, self.eps)

    @property
    def tag(self) -> str:
        """File-name-safe label such as ``l2_eps1``."""
        return self.threat.tag


@dataclass
class UPIGradSettings(ObjectiveSettings):
    """UPI-Grad: projected stochastic gradient ascent (also the objective of the per-sample attack).

    Attributes:
        epochs: passes over the fit samples.
        step_size: base step in pixel units, the same for every budget (``null``: see ``step_scale``).
        step_scale: with ``step_size: null``, the base step as a multiple of each budget's eps
            (``null``: eps/4 for L2, eps/10 for Linf). On the MNIST CNN ``step_scale: 1.0`` with 10
            epochs beat the 2-epoch default at L2 eps 3 and Linf (relative L2 1.36x / 1.10x random
            instead of 1.30x / 1.04x), and tied it at L2 eps 0.5 and 1.
        schedule: ``constant``, ``cosine`` or ``step``.
        cache_clean_maps: compute each fit sample's clean map once, not at every epoch (``H * W`` floats
            per fit sample; same result).
        chunk_size: samples per forward and backward pass, the gradient summed over a batch's chunks (same
            steps; ``null``: the whole batch). An IG or SmoothGrad map stacks ``points x chunk_size`` images:
            on the CPU, ResNet-18 IG/SmoothGrad steps of 16 points cost 1.47-1.51 gradient steps per point with
            32 samples at once and 1.02-1.03 with chunks of 4 (``benchmarks/saliency_attack_cost.py``).
    """

    epochs: int = 2
    step_size: float | None = None
    step_scale: float | None = None
    schedule: Schedule = "cosine"
    cache_clean_maps: bool = True
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_size is not None:
            check_count("upi_grad chunk_size", self.chunk_size)
        if self.step_scale is not None and not self.step_scale > 0:
            raise UPIError(f"step_scale must be > 0 (or null), got {self.step_scale}.")

    def base_step(self, eps: float) -> float | None:
        """The base step for a budget of radius ``eps`` (``None``: the fit's eps-dependent default)."""
        if self.step_size is not None or self.step_scale is None:
            return self.step_size
        return self.step_scale * eps


@dataclass
class UPIPCASettings(ObjectiveSettings):
    """UPI-PCA: top singular vector of the per-sample gradients of the objective.

    Attributes:
        sigma: as in :class:`ObjectiveSettings`, but on by default (:data:`UPI_PCA_SIGMA`): UPI-PCA's rows
            are gradients at noisy copies of the images, exactly zero without noise.
        solver: ``power`` (streaming, memory O(d)) or ``svd`` (exact, holds a d x d matrix).
        n_iter: passes of the streaming solver.
        cache_clean_maps: compute each fit sample's clean map once for all passes (``H * W`` floats per
            fit sample, so the streaming solver's memory then grows with the fit set; same result).
    """

    sigma: float = UPI_PCA_SIGMA
    solver: Literal["power", "svd"] = "power"
    n_iter: int = 20
    cache_clean_maps: bool = False


@dataclass
class BaselineSettings:
    """Baselines shown beside every UPI.

    Attributes:
        random_draws: random universal perturbations of the same norm (mean and std reported).
        per_sample_steps: ascent steps of the per-sample attack (the upper bound).
        per_sample_dissimilarity: ``D`` of the per-sample attack (``null``: UPI-Grad's); ``topk_mass`` is
            Ghorbani et al. (2019)'s top-k attack (the clean top-k mass lost, with the run's ``k``).
        per_sample_restarts: random restarts of the per-sample attack; each sample keeps the best iterate
            of all of them.
        per_sample_hold_label: only iterates that keep the model's prediction count (a sample with none
            gets a zero perturbation), so the attack moves maps, not labels.
        uap_epochs: passes of the classification UAP (clamped cross-entropy).
        uap_clamp: cap of the clamped cross-entropy.
    """

    random_draws: int = 5
    per_sample_steps: int = 20
    per_sample_dissimilarity: Dissimilarity | None = None
    per_sample_restarts: int = 1
    per_sample_hold_label: bool = False
    uap_epochs: int = 2
    uap_clamp: float = 10.0

    def __post_init__(self) -> None:
        checks = [
            (self.random_draws >= 1, f"random_draws={self.random_draws}: draw at least 1"),
            (self.per_sample_steps >= 1, f"per_sample_steps={self.per_sample_steps}: at least 1 step"),
            (
                self.per_sample_restarts >= 1,
                f"per_sample_restarts={self.per_sample_restarts}: at least 1 (1 = a single random start)",
            ),
            (
                self.per_sample_dissimilarity in (None, *DISSIMILARITIES),
                f"per_sample_dissimilarity={self.per_sample_dissimilarity!r}: null or one of {DISSIMILARITIES}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UPIError(f"Invalid baselines setting {message}.")


@dataclass
class MethodSettings:
    """How each method is fitted, on which maps: what ``attack.py`` and the ``UPIAttack`` callback share.

    Attributes:
        saliency: the saliency maps under attack.
        upi_grad: UPI-Grad settings (its objective is also the per-sample attack's).
        upi_pca: UPI-PCA settings.
        baselines: baseline settings.
        k: top-k size of the top-k metrics (and of a ``topk_mass`` objective).
        seed: seeds every random choice (the same seed gives the same perturbations).
        target: the class whose maps are attacked and compared: each sample's true ``label``, or the class
            the model ``predicted`` on the clean image (every fit, the UAP's cross-entropy included, and the
            evaluation; the same classes for the correctly classified samples evaluated by default).
    """

    saliency: SaliencySettings = field(default_factory=SaliencySettings)
    upi_grad: UPIGradSettings = field(default_factory=UPIGradSettings)
    upi_pca: UPIPCASettings = field(default_factory=UPIPCASettings)
    baselines: BaselineSettings = field(default_factory=BaselineSettings)
    k: int = 100
    seed: int = 0
    target: Target = "label"

    def __post_init__(self) -> None:
        check_choice("target", self.target, TARGETS)


@dataclass
class AttackSettings(MethodSettings):
    """Everything an attack run does: the :class:`MethodSettings`, and which budgets, methods and samples.

    Attributes:
        budgets: the (norm, eps) balls to attack in, e.g. ``[{norm: l2, eps: 1.0}, {norm: linf, eps: 0.1}]``.
        methods: which of ``upi_grad``, ``upi_pca``, ``random``, ``per_sample``, ``uap`` to run.
        fit_split: the data module split to fit on: ``attack_fit`` (half of the test set, default) or
            ``train`` (the training split, for fits larger than the test set allows).
        fit_samples: samples of the fit split used to fit (``null`` = all).
        eval_samples: held-out samples evaluated (``null`` = all of attack_eval).
        batch_size: batch size of fitting and evaluation.
        figure_images: images shown in each figure.
        captum: evaluate (and draw) Captum's maps instead of ``saliency``'s
            (:class:`~upi_lightning.captum_maps.CaptumSaliency`, extra ``captum``); the attacks still
            differentiate ``saliency``'s maps.
    """

    budgets: list[Budget] = field(default_factory=lambda: [Budget("l2", 1.0)])
    methods: list[MethodName] = field(default_factory=lambda: list(ALL_METHODS))
    fit_split: Literal["attack_fit", "train"] = "attack_fit"
    fit_samples: int | None = 5000
    eval_samples: int | None = 5000
    batch_size: int = 128
    figure_images: int = 6
    captum: CaptumSaliency | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown or not self.methods:
            raise UPIError(f"Unknown or no attack methods {unknown or self.methods}: choose from {list(ALL_METHODS)}.")
        if not self.budgets:
            raise UPIError("No budget to attack in: give at least one {norm, eps}.")
        check_count("attack batch_size", self.batch_size)
        check_count("attack figure_images", self.figure_images, minimum=0)

    def evaluation_maps(self) -> SaliencyMaps:
        """The maps the metrics and figures compare: :attr:`captum`'s, else :attr:`saliency`'s."""
        return self.saliency if self.captum is None else self.captum


def maps_name(settings: Mapping[str, Any]) -> str:
    """The evaluated maps of :class:`AttackSettings` (as ``asdict``) in file names and titles.

    The saliency method (``gradient``...), or ``captum_<Method>`` when Captum's maps are evaluated.
    """
    captum = settings.get("captum")
    return f"captum_{captum['method']}" if captum else str(settings["saliency"]["method"])


def as_settings(kind: type[T], value: T | Mapping[str, Any] | None) -> T:
    """``value`` as a ``kind`` dataclass (``None``: the defaults; a mapping: its fields)."""
    if value is None:
        return kind()
    return kind(**value) if isinstance(value, Mapping) else value
