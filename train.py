"""Train a classifier with LightningCLI: ``python train.py fit --config configs/mnist.yaml`` (``upi-train``)."""

from upi_lightning.cli import main

if __name__ == "__main__":
    main()
