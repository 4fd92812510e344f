"""``SlimTrainer``: the HuggingFace ``Trainer`` for slimpeft's models -- adapter-only and atomic checkpoints, and a
stop on a non-finite loss or gradient before the optimizer step. ``slim train`` trains with it; library users pass
it the same arguments as ``transformers.Trainer`` (``from slimpeft import SlimTrainer``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import rotate_checkpoints

from .model import CONFIG_NAME, AdaptedModel
from .training import STAGING_DIR, _barrier, _fsync, _fsync_tree, _world, last_complete_checkpoint, logger


def _holds_adapter(checkpoint: str | os.PathLike | None) -> bool:
    return checkpoint is not None and (Path(checkpoint) / CONFIG_NAME).is_file()


class SlimTrainer(Trainer):
    """The HuggingFace ``Trainer`` for slimpeft's models; a drop-in replacement (same arguments).

    * **Adapter-only checkpoints.** ``checkpoint-N`` and ``save_model()`` hold a SLIM or MoE-baseline model's adapter
      (``adapter_config.json`` + ``adapter_model.safetensors``, as ``save_pretrained`` writes it, loadable with
      ``from_pretrained`` / ``methods.load``) instead of the wrapper's whole state dict with every frozen base weight:
      megabytes instead of the base model's size per checkpoint, as PEFT's models get from the Trainer. Resuming
      and ``load_best_model_at_end`` load it back into the model in place, after checking that method, config,
      layers, shapes and checksum match. Under DeepSpeed ZeRO-3 the adapter comes from the state dict the Trainer
      gathers; under FSDP, and for full fine-tuning and peft's LoRA / DoRA (PEFT models, which the Trainer already
      saves as adapters), the Trainer's own saving is used.
    * **Atomic checkpoints.** Written under ``.incomplete/``, flushed, renamed into place: a kill at any moment
      leaves complete checkpoints only.
    * **A stop on non-finite values.** A nan/inf loss or gradient raises ``FloatingPointError`` before the optimizer
      step, and a checkpoint is never written with non-finite weights (it would replace a good one in the rotation).
    """

    _staging = False
    _warned_outside = False

    def _adapted(self) -> AdaptedModel | None:
        """The adapted model (SLIM, an MoE baseline) behind ``self.model``, outside FSDP (whose state-dict types the
        Trainer saves and loads itself)."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, AdaptedModel) and not self.is_fsdp_enabled else None

    def _saves_adapter_only(self, model: AdaptedModel | None) -> bool:
        """Not when parameters outside the adapter train too (set trainable by hand): an adapter-only checkpoint
        would lose them on resume, so the whole model is checkpointed then (a warning names them once)."""
        if model is None:
            return False
        outside = model.trainable_outside_adapter()
        if outside and not self._warned_outside:
            logger.warning("%d trainable parameter(s) outside the adapter (e.g. %s): checkpoints hold the whole "
                           "model's state dict, not the adapter only", len(outside), outside[:3])
            self._warned_outside = True
        return not outside

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """As the Trainer's, but an adapted model writes its adapter (``state_dict``: the whole model's, gathered by
        DeepSpeed ZeRO-3, from which the adapter's entries are taken)."""
        model = self._adapted()
        if not self._saves_adapter_only(model):
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        logger.info("saving the adapter to %s", output_dir)
        model.save_pretrained(output_dir, state_dict=state_dict)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        adapted = self._adapted()
        if adapted is not None and model in (None, self.model) and _holds_adapter(resume_from_checkpoint):
            logger.info("resuming the adapter from %s", resume_from_checkpoint)
            adapted.load_adapter_checkpoint(resume_from_checkpoint)
            outside = adapted.trainable_outside_adapter()
            if outside:  # set trainable after this adapter-only checkpoint was written: it cannot hold them
                logger.warning("%s holds the adapter only: %d trainable parameter(s) outside it (e.g. %s) resume "
                               "from their current values", resume_from_checkpoint, len(outside), outside[:3])
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # whole state dicts (also older checkpoints)

    def _load_best_model(self) -> None:
        adapted, best = self._adapted(), self.state.best_model_checkpoint
        if adapted is not None and not self.is_deepspeed_enabled and _holds_adapter(best):
            logger.info("loading the best adapter from %s (score: %s)", best, self.state.best_metric)
            adapted.load_adapter_checkpoint(best)
            return
        super()._load_best_model()  # DeepSpeed loads its own checkpoint (module and optimizer)

    def _get_output_dir(self, trial) -> str:
        root = super()._get_output_dir(trial)
        return os.path.join(root, STAGING_DIR) if self._staging else root

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` under ``.incomplete/``, flush it, then rename it into place (atomic on one file
        system), so a kill at any moment leaves only complete checkpoints; then rotate old ones."""
        root = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        bad = [n for n, p in model.named_parameters() if p.requires_grad and not p.isfinite().all()]
        flag = torch.tensor([float(bool(bad))], device=next(model.parameters()).device)  # NCCL: on the GPU
        if _world()[1] > 1:  # shards (ZeRO-3, FSDP) differ between ranks: all stop or none
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not bad:
                bad = ["(a parameter shard of another rank)"]
        if bad:  # never let a checkpoint hold non-finite weights: it would replace a good one in the rotation
            last = last_complete_checkpoint(root)
            raise FloatingPointError(
                f"step {self.state.global_step}: non-finite (nan/inf) values in {', '.join(bad[:5])}: stopped "
                f"without writing {name}; the last good checkpoint is {last}. Lower --lr or check the data.")
        staged, final = root / STAGING_DIR / name, root / name
        if self.args.should_save and staged.exists():
            shutil.rmtree(staged)
        _barrier()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        _barrier()  # every rank has written its part (RNG state per rank)
        self._point_best_at_final(root, staged)
        if self.args.should_save:
            _fsync_tree(staged)
            old = None
            if final.exists():  # re-saving a step (after a resume): move the old one aside first
                old = final.with_name(f"{STAGING_DIR}-old-{name}")
                os.replace(final, old)
            os.replace(staged, final)
            _fsync(root)
            if old is not None:
                shutil.rmtree(old)
            if not any(staged.parent.iterdir()):
                staged.parent.rmdir()
            rotate_checkpoints(output_dir=str(root), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        _barrier()

    def _point_best_at_final(self, root: Path, staged: Path) -> None:
        """The Trainer looks for the best checkpoint in the folder it wrote this one to (the staging folder): there
        it finds only this step's, and records it under its staging path. Point ``best_model_checkpoint`` at the
        checkpoint's final place instead (this one's after the rename, or an earlier one), in the staged
        ``trainer_state.json`` too, so that ``load_best_model_at_end``, the rotation and a resume find it."""
        step = self.state.best_global_step
        if not step:
            return
        best = root / f"checkpoint-{step}"
        if step == self.state.global_step or best.is_dir():
            self.state.best_model_checkpoint = str(best)
            if self.args.should_save:
                self.state.save_to_json(str(staged / TRAINER_STATE_NAME))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        bad = torch.tensor([float(not torch.isfinite(loss).all()),
                            float(bool(grads) and not torch.stack([g.isfinite().all() for g in grads]).all())],
                           device=loss.device)
        if _world()[1] > 1:  # every rank stops together, or the others would wait in the next all-reduce
            import torch.distributed as dist

            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.any():
            what = "loss" if bad[0] else "gradient"
            step = self.state.global_step + 1
            last = last_complete_checkpoint(self.args.output_dir)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
            raise FloatingPointError(
                f"training {what} became non-finite (nan/inf) at step {step}: stopped before the optimizer step; "
                f"{kept}. Lower --lr (or the method's scale, e.g. alpha) or check the data, then run again "
                "(--resume continues from that checkpoint).")
        return loss
