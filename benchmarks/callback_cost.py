"""Cost of the UPIAttack callback as a fraction of a training epoch (issues 5 and 8).

Runs ``train.py fit`` with the given arguments, ``fit`` left out (default: the MNIST UPIAttack config for 2
epochs), and prints, per epoch, the wall time of every ``UPIAttack.run`` call (fit, evaluation, images, files) and
of the epoch (training, validation and the attack), and their ratio. ``UPIAttack.run`` is wrapped
with a timer for the measurement; nothing else changes.

    OMP_NUM_THREADS=1 python benchmarks/callback_cost.py
    python benchmarks/callback_cost.py --config configs/mnist_upi_callback.yaml --trainer.max_epochs 1
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402

from upi_lightning import callbacks  # noqa: E402
from upi_lightning.cli import train_cli  # noqa: E402

DEFAULT_ARGS = ["--config", str(REPO / "configs" / "mnist_upi_callback.yaml"), "--trainer.max_epochs", "2"]
attack_seconds: dict[int, float] = {}


def timed_run(run: Any) -> Any:
    """Wrap ``UPIAttack.run`` so that each call adds its wall time to its epoch's total."""

    @functools.wraps(run)
    def wrapper(self: callbacks.UPIAttack, trainer: Trainer, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return run(self, trainer, *args, **kwargs)
        finally:
            epoch = trainer.current_epoch
            attack_seconds[epoch] = attack_seconds.get(epoch, 0.0) + time.perf_counter() - started

    return wrapper


class EpochTimer(Callback):
    """Print each epoch's wall time (train start to the end of its validation and attack) and the attack share."""

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        seconds = time.perf_counter() - self.started
        attack = attack_seconds.get(epoch, 0.0)
        print(f"epoch {epoch}: {seconds:.2f} s, UPIAttack {attack:.2f} s ({100 * attack / seconds:.1f}%)", flush=True)


def main() -> None:
    callbacks.UPIAttack.run = timed_run(callbacks.UPIAttack.run)
    cli = train_cli(sys.argv[1:] or DEFAULT_ARGS, run=False)
    # the timer goes last, so that its epoch end follows the UPIAttack's (which attacks at train-epoch end)
    cli.trainer.callbacks.append(EpochTimer())
    cli.trainer.fit(cli.model, cli.datamodule)


if __name__ == "__main__":
    main()
