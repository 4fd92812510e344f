"""``python -m slimpeft.bench layer [--quick] [--json]``: the layer and masking micro-benchmark."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .speed import print_layer_table, run_layer_bench


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m slimpeft.bench")
    ap.add_argument("which", choices=["layer"], help="which benchmark to run")
    ap.add_argument("--quick", action="store_true", help="smaller token count and fewer repetitions")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--out", type=Path, default=Path("results/speed/layer.json"), help="where to write the JSON")
    a = ap.parse_args()
    result = run_layer_bench(quick=a.quick, out=a.out)
    if a.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print_layer_table(result)


if __name__ == "__main__":
    main()
