"""``make demo``'s job on a tiny base: every configuration trains, is scored before and after, and is written."""

from __future__ import annotations

import json

import pytest

from slimpeft import demo


def test_demo_runs_lora_slim_and_slim_single_head(tiny_base, tmp_path):
    rows = demo.run_demo(base=str(tiny_base), out=str(tmp_path), steps=2, limit=4)
    assert list(rows) == ["lora", "slim", "lora-head", "slim-single-head"]
    assert rows["slim"]["overrides"] == demo.SLIM_DEMO
    single = rows["slim-single-head"]["overrides"]
    assert single["n_lora_experts"] == 1 and single["yield_in_training"] is False and single["adapt_output_head"]
    assert "target_modules" not in rows["lora"]["overrides"]  # the family's MLP, as SLIM
    assert rows["lora-head"]["overrides"]["target_modules"][-1] == "lm_head"  # as slim-single-head
    head_params = rows["slim-single-head"]["trainable_params"]
    assert abs(rows["lora-head"]["trainable_params"] - head_params) < 0.02 * head_params
    for name, r in rows.items():
        assert (tmp_path / name / "adapter" / "adapter_config.json").is_file()  # each run keeps its adapter
        assert r["retention"] == pytest.approx(r["general_after"] / r["general_before"])
        assert r["trainable_params"] > 0
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved == json.loads(json.dumps(rows))
    assert (tmp_path / "demo.png").stat().st_size > 1000


def test_demo_on_a_quantized_base(tiny_base, tmp_path):
    pytest.importorskip("bitsandbytes")
    from slimpeft.quantization import quantized_layers
    from slimpeft.training import load_run

    rows = demo.run_demo(base=str(tiny_base), out=str(tmp_path), steps=2, limit=4, quantize="nf4")
    assert list(rows) == ["lora", "slim", "lora-head", "slim-single-head"]
    for name, r in rows.items():
        model, _, cfg = load_run(tmp_path / name)
        assert cfg["args"]["quantize"] == "nf4" and quantized_layers(model)  # trained and scored on the 4-bit base
        assert r["retention"] == pytest.approx(r["general_after"] / r["general_before"])
