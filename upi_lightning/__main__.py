"""``python -m upi_lightning train|attack|compare ...``: the three commands.

The same as ``upi-train``, ``upi-attack`` and ``upi-compare`` (and the repository's ``train.py``,
``attack.py`` and ``compare.py``).
"""

import sys
import warnings
from collections.abc import Callable

from upi_lightning import attack_cli, cli, compare_cli

COMMANDS: dict[str, Callable[[list[str] | None], None]] = {
    "train": cli.main,
    "attack": attack_cli.main,
    "compare": compare_cli.main,
}
USAGE = "usage: python -m upi_lightning {train,attack,compare} [--help | options]"


def main(args: list[str] | None = None) -> None:
    """Run the command named by the first argument with the others."""
    args = sys.argv[1:] if args is None else args
    if not args or args[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        raise SystemExit(0 if args and args[0] in ("-h", "--help") else 2)
    # the arguments come from the command line, which LightningCLI warns about when it is handed them
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    COMMANDS[args[0]](args[1:])


if __name__ == "__main__":
    main()
