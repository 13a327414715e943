"""Gather the ``--json`` outputs of the benchmark scripts into one JSON file, keyed by benchmark.

python benchmarks/merge_json.py --output gpu.json parts/*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("parts", nargs="+", help="JSON files written by the scripts' --json option")
    args = parser.parse_args()
    merged: dict[str, object] = {}
    for part in args.parts:
        payload = json.loads(Path(part).read_text())
        merged[Path(part).stem] = payload
    write_json(args.output, merged)
    print(f"{len(merged)} benchmarks -> {args.output}: {', '.join(merged)}")


if __name__ == "__main__":
    main()
