"""Attack a classifier's saliency maps: ``python attack.py --ckpt last.ckpt`` (the ``upi-attack`` command)."""

from upi_lightning.attack_cli import main

if __name__ == "__main__":
    main()
