"""``python -m slimpeft.bench layer|separation``: speed and routing-separation benchmarks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m slimpeft.bench")
    ap.add_argument("which", choices=["layer", "separation"], help="which benchmark to run")
    ap.add_argument("--quick", action="store_true", help="layer: smaller token count and fewer repetitions")
    ap.add_argument("--json", action="store_true", help="layer: print one JSON object instead of a table")
    ap.add_argument("--base", default="assets/base", help="separation: base model folder")
    ap.add_argument("--batches", type=int, default=40, help="separation: training batches that fit the clusters")
    ap.add_argument("--limit", type=int, default=100, help="separation: test items per task")
    ap.add_argument("--out", type=Path, default=None, help="where to write the JSON (default results/...)")
    a = ap.parse_args()
    if a.which == "layer":
        from .speed import print_layer_table, run_layer_bench

        result = run_layer_bench(quick=a.quick, out=a.out or Path("results/speed/layer.json"))
        if a.json:
            print(json.dumps(result, sort_keys=True))
        else:
            print_layer_table(result)
    else:
        from .separation import run

        run(a.base, a.batches, a.limit, a.out or Path("results/separation.json"))


if __name__ == "__main__":
    main()
