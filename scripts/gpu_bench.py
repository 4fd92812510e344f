"""The driver of the H200 records under results/speed/h200/ (BENCHMARKS.md section 1, "On a GPU").

`slim bench speed --device cuda --torch-compile inductor` measures the same in one run and writes its record only at
the end; a GPU lent for minutes needs the parts one by one, each written as soon as it ends:

    OUT=results/speed/gpu python scripts/gpu_bench.py infer train eager infer_wide

parts: infer / infer_wide (generation, eager vs compiled with a static KV cache; CUDA graphs on a GPU), train (the
training step eager vs compiled), eager (the whole speed bench without compile). BENCH_DEVICE (default cuda) and
BENCH_REPS (default 5) override the device and the timing rounds."""
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from slimpeft.bench import speed as S

out = Path(os.environ.get("OUT", "results/speed/gpu"))
out.mkdir(parents=True, exist_ok=True)
DEV = os.environ.get("BENCH_DEVICE", "cuda")
args = S.ModelBenchArgs(base="assets/base", reps=int(os.environ.get("BENCH_REPS", 5)), new_tokens=32, wide_layers=2,
                        device=DEV)
parts = sys.argv[1:] or ["infer", "infer_wide", "train", "eager"]
# every model's compiled forward shares transformers' wrapper code object: the parts together exceed dynamo's
# default recompile limit (8), after which it compiles only inner frames (seen in the H200 run: "train" after "infer")
torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)


def summary(rec: dict) -> dict:
    return {n: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if "rounds" not in k}
            for n, r in rec.items()}


def dump(name: str, rec: dict, t0: float) -> None:
    payload = {"result": rec, "seconds": time.perf_counter() - t0, "torch": torch.__version__,
               "device": S.device_name(DEV), "inductor_counters": dict(counters["inductor"]),
               "stats": dict(counters["stats"])}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1, sort_keys=True, default=str))
    print(f"== {name} ({payload['seconds']:.1f} s)", json.dumps(summary(rec), sort_keys=True), flush=True)
    print("   inductor counters:", dict(counters["inductor"]), flush=True)


for part in parts:
    t0 = time.perf_counter()
    if part == "infer":
        dump("infer_compiled", S.infer_compile_benchmark(args, "inductor"), t0)
    elif part == "infer_wide":
        dump("infer_wide_compiled", S.infer_compile_benchmark(args, "inductor", wide=True), t0)
    elif part == "train":
        dump("train_compiled", S.train_compile_benchmark(args, "inductor"), t0)
    elif part == "eager":
        res = S.run_speed_bench(out=out / "speed-cuda.json", device=DEV)
        print(f"== eager bench ({time.perf_counter() - t0:.1f} s)", flush=True)
        S.print_speed_result(res)
