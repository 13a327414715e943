"""Compare checkpoints' saliency robustness: ``python compare.py --models a=a.ckpt b=b.ckpt`` (``upi-compare``)."""

from upi_lightning.compare_cli import main

if __name__ == "__main__":
    main()
