"""``python -m slimpeft.bench layer|speed|separation|encoder``: speed, routing-separation and encoder benchmarks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m slimpeft.bench")
    ap.add_argument("which", choices=["layer", "speed", "separation", "encoder"], help="which benchmark to run")
    ap.add_argument("--profile", default="quick", choices=["quick", "full"], help="encoder: run size")
    ap.add_argument("--quick", action="store_true", help="layer, speed: smaller shapes and fewer repetitions")
    ap.add_argument("--json", action="store_true", help="layer, speed: print one JSON object instead of tables")
    ap.add_argument("--base", default="assets/base", help="speed, separation: base model folder")
    ap.add_argument("--batches", type=int, default=40, help="separation: training batches that fit the clusters")
    ap.add_argument("--limit", type=int, default=100, help="separation: test items per task")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON output (default under results/: layer.json, layer-quick.json with --quick); speed: "
                         "a folder, the record is OUT/speed.json (OUT/speed-quick.json with --quick); separation: "
                         "results/separation.json at the default --batches/--limit, "
                         "results/separation-b<B>-l<L>.json at any other size")
    a = ap.parse_args()
    if a.which == "layer":
        from .speed import print_layer_table, record_path, run_layer_bench

        result = run_layer_bench(quick=a.quick, out=a.out or record_path(Path("results/speed"), a.quick, stem="layer"))
        if a.json:
            print(json.dumps(result, sort_keys=True))
        else:
            print_layer_table(result)
    elif a.which == "encoder":
        import logging

        from .encoder import run as run_encoder

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        run_encoder(a.profile, str(a.out) if a.out else None)
    elif a.which == "speed":
        from .speed import print_speed_result, record_path, run_speed_bench

        result = run_speed_bench(quick=a.quick, out=record_path(a.out or Path("results/speed"), a.quick), base=a.base)
        if a.json:
            print(json.dumps(result, sort_keys=True))
        else:
            print_speed_result(result)
    else:
        from .separation import run

        # the record BENCHMARKS.md cites comes from the default size; another size writes beside it, never over it
        default = (a.batches, a.limit) == (ap.get_default("batches"), ap.get_default("limit"))
        record = Path("results/separation.json" if default else f"results/separation-b{a.batches}-l{a.limit}.json")
        run(a.base, a.batches, a.limit, a.out or record)


if __name__ == "__main__":
    main()
