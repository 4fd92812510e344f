"""``make demo``'s job on a tiny base: every configuration trains, is scored before and after, and is written."""

from __future__ import annotations

import json

import pytest

from slimpeft import demo


def test_demo_runs_lora_slim_and_slim_single(tiny_base, tmp_path):
    rows = demo.run_demo(base=str(tiny_base), out=str(tmp_path), steps=2, limit=4)
    assert list(rows) == ["lora", "slim", "slim-single"]
    assert rows["slim"]["overrides"] == demo.SLIM_DEMO
    assert rows["slim-single"]["overrides"]["n_lora_experts"] == 1
    assert rows["slim-single"]["overrides"]["yield_in_training"] is False
    for name, r in rows.items():
        assert (tmp_path / name / "adapter" / "adapter_config.json").is_file()  # each run keeps its adapter
        assert r["retention"] == pytest.approx(r["general_after"] / r["general_before"])
        assert r["trainable_params"] > 0
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved == json.loads(json.dumps(rows))
    assert (tmp_path / "demo.png").stat().st_size > 1000
