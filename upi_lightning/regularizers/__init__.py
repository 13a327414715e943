r"""Training modes of :class:`~upi_lightning.module.Classifier`: terms added to the clean cross-entropy.

The training loss of a batch is

.. math::

    L = \frac1N \sum_i \mathrm{CE}(f(x_i), y_i) + \sum_r R_r,

one term :math:`R_r` per regularizer of ``Classifier(regularizers=[...])`` (they compose by summation).
A regularizer is a small object: :meth:`Regularizer.__call__` returns its term from a
:class:`TrainingBatch` (the clean forward pass is shared by all terms), and hooks let it keep state
across steps (the UPI ``delta``), write that state into checkpoints and log to TensorBoard.

* :class:`InputGradientNorm`: double backprop (Ross & Doshi-Velez 2018).
* :class:`InterpretationRegularization`: alignment with a teacher's SmoothGrad maps (Noack et al. 2021).
* :class:`UPIAdversarial`: stability of the saliency maps under a running universal perturbation.
* :class:`Consistency`: adversarial training with a feature-consistency loss (Dong et al. 2017).
* :class:`PGDAdversarial`: PGD adversarial training (Madry et al. 2018).
* :class:`IGNorm`, :class:`IGSumNorm`: integrated gradients of the loss at the worst point of the ball
  (Chen et al. 2019).
* :class:`GradientConsistency`: input gradients that agree under small noise (Joo et al. 2023).
* :class:`AttributionalAdversarial`: PGD training with aligned attributions (Wang & Kong 2022).
* :class:`SmoothSurfaceRegularization`: the largest input curvature of the loss (SSR, Wang et al. 2020).

Which forward pass is differentiated: the input-gradient terms (:class:`InputGradientNorm`,
:class:`InterpretationRegularization`, :class:`GradientConsistency`, :class:`SmoothSurfaceRegularization`)
differentiate the clean training-mode forward pass itself (``torch.autograd.grad(..., create_graph=True)``,
no extra forward).
With BatchNorm in training mode a sample's logits depend on the whole batch, so those gradients are
those of the batch-level loss, which is still a well-defined differentiable objective; for networks
without BatchNorm they are exactly the per-sample gradients. The UPI, IG and attribution terms and the
PGD attacks use the eval-mode model (the shared saliency and attack code), like the attacks they defend
against. Every term keeps the clean cross-entropy in the loss, so every parameter receives a gradient
(no unused parameters under DDP).

Layout: the plug-in contract (:class:`TrainingBatch`, :class:`Regularizer`, configs, :data:`CHECKPOINT_KEY`)
is :mod:`upi_lightning.regularizers.base`; each training mode has its own module, and this package
re-exports every public name, so configs and checkpoints name the classes ``upi_lightning.regularizers.<Class>``.

Checkpoints: regularizers are not ``nn.Module`` children of the classifier, so their state never
enters ``state_dict`` (a plain ``Classifier`` loads a regularized checkpoint strictly); the classifier
stores their :meth:`Regularizer.state_dict` under :data:`CHECKPOINT_KEY` and their primitive
:meth:`Regularizer.config` in its hyperparameters.
"""

from upi_lightning.errors import check_count
from upi_lightning.regularizers.adversarial import AdversarialExamples, PGDAdversarial
from upi_lightning.regularizers.attributional_adversarial import AttributionalAdversarial
from upi_lightning.regularizers.base import (
    CHECKPOINT_KEY,
    BallRegularizer,
    Regularizer,
    TrainingBatch,
    build_regularizers,
    check_weight,
    class_path,
    log_keys,
    per_sample_squared_norm,
    regularizer_from_config,
    true_class_input_gradient,
)
from upi_lightning.regularizers.consistency import Consistency
from upi_lightning.regularizers.gradient_consistency import GradientConsistency
from upi_lightning.regularizers.ig_norm import IGNorm, IGSumNorm, ig_loss_l1
from upi_lightning.regularizers.input_gradient import InputGradientNorm
from upi_lightning.regularizers.interpretation import (
    TEACHER_CHUNK,
    InterpretationRegularization,
    load_teacher,
    threshold_beyond_one_std,
)
from upi_lightning.regularizers.smooth_surface import (
    SSR_WEIGHT,
    SmoothSurfaceRegularization,
    input_fisher_top_eigenvalue,
)
from upi_lightning.regularizers.upi_adversarial import UPIAdversarial

__all__ = [
    "CHECKPOINT_KEY",
    "SSR_WEIGHT",
    "TEACHER_CHUNK",
    "AdversarialExamples",
    "AttributionalAdversarial",
    "BallRegularizer",
    "Consistency",
    "GradientConsistency",
    "IGNorm",
    "IGSumNorm",
    "InputGradientNorm",
    "InterpretationRegularization",
    "PGDAdversarial",
    "Regularizer",
    "SmoothSurfaceRegularization",
    "TrainingBatch",
    "UPIAdversarial",
    "build_regularizers",
    "check_count",
    "check_weight",
    "class_path",
    "ig_loss_l1",
    "input_fisher_top_eigenvalue",
    "load_teacher",
    "log_keys",
    "per_sample_squared_norm",
    "regularizer_from_config",
    "threshold_beyond_one_std",
    "true_class_input_gradient",
]
