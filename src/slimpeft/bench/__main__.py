"""``python -m slimpeft.bench layer|separation|encoder``: speed, routing-separation and encoder-track benchmarks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m slimpeft.bench")
    ap.add_argument("which", choices=["layer", "separation", "encoder"], help="which benchmark to run")
    ap.add_argument("--profile", default="quick", choices=["quick", "full"], help="encoder: run size")
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
    elif a.which == "encoder":
        import logging

        from .encoder import run as run_encoder

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        run_encoder(a.profile, str(a.out) if a.out else None)
    else:
        from .separation import run

        run(a.base, a.batches, a.limit, a.out or Path("results/separation.json"))


if __name__ == "__main__":
    main()
