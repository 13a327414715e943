"""Attack a classifier's saliency maps: ``python attack.py --config configs/attack_mnist.yaml --ckpt last.ckpt``."""

from upi_lightning.attack_cli import attack_main
from upi_lightning.errors import run_reporting_errors

if __name__ == "__main__":
    run_reporting_errors(attack_main)
