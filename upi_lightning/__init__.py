"""upi-lightning: robustness of neural-network interpretations with PyTorch Lightning."""

__version__ = "0.1.0"
