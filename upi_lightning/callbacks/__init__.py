"""Lightning callbacks: the UPI attack on the model being trained, saliency images, PGD robust accuracy."""

from upi_lightning.callbacks.robust_accuracy import RobustAccuracy
from upi_lightning.callbacks.saliency_monitor import SaliencyMonitor
from upi_lightning.callbacks.upi_attack import UPIAttack

__all__ = ["RobustAccuracy", "SaliencyMonitor", "UPIAttack"]
