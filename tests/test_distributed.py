"""Under torch.distributed the sliding clusters are identical on every rank and equal a single process's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from slimpeft import SlimConfig
from slimpeft.clustering import SlidingClusters


def test_two_ranks_hold_identical_clusters_equal_to_single_process_on_global_batch(tmp_path):
    worker = Path(__file__).with_name("dist_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    for k in r0:
        if k.startswith(("final.", "init.")):
            assert torch.equal(r0[k], r1[k]), k
    assert not torch.equal(r0["batch1"], r1["batch1"])  # the ranks really saw different data
    assert not torch.equal(r0["init.centers"], r0["final.centers"])
    # replay in one process: same starting state, each step on the concatenation of both ranks' batches
    cl = SlidingClusters(16, SlimConfig(r=2, n_clusters=4, cluster_momentum=0.5))
    cl.load_state_dict({k[len("init."):]: v for k, v in r0.items() if k.startswith("init.")})
    for i in (1, 2, 3):
        x = torch.cat([r0[f"batch{i}"], r1[f"batch{i}"]]).reshape(-1, 16)
        k, agg = cl.assign(x)
        cl.update(x, k, agg)
    for name, v in cl.state_dict().items():
        torch.testing.assert_close(v, r0[f"final.{name}"], rtol=1e-5, atol=1e-6, msg=name)
