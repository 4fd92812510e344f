"""Run under torchrun (2 ranks, gloo): SLIM on a tiny Llama whose decoder layers and root are sharded with FSDP2
(``fully_shard``: base weights and adapter parameters become DTensor shards); 3 AdamW steps, each rank on its half of
a global batch (argv[2]: JSON of further SlimConfig fields); writes the losses of both halves and the adapter
gathered from the shards (rank 0)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import tiny_llama
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

from slimpeft import SlimConfig
from slimpeft.model import get_slim_model

# l1_weight=0: the L1 penalty reads the parameters after the forward pass, when FSDP2 has resharded them
CONFIG = {"r": 2, "n_clusters": 2, "l1_weight": 0.0, "target_modules": ["mlp.up_proj", "mlp.down_proj"]}
STEPS, LR = 3, 1e-2


def global_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 97, (4, 12), generator=g) for _ in range(STEPS)]


def main(out: Path, extra: dict) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    base = tiny_llama()
    model = get_slim_model(base, SlimConfig(**CONFIG, **extra))
    for layer in base.model.layers:
        fully_shard(layer)
    fully_shard(base)
    sharded = type(base.model.layers[0].mlp.up_proj.experts.lora_A).__name__
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    torch.manual_seed(1)  # the DARE masks: same draws on every rank and in the single-process replay
    losses = []
    for ids in global_batches():
        mine = ids[rank * 2: (rank + 1) * 2]  # equal token counts: the mean of the two halves is the global mean
        loss = model(input_ids=mine, attention_mask=torch.ones_like(mine), labels=mine).loss
        loss.backward()  # FSDP2 averages the gradients over the ranks
        opt.step()
        opt.zero_grad()
        both = torch.stack([loss.detach()])
        dist.all_reduce(both)
        losses.append(float(both) / dist.get_world_size())
    tensors = model.adapter_state_dict()  # collective: gathers the DTensor shards
    if rank == 0:
        save_file(tensors, str(out / "adapter.safetensors"))
        (out / "result.json").write_text(json.dumps({"losses": losses, "param_type": sharded}))
    dist.barrier()  # leave together: a rank tearing gloo down while another still works has aborted once
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
