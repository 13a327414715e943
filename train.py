"""Train a classifier with LightningCLI: ``python train.py fit --config configs/mnist.yaml``."""

from upi_lightning.cli import train_cli

if __name__ == "__main__":
    train_cli()
