"""Universal perturbations for interpretation (UPI-Grad, UPI-PCA), their baselines and their evaluation."""

from upi_lightning.attacks.baselines import fit_classification_uap, fit_per_sample_attack, random_universal
from upi_lightning.attacks.engine import UPIFitResult, fit_universal, step_size_at
from upi_lightning.attacks.evaluate import evaluate_draws, evaluate_perturbation
from upi_lightning.attacks.objective import Dissimilarity, UPIObjective, map_dissimilarity
from upi_lightning.attacks.pgd import pgd_attack, robust_accuracy
from upi_lightning.attacks.upi_grad import fit_upi_grad, mean_objective
from upi_lightning.attacks.upi_pca import (
    fit_upi_pca,
    per_sample_gradient_rows,
    prediction_gradient_rows,
)
from upi_lightning.distributed import identity
from upi_lightning.threat import L2Ball, LinfBall, ThreatModel, threat_model

__all__ = [
    "Dissimilarity",
    "L2Ball",
    "LinfBall",
    "ThreatModel",
    "UPIFitResult",
    "UPIObjective",
    "evaluate_draws",
    "evaluate_perturbation",
    "fit_classification_uap",
    "fit_per_sample_attack",
    "fit_universal",
    "fit_upi_grad",
    "fit_upi_pca",
    "identity",
    "map_dissimilarity",
    "mean_objective",
    "per_sample_gradient_rows",
    "pgd_attack",
    "prediction_gradient_rows",
    "random_universal",
    "robust_accuracy",
    "step_size_at",
    "threat_model",
]
