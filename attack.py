"""Attack a classifier's saliency maps: ``python attack.py --config configs/attack_mnist.yaml --ckpt last.ckpt``."""

from upi_lightning.cli import attack_main, run_reporting_errors

if __name__ == "__main__":
    run_reporting_errors(attack_main)
