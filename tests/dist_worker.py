"""Run under torchrun (2 ranks, gloo): trains a SlimLinear's clusters on rank-specific data, saves the buffers."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from slimpeft import SlimConfig, SlimLinear


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    layer = SlimLinear(nn.Linear(16, 8), SlimConfig(r=2, n_clusters=4, cluster_momentum=0.5), name="l")
    layer.train()
    g = torch.Generator().manual_seed(100 + rank)  # every rank sees different data
    batches = [torch.randn(2, 10, 16, generator=g) + rank for _ in range(4)]
    with torch.no_grad():
        layer(batches[0])
        after_init = {k: v.clone() for k, v in layer.clusters.state_dict().items()}
        for b in batches[1:]:
            layer(b)
    tensors = {f"final.{k}": v for k, v in layer.clusters.state_dict().items()}
    tensors.update({f"init.{k}": v for k, v in after_init.items()})
    tensors.update({f"batch{i}": b.contiguous() for i, b in enumerate(batches)})
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    dist.barrier()  # leave together: a rank tearing gloo down while another still works has aborted once
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
