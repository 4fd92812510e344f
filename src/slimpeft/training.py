"""Fine-tuning with the HuggingFace ``Trainer``: data, collator, callbacks, run directory.

``Trainer`` underneath means the usual launchers work unchanged (``torchrun``, ``accelerate launch`` with DDP,
FSDP or DeepSpeed configs). A run directory holds everything ``slim eval`` / ``slim inspect`` need:

    RUN_DIR/run_config.json      resolved arguments, method config, data sizes, base model path
    RUN_DIR/adapter/             the trained adapter (adapter_config.json + adapter_model.safetensors)
    RUN_DIR/train_log.json       the Trainer's log history (loss, learning rate, ...)
    RUN_DIR/checkpoints/         periodic Trainer checkpoints (the adapter, optimizer, RNG) for --resume
    RUN_DIR/train_args.json      the arguments the run started with (written first; --resume must match them)
    RUN_DIR/tb/                  TensorBoard logs

A run directory that holds a run is never trained into afresh by accident: ``--resume`` continues it (with the
arguments it started with), ``--overwrite`` removes that run's files first; without either, training refuses.

Training data is either task names of the suite (``downstream`` = every downstream task) or a JSONL file of
``{"prompt", "response"}`` / ``{"question", "choices", "answer"}`` records. The loss covers the answer tokens only
(the prompt tokens are masked with -100), as in instruction tuning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data.jsonl import read_jsonl
from .data.tasks import MCExample, build_task, format_generative, format_mc, list_tasks
from .evaluation.multiple_choice import encode_pair
from .model import atomic_write, read_json
from .quantization import QUANTIZE_CHOICES, quantization_config

logger = logging.getLogger("slimpeft")

RUN_CONFIG = "run_config.json"
ADAPTER_DIR = "adapter"
TRAIN_ARGS = "train_args.json"
# what train() and the reports (slim eval / inspect) write into a run directory: --overwrite removes these only
RUN_OUTPUTS = ("checkpoints", "tb", ADAPTER_DIR, RUN_CONFIG, TRAIN_ARGS, "train_log.json", "eval.json",
               "routing.json", "routing.png", "routing_by_task.json")
# arguments that shape the trained weights: a resumed run must continue with the ones it started with
TRAJECTORY_ARGS = ("base", "method", "data", "steps", "batch_size", "lr", "warmup_ratio", "weight_decay",
                   "max_length", "seed", "split_seed", "precision", "quantize")


PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_BACKENDS = ("inductor", "aot_eager")  # torch.compile backends offered by --torch-compile


def compile_backend_error(backend: str) -> str | None:
    """Why ``--torch-compile BACKEND`` is refused (None: empty, i.e. eager, or a backend in COMPILE_BACKENDS)."""
    if backend and backend not in COMPILE_BACKENDS:
        return f"--torch-compile {backend!r}: unknown backend; choose from {', '.join(COMPILE_BACKENDS)}"
    return None

# Why an FSDP run is refused; checked on the arguments (--fsdp-config) and again once the Trainer knows whether
# FSDP is really on (an accelerate FSDP config enables it without the flag).
FSDP_NEEDS_GPUS = ("FSDP needs GPUs (accelerate enables it only on accelerator devices; on CPU the run would silently "
                   "be plain DDP)")
FSDP_NO_L1 = ("FSDP2 reshards the parameters after each forward pass, before SLIM's L1 penalty reads them (torch: "
              "'mixed torch.Tensor and DTensor'); add --set l1_weight=0")


@dataclass
class TrainArgs:
    """Arguments of ``slim train`` (also written, resolved, to RUN_DIR/run_config.json)."""

    base: str = field(default="assets/base", metadata={"help": "base model folder (or a HF id where the Hub is "
                                                                 "reachable)"})
    method: str = field(default="slim", metadata={"help": "slim, lora, dora, mixlora, mixlora-dy, loramoe, mola, "
                                                          "full"})
    data: str = field(default="downstream", metadata={"help": "comma-separated task names, 'downstream', "
                                                              "'general', or a .jsonl file"})
    out: str = field(default="runs/slim", metadata={"help": "run directory"})
    overrides: dict[str, Any] = field(default_factory=dict, metadata={"help": "method config overrides"})
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "sequences per step and device"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW, linear warm-up, cosine decay)"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of the steps spent warming up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_length: int = field(default=128, metadata={"help": "longest training sequence; longer ones are cut, with "
                                                           "a warning that counts them"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data order and task splits"})
    split_seed: int | None = field(default=None, metadata={
        "help": "seed of the task splits alone (which facts are trained on); None: --seed. Runs that differ only "
                "in --seed and are scored on one fixed test split must share it (the benchmarks use 0, the split "
                "they evaluate on), or each seed trains on other facts than the ones it is tested on"})
    save_steps: int = field(default=100, metadata={"help": "steps between checkpoints"})
    logging_steps: int = field(default=10, metadata={"help": "steps between log lines"})
    resume: bool = field(default=False, metadata={"help": "resume from the last complete checkpoint in RUN_DIR, "
                                                          "with the arguments the run started with"})
    overwrite: bool = field(default=False, metadata={"help": "RUN_DIR holds an earlier run: remove its files "
                                                             "(checkpoints, adapter, logs, reports) and start afresh"})
    sync_check_steps: int = field(default=0, metadata={"help": "under several processes: every N steps check that "
                                                              "all ranks hold identical trainable parameters and "
                                                              "buffers (0 = never)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    deepspeed: str = field(default="", metadata={"help": "DeepSpeed JSON config (e.g. configs/deepspeed/zero2.json or "
                                                          "zero3.json); empty: off. See docs/distributed.md"})
    fsdp_config: str = field(default="", metadata={"help": "FSDP JSON config for the Trainer (e.g. "
                                                            "configs/fsdp/fsdp2.json); empty: off"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each decoder layer's activations in backward instead of storing them (less memory, ~1/3 "
                "more compute); SLIM routes the recomputation on the forward's scores"})
    precision: str = field(default="fp32", metadata={
        "help": "fp32, or mixed precision through torch.autocast: bf16 (CPU or GPU) or fp16 (GPU only, with loss "
                "scaling); the weights stay float32 (the Trainer's bf16 / fp16 options). An accelerate config's "
                "mixed_precision applies as well"})
    quantize: str = field(default="", metadata={
        "help": "load the frozen base quantized through bitsandbytes (QLoRA): nf4 or fp4 (4-bit weights, float32 "
                "matmuls) or int8 (LLM.int8()); the adapter stays float32; empty: the base in float32. Needs "
                "pip install 'slimpeft[quant]'; eval and inspect load the base the same way"})
    torch_compile: str = field(default="", metadata={
        "help": "torch.compile backend for training through the Trainer ('inductor': generated kernels; "
                "'aot_eager': traced, no code generation); empty: eager. SLIM compiles to one graph from the second "
                "step on (the first fits the clusters)"})

    def _quantize_errors(self) -> list[str]:
        if not self.quantize:
            return []
        if self.quantize not in QUANTIZE_CHOICES:
            return [f"--quantize {self.quantize!r}: unknown; choose from {', '.join(QUANTIZE_CHOICES)}"]
        errs = []
        if self.method == "full":
            errs.append("--quantize: full fine-tuning cannot train quantized weights; train an adapter on the "
                        "quantized base (any other --method), or drop --quantize")
        errs += [f"--quantize with --{name.replace('_', '-')}: not supported (untested with bitsandbytes layers)"
                 for name in ("deepspeed", "fsdp_config") if getattr(self, name)]
        try:
            quantization_config(self.quantize)
        except ImportError as e:  # bitsandbytes missing: the message names the extra
            errs.append(f"--quantize: {e}")
        return errs

    def validate(self) -> list[str]:
        from . import methods

        errs = []
        if self.method not in methods.available():
            errs.append(f"--method {self.method!r}: unknown; available: {', '.join(methods.available())}")
        for name in ("steps", "batch_size", "max_length", "save_steps", "logging_steps"):
            if getattr(self, name) <= 0:
                errs.append(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.max_length == 1:  # a prompt token and an answer token at the least, or no record has a loss
            errs.append("--max-length must be >= 2 (one prompt token and one answer token), got 1")
        if self.resume and self.overwrite:
            errs.append("--resume and --overwrite exclude each other")
        if self.sync_check_steps < 0:
            errs.append(f"--sync-check-steps must be >= 0, got {self.sync_check_steps}")
        for name in ("deepspeed", "fsdp_config"):
            path = getattr(self, name)
            if path:
                try:
                    read_json(Path(path))
                except (ValueError, OSError) as e:
                    errs.append(f"--{name.replace('_', '-')}: {e}")
        if self.precision not in PRECISIONS:
            errs.append(f"--precision {self.precision!r}: unknown; choose from {', '.join(PRECISIONS)}")
        elif self.precision == "fp16" and not torch.cuda.is_available():
            errs.append("--precision fp16 needs a CUDA GPU (float16 autocast with loss scaling); on a CPU use bf16")
        if (err := compile_backend_error(self.torch_compile)) is not None:
            errs.append(err)
        errs += self._quantize_errors()
        if self.deepspeed and self.fsdp_config:
            errs.append("--deepspeed and --fsdp-config exclude each other")
        if self.fsdp_config and not torch.cuda.is_available():
            errs.append(f"--fsdp-config {self.fsdp_config}: {FSDP_NEEDS_GPUS}")
        if not (0 < self.lr < 1):
            errs.append(f"--lr must lie in (0, 1), got {self.lr}")
        if not (0 <= self.warmup_ratio < 1):
            errs.append(f"--warmup-ratio must lie in [0, 1), got {self.warmup_ratio}")
        if not self.data.endswith(".jsonl"):
            known = set(list_tasks()) | {"downstream", "general"}
            bad = [t for t in self.data.split(",") if t not in known]
            if bad:
                errs.append(f"--data: unknown task(s) {bad}; known: downstream, general, {', '.join(list_tasks())} "
                            "or a .jsonl file")
        elif not Path(self.data).is_file():
            errs.append(f"--data {self.data}: file not found")
        if self.method in methods.available():
            try:
                cfg = methods.make_config(self.method, **self.overrides)
            except (ValueError, TypeError) as e:
                errs.append(f"--set: {e}")
            else:
                if self.fsdp_config and getattr(cfg, "l1_weight", 0) > 0:
                    errs.append(f"--fsdp-config: {FSDP_NO_L1}")
        return errs


# ------------------------------------------------------------------------------------------------ data
def training_examples(data: str, seed: int = 0) -> tuple[list, dict[str, int]]:
    """Examples and per-source sizes for ``data`` (task names, 'downstream', 'general' or a JSONL path).

    Tasks contribute their training Q/A and their ``documents`` (plain statements of the task's facts, as the
    general facts were stated in pretraining), each document once even when several tasks share it.
    """
    if data.endswith(".jsonl"):
        examples = read_jsonl(data)
        return examples, {data: len(examples)}
    names: list[str] = []
    for t in data.split(","):
        names += list_tasks(t) if t in ("downstream", "general") else [t]
    examples: list = []
    documents: dict[str, None] = {}
    sizes = {}
    for name in names:
        task = build_task(name, seed=seed)
        examples += task.train
        documents.update(dict.fromkeys(task.documents))
        sizes[name] = len(task.train)
    if documents:
        sizes["documents"] = len(documents)
    return examples + list(documents), sizes


def prompt_and_answer(example) -> tuple[str, str]:
    if isinstance(example, MCExample):
        prompt, conts = format_mc(example)
        return prompt, conts[example.answer]
    return format_generative(example)


class SupervisedDataset(torch.utils.data.Dataset):
    """Tokenised (prompt, answer, EOS) sequences whose labels mask the prompt, and plain documents (+ EOS) whose
    labels are all their tokens. Over-long Q/A is cut from the left of the prompt (the answer is kept), over-long
    documents from the right; both are counted in ``n_truncated``."""

    def __init__(self, examples: list, tokenizer: Any, max_length: int) -> None:
        self.items: list[dict[str, list[int]]] = []
        self.n_truncated = 0
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for ex in examples:
            if isinstance(ex, str):  # a plain document: the loss covers every token
                full = tokenizer(ex, add_special_tokens=False)["input_ids"]
                ids = full[: max_length - len(eos)] + eos
                self.n_truncated += len(full) + len(eos) > max_length
                self.items.append({"input_ids": ids, "labels": list(ids)})
                continue
            prompt, answer = prompt_and_answer(ex)
            ctx, cont = encode_pair(tokenizer, prompt, answer)
            cont = cont + eos
            if len(ctx) + len(cont) > max_length:
                self.n_truncated += 1
                keep = max(max_length - len(cont), 1)
                ctx, cont = ctx[-keep:], cont[: max_length - keep]
            self.items.append({"input_ids": ctx + cont, "labels": [-100] * len(ctx) + cont})
        if self.n_truncated:
            logger.warning("%d of %d training records were longer than max_length=%d tokens and were cut",
                           self.n_truncated, len(self.items), max_length)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


@dataclass
class PadCollator:
    pad_token_id: int

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"])
            labels[row, :n] = torch.tensor(b["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------------------------ model
def load_base(path: str, dtype: torch.dtype = torch.float32, quantize: str = ""):
    """Base causal LM (:func:`load_causal_lm`) and tokenizer from a folder (offline) or a Hub id."""
    from transformers import AutoTokenizer

    if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError(f"base model {path!r}: no such folder (and the Hub is offline)")
    tok = AutoTokenizer.from_pretrained(path)
    model = load_causal_lm(path, dtype, quantize)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, quantize: str = "", device: str | None = None):
    """A causal LM from a folder or a Hub id; ``quantize`` (nf4, fp4, int8): its linear layers quantized by
    bitsandbytes (slimpeft.quantization), placed on ``device`` (default: this process's GPU, else the CPU).

    transformers' Hub kernels stay off: since transformers 5, with the ``kernels`` package installed (a dependency
    of transformers), a model loaded by default swaps some modules' forward (RMSNorm, rotary embedding) for kernels
    that it downloads from the Hub the first time the model is put in train or eval mode on a GPU -- which fails
    offline, and makes the code a measurement runs depend on what the Hub serves that day."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    no_hub_kernels = {"use_kernels": False} if hasattr(PreTrainedModel, "set_use_kernels") else {}
    if not quantize:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **no_hub_kernels)
    from .quantization import device_map, guard_cpu_repacking, quantization_config

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quantization_config(
        quantize, compute_dtype=dtype), device_map=device_map(device), **no_hub_kernels)
    guard_cpu_repacking(model)
    return model


def _world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if _world()[1] > 1:
        dist.barrier()


@contextmanager
def full_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block every rank sees the full trainable parameters, also where DeepSpeed ZeRO-3 partitions them
    (a collective: every rank must enter). Elsewhere (single process, DDP, ZeRO-1/2) parameters are whole already."""
    parts = [p for p in model.parameters() if p.requires_grad and hasattr(p, "ds_id")]
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts, modifier_rank=None):
        yield


# ------------------------------------------------------------------------------------------------ checkpoints
STAGING_DIR = ".incomplete"  # checkpoints are written under CHECKPOINTS/.incomplete/ and renamed into place


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` and the directories themselves to disk (durable before the rename)."""
    for p in sorted(path.rglob("*"), reverse=True) + [path]:
        _fsync(p)


def checkpoint_step(path: Path) -> int | None:
    """N of a ``checkpoint-N`` directory, None for any other name."""
    name = path.name
    if not name.startswith("checkpoint-") or not name[len("checkpoint-"):].isdigit():
        return None
    return int(name[len("checkpoint-"):])


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint the Trainer finished: ``trainer_state.json``, which it writes last, parses and names this step.
    Renaming into place makes every ``checkpoint-N`` complete; this also refuses ones damaged afterwards or left by a
    writer that was not atomic (an older slimpeft, or a plain ``Trainer``)."""
    try:
        return json.loads((path / "trainer_state.json").read_text()).get("global_step") == checkpoint_step(path)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, AttributeError):
        return False


def last_complete_checkpoint(folder: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in ``folder`` (None when there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted((checkpoint_step(p), p) for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None)
    for _, path in reversed(found):
        if is_complete_checkpoint(path):
            return path
        logger.warning("%s: incomplete checkpoint, skipped", path)
    return None


def _callbacks(args: TrainArgs, sync: RankSync | None):
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        """A steady log line per logging step (nanoGPT style)."""

        def __init__(self) -> None:
            self.t0 = time.perf_counter()

        def on_log(self, targs, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" in logs and state.is_world_process_zero:
                logger.info("step %d | loss %.4f | lr %.2e | %.1f s", state.global_step, float(logs["loss"]),
                            float(logs.get("learning_rate", 0.0)), time.perf_counter() - self.t0)

    class SyncCheck(TrainerCallback):
        def on_step_end(self, targs, state, control, model=None, **kw):
            if sync is not None and state.global_step % args.sync_check_steps == 0:
                with full_parameters(model):
                    sync.check(model, state.global_step)

    return [StepLog(), SyncCheck()]


@dataclass
class RankSync:
    """Checks that every rank holds bit-identical trainable parameters and buffers (SLIM's cluster statistics
    included): rank 0's tensors are broadcast and compared exactly; any difference stops training naming the
    tensors. Enabled by ``--sync-check-steps N`` under several processes."""

    checks: int = 0
    n_params: int = 0
    n_buffers: int = 0
    max_abs_diff: float = 0.0

    def check(self, model: torch.nn.Module, step: int) -> None:
        import torch.distributed as dist

        named = [(n, (p.full_tensor() if hasattr(p, "full_tensor") else p).detach())  # FSDP2: whole tensors
                 for n, p in model.named_parameters() if p.requires_grad]
        self.n_params = len(named)
        bufs = [(n, b) for n, b in model.named_buffers()]
        self.n_buffers = len(bufs)
        named += bufs
        diffs = torch.zeros(len(named), dtype=torch.float64, device=named[0][1].device)  # NCCL: on the GPU
        for i, (_, t) in enumerate(named):
            ref = t.clone()
            dist.broadcast(ref, src=0)
            if t.is_floating_point():
                diffs[i] = (t.double() - ref.double()).abs().max() if t.numel() else 0.0
            else:
                diffs[i] = float(not torch.equal(t, ref))
        dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
        self.checks += 1
        self.max_abs_diff = max(self.max_abs_diff, float(diffs.max()))
        bad = [f"{named[i][0]} (max |diff| {float(diffs[i]):.3g})" for i in torch.nonzero(diffs).flatten().tolist()]
        if bad:
            raise RuntimeError(f"step {step}: the ranks hold different tensors: {', '.join(bad[:10])}")


def _checkpointing_arg(training_arguments: type, on: bool) -> dict[str, bool]:
    """The Trainer's activation-checkpointing switch under its name in this transformers: ``activation_checkpointing``
    since 5.x (``gradient_checkpointing`` is its deprecated alias there, which warns), ``gradient_checkpointing``
    before."""
    from dataclasses import fields as dc_fields

    names = {f.name for f in dc_fields(training_arguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": on}


def _earlier_run(out: Path) -> str | None:
    """What shows that ``out`` holds a run (its run_config, train_args or a complete checkpoint), None if nothing."""
    for name in (RUN_CONFIG, TRAIN_ARGS):
        if (out / name).is_file():
            return name
    ckpt = last_complete_checkpoint(out / "checkpoints")
    return None if ckpt is None else str(ckpt.relative_to(out))


def _refuse_earlier_run(out: Path) -> None:
    """Training afresh into a directory that holds a run would mix its checkpoints with the new ones and replace its
    adapter: refused, naming what to do."""
    if out.is_dir() and (found := _earlier_run(out)) is not None:
        raise ValueError(f"--out {out}: holds an earlier run ({found}); pass --resume to continue it, --overwrite "
                         "to replace it, or choose another --out")


def _remove_earlier_run(out: Path) -> None:
    """--overwrite: remove the earlier run's files (only those, RUN_OUTPUTS), on the first process."""
    if out.is_dir() and _earlier_run(out) is not None and _world()[0] == 0 and int(os.environ.get("RANK", "0")) == 0:
        logger.warning("--overwrite: removing the earlier run in %s", out)
        for name in RUN_OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    _barrier()


def _trajectory(args: TrainArgs, method_config: dict[str, Any]) -> dict[str, Any]:
    return {**{k: getattr(args, k) for k in TRAJECTORY_ARGS}, "method_config": method_config}


def _check_resume(out: Path, now: dict[str, Any]) -> None:
    """--resume continues the run with the arguments it started with (train_args.json): refuse other values of
    those that shape the weights, naming each."""
    path = out / TRAIN_ARGS
    if not path.is_file():  # a run of an older slimpeft, or nothing to resume: nothing to compare
        return
    before = read_json(path)
    diffs = []
    for k, v in now.items():
        old = before.get(k) if isinstance(before, dict) else None
        if k == "method_config" and isinstance(old, dict) and isinstance(v, dict):
            diffs += [f"{k}.{f}={old.get(f)!r} (now {v.get(f)!r})" for f in sorted(set(old) | set(v))
                      if old.get(f) != v.get(f)]
        elif old != v:
            diffs.append(f"{k}={old!r} (now {v!r})")
    if diffs:
        raise ValueError(f"--resume {out}: the run started with other values ({path}): " + ", ".join(diffs)
                         + "; resume with those, or train into another --out")


def train(args: TrainArgs, callbacks: list | None = None) -> Path:
    """Fine-tune ``args.base`` with ``args.method`` on ``args.data``; returns the run directory.

    ``callbacks``: extra ``transformers.TrainerCallback`` objects. A non-finite loss or gradient raises
    ``FloatingPointError`` before the optimizer step, naming the step and the last good checkpoint."""
    from transformers import TrainingArguments

    from . import methods
    from .trainer import SlimTrainer

    errs = args.validate()
    if errs:
        raise ValueError("invalid training arguments:\n  " + "\n  ".join(errs))
    if not args.resume and not args.overwrite:
        _refuse_earlier_run(Path(args.out))  # before anything is loaded: a refused run costs nothing
    split_seed = args.seed if args.split_seed is None else args.split_seed
    examples, sizes = training_examples(args.data, seed=split_seed)  # bad data fails here, before anything is written
    if Path(args.base).exists():  # eval/inspect must find the base from any working directory
        args.base = str(Path(args.base).resolve())
    torch.manual_seed(args.seed)
    base, tok = load_base(args.base, quantize=args.quantize)
    dataset = SupervisedDataset(examples, tok, args.max_length)
    out = Path(args.out)
    model = methods.build(args.method, base, **args.overrides)
    trajectory = json.loads(json.dumps(_trajectory(args, _method_config(model)), default=str))  # as read back
    if args.resume:
        _check_resume(out, trajectory)
    if args.overwrite:
        _remove_earlier_run(out)  # the earlier run's files go only once this one is known to start
    trainable, total = model.get_nb_trainable_parameters()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = not torch.cuda.is_available()
    ckpt_dir = out / "checkpoints"
    fresh = not out.exists()
    targs = TrainingArguments(
        output_dir=str(ckpt_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=int(args.warmup_ratio * args.steps),
        weight_decay=args.weight_decay,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=2,
        seed=args.seed,
        data_seed=args.seed,
        report_to=["tensorboard"],
        use_cpu=cpu,
        ddp_backend="gloo" if (cpu and world > 1) else None,
        # SLIM's cluster buffers are all-reduced inside the layer; broadcasting rank 0's buffers before every
        # forward would hide a rank that drifted (RankSync checks it instead)
        ddp_broadcast_buffers=False,
        remove_unused_columns=False,
        disable_tqdm=not args.progress,
        dataloader_num_workers=0,
        deepspeed=args.deepspeed or None,
        **_checkpointing_arg(TrainingArguments, args.gradient_checkpointing),
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
        torch_compile=bool(args.torch_compile),
        torch_compile_backend=args.torch_compile or None,
        fsdp="full_shard auto_wrap" if args.fsdp_config else None,
        fsdp_config=args.fsdp_config or None,
    )
    # per run, not setdefault: a second train() in the same process would log into the first run's folder
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tb")
    run_config = {"args": asdict(args), "method_config": _method_config(model), "data_sizes": sizes,
                  "n_train": len(dataset), "n_truncated": dataset.n_truncated, "trainable_params": trainable,
                  "total_params": total, "world_size": world}
    sync = RankSync() if (world > 1 and args.sync_check_steps > 0) else None
    trainer = SlimTrainer(model=model, args=targs, train_dataset=dataset, data_collator=PadCollator(tok.pad_token_id),
                          callbacks=_callbacks(args, sync) + list(callbacks or []))
    fsdp_asked = bool(args.fsdp_config) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    refusal = None
    if fsdp_asked and not trainer.is_fsdp_enabled:
        refusal = ValueError(f"FSDP was asked for (--fsdp-config or an accelerate FSDP config): {FSDP_NEEDS_GPUS}")
    elif trainer.is_fsdp_enabled and getattr(getattr(model, "slim_config", None), "l1_weight", 0) > 0:
        refusal = ValueError(FSDP_NO_L1)
    if refusal is not None:
        if fresh:  # the Trainer created the output folder: a refused run leaves nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise refusal
    out.mkdir(parents=True, exist_ok=True)
    if trainer.is_world_process_zero():
        if (ckpt_dir / STAGING_DIR).exists():
            shutil.rmtree(ckpt_dir / STAGING_DIR)  # left by a run killed while writing a checkpoint
        if not (out / TRAIN_ARGS).is_file():  # what a later --resume must match (kept from the run's start)
            atomic_write(out / TRAIN_ARGS, lambda p: Path(p).write_text(json.dumps(trajectory, indent=2,
                                                                                   sort_keys=True)))
    resume_from = last_complete_checkpoint(ckpt_dir) if args.resume else None
    if args.resume and resume_from is not None:
        logger.info("resuming from %s", resume_from)
    elif args.resume:
        logger.warning("--resume: no complete checkpoint in %s; starting from step 0", ckpt_dir)
    run_config["resumed_from"] = str(resume_from) if resume_from else None
    # what autocast really runs ("no", "bf16", "fp16"): --precision, or an accelerate config's mixed_precision
    run_config["mixed_precision"] = str(trainer.accelerator.mixed_precision)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    run_config["train_seconds"] = time.perf_counter() - t0
    if sync is not None:
        run_config["rank_sync"] = asdict(sync)
    with full_parameters(model):  # ZeRO-3: gather the adapter's shards before rank 0 writes it
        if trainer.is_world_process_zero():
            model.save_pretrained(out / ADAPTER_DIR)
        elif trainer.is_fsdp_enabled:
            model.adapter_state_dict()  # FSDP2: gathering the DTensor shards is a collective that rank 0 runs too
    if trainer.is_world_process_zero():
        atomic_write(out / "train_log.json",
                     lambda p: Path(p).write_text(json.dumps(trainer.state.log_history, indent=2)))
        atomic_write(out / RUN_CONFIG,
                     lambda p: Path(p).write_text(json.dumps(run_config, indent=2, sort_keys=True, default=str)))
    _barrier()
    return out


def _method_config(model) -> dict[str, Any]:
    cfg = getattr(model, "slim_config", None) or getattr(model, "method_config", None)
    if cfg is None:
        return {}
    return cfg.to_dict() if hasattr(cfg, "to_dict") else asdict(cfg)


def run_quantize(args: dict[str, Any], where: Path) -> str:
    """The ``quantize`` a run trained its base with ("" for runs of an older slimpeft, which did not quantize)."""
    q = args.get("quantize") or ""
    if q and q not in QUANTIZE_CHOICES:
        raise ValueError(f"{where}: `args.quantize` is {q!r}; expected one of {', '.join(QUANTIZE_CHOICES)}")
    return q


def load_run(run_dir: str | Path):
    """(tuned model in eval mode, tokenizer, run_config) of a run directory written by :func:`train`."""
    from . import methods

    run_dir = Path(run_dir)
    cpath = run_dir / RUN_CONFIG
    if not cpath.is_file():
        raise ValueError(f"{run_dir}: not a run directory (no {RUN_CONFIG})")
    cfg = read_json(cpath)
    args = cfg.get("args") if isinstance(cfg, dict) else None
    if not isinstance(args, dict) or not isinstance(args.get("base"), str) or not isinstance(args.get("method"), str):
        raise ValueError(f"{cpath}: `args.base` and `args.method` must be strings (is this a run directory?)")
    base, tok = load_base(args["base"], quantize=run_quantize(args, cpath))
    model = methods.load(args["method"], base, run_dir / ADAPTER_DIR)
    model.eval()
    return model, tok, cfg
