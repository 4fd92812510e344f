"""``slim``: the command-line face of slimpeft (a thin layer over functions that tests and benchmarks call).

    slim pretrain --out assets/base                      rebuild the shipped base model
    slim data --out data                                 the task suite as JSONL, with sizes
    slim train --method slim --data downstream --out runs/slim
    slim eval runs/slim [--tasks ...] [--harness ...]    accuracy before/after, retention
    slim inspect runs/slim                               per-layer routing report + PNG heatmap
    slim bench layer [--quick] [--json]                  layer / masking speed, side by side
    slim bench speed [--quick] [--json]                  layer, masking, training and generation speed vs LoRA
    slim bench forgetting --profile quick|pareto|seeds|sds|full   learning vs forgetting of every method
    slim bench encoder --profile quick|full              the same on a real encoder (all-MiniLM-L6-v2)
    slim bench learning [--variants a,b]                 training loss of SLIM variants vs LoRA and MixLoRA
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="slim: fine-tune HuggingFace models with SLIM (Soft LoRA + Identity Mixture): learn more, "
                  "forget less.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (each prints a table and writes JSON).")
app.add_typer(bench_app, name="bench")


SHIPPED_BASE = "assets/base"  # the default --base: the shipped base model, relative to the repository root


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` when it wraps a model (LoRA, DoRA):
    # a FutureWarning on every such run that the user can do nothing about
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if Path(SHIPPED_BASE).exists():  # inside the project checkout: never reach for the Hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _resolve_base(base: str) -> str:
    """``--base`` as given, except the default outside the repository root: there it names the checkout's shipped
    base (next to the package's sources, an editable install), or fails with a message -- never a Hub lookup of
    the id 'assets/base'."""
    if base != SHIPPED_BASE or Path(base).exists():
        return base
    shipped = Path(__file__).resolve().parents[2] / SHIPPED_BASE
    if (shipped / "config.json").is_file():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(shipped)
    _fail(f"--base {base}: no such folder in {Path.cwd()}; the shipped base model lives in the repository's "
          f"{SHIPPED_BASE}: run from the repository root, or pass --base with a model folder or a Hub id")
    return base  # not reached: _fail exits


def _parse_set(values: list[str]) -> dict:
    """``--set key=value`` pairs; values are JSON where they parse (numbers, booleans, lists), else strings."""
    out = {}
    for item in values:
        if "=" not in item:
            raise typer.BadParameter(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _json(obj: object, **kw) -> str:
    """Strict JSON: a nan or inf (a measure that does not exist, e.g. an AUROC without both kinds of input) becomes
    null, never the bare NaN that JSON parsers refuse."""
    def clean(v: object) -> object:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), allow_nan=False, **kw)


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg="red", err=True)
    raise typer.Exit(2)


@app.command()
def pretrain(
    out: Annotated[str, typer.Option(help="output folder")] = "assets/base",
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 5000,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch default)")] = 0,
) -> None:
    """Rebuild the shipped base model (tokenizer + small Llama) from the general corpus, seeded."""
    from .pretrain import PretrainArgs
    from .pretrain import pretrain as run

    _setup_logging()
    try:
        path = run(PretrainArgs(out=out, steps=steps, seed=seed, threads=threads))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"base model written to {path}")


@app.command()
def data(
    out: Annotated[str, typer.Option(help="output folder")] = "data",
    seed: Annotated[int, typer.Option(help="seed of the splits")] = 0,
) -> None:
    """Build the task suite from the Debian files: TASK/train.jsonl, test.jsonl, documents.txt and sizes.json."""
    from .data.jsonl import write_jsonl
    from .data.tasks import build_task, list_tasks

    try:  # every task built before anything is written: a missing source leaves no partial suite behind
        built = {name: build_task(name, seed=seed) for name in list_tasks()}
    except FileNotFoundError as e:  # names the Debian package to install
        _fail(str(e))
    sizes = {}
    for name, task in built.items():
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(task.train, folder / "train.jsonl")
        write_jsonl(task.test, folder / "test.jsonl")
        if task.documents:
            (folder / "documents.txt").write_text("\n".join(task.documents) + "\n")
        sizes[name] = {**task.sizes, "documents": len(task.documents), "chance": task.chance, "kind": task.kind}
    (Path(out) / "sizes.json").write_text(json.dumps({"seed": seed, "tasks": sizes}, indent=2, sort_keys=True))
    for name, sz in sizes.items():
        typer.echo(f"{name}: train {sz['train']}, test {sz['test']}, documents {sz['documents']}")


@app.command()
def train(
    out: Annotated[str, typer.Option(help="run directory")],
    method: Annotated[str, typer.Option(help="slim, lora, dora, mixlora, mixlora-dy, loramoe, mola, full")] = "slim",
    base: Annotated[str, typer.Option(help="base model folder or HF id")] = "assets/base",
    data: Annotated[str, typer.Option(help="task names (comma-separated), 'downstream', 'general' or a .jsonl "
                                           "file of prompt/response or question/choices/answer records")
                    ] = "downstream",
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 300,
    batch_size: Annotated[int, typer.Option(help="sequences per step and device")] = 16,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 2e-3,
    max_length: Annotated[int, typer.Option(help="longest sequence in tokens")] = 128,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
    split_seed: Annotated[int | None, typer.Option(help="seed of the task splits (which facts are trained on); "
                                                        "default: --seed")] = None,
    save_steps: Annotated[int, typer.Option(help="steps between checkpoints")] = 100,
    logging_steps: Annotated[int, typer.Option(help="steps between log lines (train_log.json)")] = 10,
    sync_check_steps: Annotated[int, typer.Option(help="under torchrun/accelerate: every N steps check that all "
                                                       "ranks hold identical parameters and buffers (0 = never)")
                                ] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", help="method config override key=value "
                                                      "(repeatable), e.g. --set r=8 --set yield_strength=4")] = None,
    preset: Annotated[str, typer.Option(help="--method slim only: 'paper' (SlimConfig's defaults), 'recommended' "
                                             "(the routing measured best, BENCHMARKS.md section 4), 'single' "
                                             "(recommended + one LoRA expert of rank 128: learned as much as LoRA "
                                             "there) or 'single-head' (single, adapting the output head as well); "
                                             "--set applies on top")] = "paper",
    resume: Annotated[bool, typer.Option(help="resume from the last complete checkpoint in the run directory "
                                              "(with the arguments the run started with)")] = False,
    overwrite: Annotated[bool, typer.Option(help="the run directory holds an earlier run: remove its files "
                                                 "(checkpoints, adapter, logs, reports) and start afresh")] = False,
    deepspeed: Annotated[str, typer.Option(help="DeepSpeed JSON config, e.g. configs/deepspeed/zero3.json "
                                                "(docs/distributed.md)")] = "",
    fsdp_config: Annotated[str, typer.Option(help="FSDP JSON config, e.g. configs/fsdp/fsdp2.json (GPUs only)")] = "",
    gradient_checkpointing: Annotated[bool, typer.Option(help="recompute activations in backward (less memory)")
                                      ] = False,
    precision: Annotated[str, typer.Option(help="fp32, bf16 (mixed precision, CPU or GPU) or fp16 (GPU): "
                                                "torch.autocast through the Trainer, weights kept in float32")
                         ] = "fp32",
    torch_compile: Annotated[str, typer.Option(help="torch.compile backend, 'inductor' (generated kernels) or "
                                                    "'aot_eager'; empty: eager. SLIM compiles to one graph from the "
                                                    "second step on")] = "",
    quantize: Annotated[str, typer.Option(help="QLoRA: the frozen base quantized by bitsandbytes, nf4 / fp4 (4-bit) "
                                               "or int8; the adapter stays float32 (pip install 'slimpeft[quant]')")
                        ] = "",
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Fine-tune a base model with one method; writes the adapter, config, logs and checkpoints to OUT."""
    from .config import PRESETS
    from .training import TrainArgs
    from .training import train as run

    _setup_logging()
    if preset not in PRESETS:
        _fail(f"--preset {preset!r}: unknown; choose from {', '.join(PRESETS)}")
    if preset != "paper" and method != "slim":
        _fail(f"--preset {preset!r} is a SLIM configuration; --method is {method!r}")
    overrides = {**PRESETS[preset], **_parse_set(set_ or [])}
    base = _resolve_base(base)
    args = TrainArgs(base=base, method=method, data=data, out=out, overrides=overrides, steps=steps,
                     batch_size=batch_size, lr=lr, max_length=max_length, seed=seed, split_seed=split_seed,
                     save_steps=save_steps, logging_steps=logging_steps, sync_check_steps=sync_check_steps,
                     resume=resume, overwrite=overwrite, progress=progress,
                     deepspeed=deepspeed, fsdp_config=fsdp_config, precision=precision,
                     gradient_checkpointing=gradient_checkpointing, torch_compile=torch_compile, quantize=quantize)
    errs = args.validate()
    if errs:
        _fail("invalid arguments:\n  " + "\n  ".join(errs))
    try:
        run_dir = run(args)
    except (ValueError, FloatingPointError) as e:
        _fail(str(e))
    typer.echo(f"run written to {run_dir}")


@app.command("eval")
def eval_(
    run_dir: Annotated[str, typer.Argument(help="a run directory (from slim train) or a base model folder")],
    tasks: Annotated[str | None, typer.Option(help="comma-separated task names (default: all)")] = None,
    limit: Annotated[int | None, typer.Option(help="test items per task (default: all)")] = None,
    harness: Annotated[str | None, typer.Option(help="also run these of this project's tasks through "
                                                        "lm-evaluation-harness on the adapted model, offline "
                                                        "(comma-separated, e.g. downstream/foldoc-def, or their "
                                                        "harness names, e.g. slim_downstream_foldoc_def)")] = None,
) -> None:
    """Accuracy per task of the base and the tuned model side by side, with retention (general after / before)."""
    from .data.tasks import list_tasks
    from .evaluation.harness import harness_name
    from .report import compare_accuracy, print_accuracy_table
    from .training import RUN_CONFIG, load_base, load_run, run_quantize

    _setup_logging()
    names = tasks.split(",") if tasks else list_tasks()
    unknown = [n for n in names if n not in list_tasks()]
    if unknown:
        _fail(f"--tasks: unknown {unknown}; known: {', '.join(list_tasks())}")
    if limit is not None and limit <= 0:
        _fail(f"--limit must be > 0 (test items per task), got {limit}; leave it out for all items")
    harness_tasks = None
    if harness:  # checked before any evaluation runs
        ours = {harness_name(n): n for n in list_tasks()}
        harness_tasks = [ours.get(h.strip(), h.strip()) for h in harness.split(",")]
        bad = [h for h in harness_tasks if h not in list_tasks()]
        if bad:
            _fail(f"--harness: unknown task(s) {bad}; the harness runs this project's tasks offline: "
                  f"{', '.join(list_tasks())} (or their harness names, e.g. {harness_name(list_tasks()[0])})")
    path = Path(run_dir)
    if (path / RUN_CONFIG).is_file():
        try:
            model, tok, cfg = load_run(path)
        except ValueError as e:  # a damaged or mismatched adapter: say what and where, write nothing
            _fail(str(e))
        base_model, _ = load_base(cfg["args"]["base"], quantize=run_quantize(cfg["args"], path / RUN_CONFIG))
        summary = compare_accuracy(model, tok, names, base_model=base_model.eval(), limit=limit)
        print_accuracy_table(summary, title=f"{cfg['args']['method']}: base vs tuned ({path})")
        (path / "eval.json").write_text(_json(summary, indent=2, sort_keys=True))
    elif (path / "config.json").is_file():
        from .evaluation.multiple_choice import evaluate_task

        model, tok = load_base(str(path))
        model.eval()
        for n in names:
            typer.echo(f"{n}: {evaluate_task(model, tok, n, limit=limit).accuracy:.3f}")
    else:
        _fail(f"{run_dir}: neither a run directory ({RUN_CONFIG}) nor a model folder (config.json)")
    if harness_tasks:
        from .evaluation.harness import run_harness

        scores = run_harness(_hf_model(model), tok, harness_tasks, limit=limit)
        typer.echo(_json({"harness": scores}, indent=2))


def _hf_model(model):
    """The transformers PreTrainedModel inside a wrapper; adapters injected in place stay active."""
    from transformers import PreTrainedModel

    seen = 0
    while not isinstance(model, PreTrainedModel) and seen < 4:
        model = getattr(model, "base_model", None) or getattr(model, "model", None)
        seen += 1
    if not isinstance(model, PreTrainedModel):
        _fail("this model wraps no transformers PreTrainedModel that lm-evaluation-harness could run")
    return model


@app.command()
def inspect(
    run_dir: Annotated[str, typer.Argument(help="a run directory of a routed method (slim or a MoE baseline)")],
    limit: Annotated[int, typer.Option(help="test items per task used as inputs")] = 100,
    png: Annotated[str | None, typer.Option(help="heatmap path (default RUN_DIR/routing.png)")] = None,
    per_task: Annotated[bool, typer.Option("--per-task", help="also a table per task (identity weight, flagged "
                                                              "share, AUROC vs the downstream tasks) and "
                                                              "RUN_DIR/routing_by_task.json")] = False,
) -> None:
    """Per-layer routing report: identity weight on general vs downstream inputs, expert load, OOD scores, AUROC."""
    from dataclasses import asdict

    from .report import (
        collect_by_task,
        plot_routing,
        print_routing_table,
        print_task_routing_table,
        routing_by_task,
        routing_report,
    )
    from .training import load_run

    _setup_logging()
    if limit <= 0:
        _fail(f"--limit must be > 0 (test items per task), got {limit}")
    try:
        model, tok, _ = load_run(run_dir)
        collected = collect_by_task(model, tok, limit=limit)  # one pass over the test inputs serves both reports
        report = routing_report(model, tok, limit=limit, collected=collected)
        by_task = routing_by_task(model, tok, limit=limit, collected=collected) if per_task else None
    except ValueError as e:
        _fail(str(e))
    print_routing_table(report)
    if by_task is not None:
        print_task_routing_table(by_task)
        (Path(run_dir) / "routing_by_task.json").write_text(_json(
            {n: {k: asdict(v) for k, v in layers.items()} for n, layers in by_task.items()}, indent=2))
    out = Path(png) if png else Path(run_dir) / "routing.png"
    plot_routing(report, out)
    (Path(run_dir) / "routing.json").write_text(_json({k: asdict(v) for k, v in report.items()}, indent=2))
    typer.echo(f"heatmap written to {out}")


@bench_app.command("layer")
def bench_layer(
    quick: Annotated[bool, typer.Option(help="fewer tokens and repetitions")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    out: Annotated[str | None, typer.Option(
        help="JSON output path (default: results/speed/layer.json; layer-quick.json with --quick, layer-cuda*.json on "
             "a GPU: a quick or GPU run never overwrites the full CPU record)")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N (a GPU: synchronised timing, both dispatches)")
                      ] = "cpu",
) -> None:
    """Layer forward+backward (SLIM / base / PEFT LoRA r=128) and fast vs exact DARE masking, side by side."""
    from .bench.speed import print_layer_table, record_path, resolve_device, run_layer_bench

    try:
        dev = resolve_device(device)
    except ValueError as e:
        _fail(str(e))
    path = Path(out) if out is not None else record_path(Path("results/speed"), quick, str(dev), stem="layer")
    result = run_layer_bench(quick=quick, out=path, device=dev)
    if as_json:
        typer.echo(json.dumps(result, sort_keys=True))
    else:
        print_layer_table(result)


@bench_app.command("speed")
def bench_speed(
    quick: Annotated[bool, typer.Option(help="smaller shapes and fewer repetitions (under a minute)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object (every ratio at the top level)")
                       ] = False,
    out: Annotated[str, typer.Option(help="output folder; the record is OUT/speed.json (OUT/speed-quick.json with "
                                          "--quick)")] = "results/speed",
    base: Annotated[str, typer.Option(help="base model folder of the training and inference measurements")
                    ] = "assets/base",
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N; a GPU run writes OUT/speed-cuda.json "
                                             "(synchronised timing, peak memory from torch.cuda)")] = "cpu",
    torch_compile: Annotated[str, typer.Option(help="also time SLIM's and LoRA's training step, and the base's, "
                                                    "LoRA's and SLIM's generation (static KV cache), under "
                                                    "torch.compile with this backend (inductor or aot_eager), eager "
                                                    "and compiled side by side; adds minutes of compilation")] = "",
) -> None:
    """Layer, masking, model training (tokens/s, peak memory) and generation speed of SLIM vs LoRA, the MoE
    baselines, full fine-tuning and the base model, side by side in one run, with the issue-6 targets."""
    from .bench.speed import print_speed_result, record_path, resolve_device, run_speed_bench

    _setup_logging()
    base = _resolve_base(base)
    if not Path(base).is_dir():
        _fail(f"--base {base}: no such model folder")
    try:
        dev = resolve_device(device)
    except ValueError as e:
        _fail(str(e))
    from .training import compile_backend_error

    if (err := compile_backend_error(torch_compile)) is not None:
        _fail(err)
    result = run_speed_bench(quick=quick, out=record_path(Path(out), quick, str(dev)), base=base, device=str(dev),
                             compile_backend=torch_compile)
    if as_json:
        typer.echo(json.dumps(result, sort_keys=True))
    else:
        print_speed_result(result)


@bench_app.command("quantized")
def bench_quantized(
    quick: Annotated[bool, typer.Option(help="one layer, 2 x 64 tokens, 2 rounds (under a minute on a CPU)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object (every ratio at the top level)")
                       ] = False,
    out: Annotated[str, typer.Option(help="output folder; the record is OUT/quantized.json (-quick, -cuda as "
                                          "bench speed's)")] = "results/quantized",
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N")] = "cpu",
) -> None:
    """QLoRA: memory footprint, training memory (footprint + step peak) and training step time of SLIM and LoRA on a
    float32 and an nf4 (bitsandbytes 4-bit) TinyLlama-shaped base, side by side in one run."""
    from .bench.quantized import print_quantized_table, run_quantized_bench
    from .bench.speed import record_path, resolve_device

    _setup_logging()
    try:
        dev = resolve_device(device)
        result = run_quantized_bench(quick=quick, out=record_path(Path(out), quick, str(dev), stem="quantized"),
                                     device=str(dev))
    except (ValueError, ImportError) as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(result, sort_keys=True))
    else:
        print_quantized_table(result)


@bench_app.command("forgetting")
def bench_forgetting(
    profile: Annotated[str, typer.Option(help="quick (~20 min on 2 CPU cores: one seed, MDS), pareto (quick over "
                                              "the whole LR grid), seeds (pareto + 3 seeds + every ablation once, "
                                              "~2 h), sds (one downstream task at a time, seed 0, at each "
                                              "method's lr chosen by the MDS search) or full (400 steps, all test "
                                              "items, 3 seeds, LR grid, SDS, every ablation x 3 seeds)")] = "quick",
    base: Annotated[str, typer.Option(help="base model folder")] = "assets/base",
    out: Annotated[str, typer.Option(help="results folder (records/, summary.json, pareto.png); existing "
                                          "records are kept and not measured again; default results/forgetting "
                                          "(quick, pareto and seeds share it) or results/forgetting-full")] = "",
    methods: Annotated[str, typer.Option(help="comma-separated methods (default: the profile's: all twelve - slim, "
                                              "slim-single, slim-single-head, the seven baselines, lora-head, "
                                              "dora-head - except quick, which leaves out slim-single and "
                                              "dora-head); the summary covers every record in --out")] = "",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the planned runs and exit")] = False,
    quantize: Annotated[str, typer.Option(help="every run on the base quantized by bitsandbytes (nf4, fp4, int8; "
                                               "QLoRA); full fine-tuning left out; use its own --out")] = "",
) -> None:
    """Learning vs forgetting of SLIM and every baseline (MDS/SDS, seeds, LR grid, ablations, Pareto plot)."""
    from .bench.forgetting import run_benchmark

    _setup_logging()
    chosen = [m.strip() for m in methods.split(",") if m.strip()] or None  # None: the profile's methods
    base = _resolve_base(base)
    try:
        out = out or (("results/forgetting-full" if profile == "full" else "results/forgetting")
                      + (f"-{quantize}" if quantize else ""))
        if quantize:
            from .quantization import quantization_config

            quantization_config(quantize)  # an unknown kind or bitsandbytes missing: refused before any work
        run_benchmark(profile, base=base, out=out, methods_=chosen, dry_run=dry_run, log=typer.echo,
                      quantize=quantize)
    except (ValueError, ImportError) as e:
        _fail(str(e))


@bench_app.command("learning")
def bench_learning(
    variants: Annotated[str, typer.Option(help="comma-separated variants (default: all; see "
                                               "slimpeft.bench.learning.VARIANTS)")] = "",
    steps: Annotated[int, typer.Option(help="optimizer steps per run")] = 250,
    lr: Annotated[float, typer.Option(help="learning rate of every run")] = 5e-3,
    seed: Annotated[int, typer.Option(help="training seed")] = 0,
    base: Annotated[str, typer.Option(help="base model folder")] = "assets/base",
    out: Annotated[str, typer.Option(help="results folder (learning.json, learning.png)")] = "results/learning",
) -> None:
    """Training loss of SLIM variants next to LoRA and MixLoRA: where SLIM's learning goes (~2.5 min a variant)."""
    from .bench.learning import run

    _setup_logging()
    base = _resolve_base(base)
    try:
        run([v.strip() for v in variants.split(",") if v.strip()] or None, base=base, steps=steps, lr=lr, seed=seed,
            out=out, log=typer.echo)
    except ValueError as e:
        _fail(str(e))


@bench_app.command("encoder")
def bench_encoder(
    profile: Annotated[str, typer.Option(help="quick (~13 min on 2 CPU cores: one seed) or full (3 seeds, LR grid "
                                              "searched on seed 0's validation split, larger samples; ~2 h)")
                       ] = "quick",
    out: Annotated[str, typer.Option(help="results folder; records, summary.json and encoder.png go to "
                                          "OUT/<profile>/; records already there are read back, not measured "
                                          "again")] = "results/encoder",
    methods: Annotated[str, typer.Option(help="comma-separated methods (default: all seven)")] = "",
) -> None:
    """Learning vs forgetting on the real all-MiniLM-L6-v2 encoder: FOLDOC subjects vs WordNet general probes."""
    from .bench.encoder import run

    _setup_logging()
    try:
        run(profile, out, [m.strip() for m in methods.split(",") if m.strip()] or None)
    except (ValueError, ImportError, FileNotFoundError) as e:
        _fail(str(e))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
