"""``slim bench learning``: one short run per variant, records what it claims, resumes without retraining."""

from __future__ import annotations

import json
import math

import pytest

from slimpeft.bench import learning


def test_learning_bench_records_losses_and_flagged_share_and_resumes(tmp_path, monkeypatch):
    res = learning.run(["lora", "slim", "slim-single/mask"], steps=4, out=tmp_path, log=lambda s: None)
    saved = json.loads((tmp_path / "learning.json").read_text())
    assert set(res) == set(saved) == {"lora", "slim", "slim-single/mask"}
    for name, r in res.items():
        assert r["variant"] == name and r["steps"] == 4 and r["split_seed"] == 0
        assert [s for s, _ in r["curve"]] == [4]  # logged every min(10, steps) steps
        assert math.isfinite(r["final_loss"]) and r["final_loss"] == pytest.approx(r["curve"][-1][1])
    assert res["lora"]["flagged_train"] is None  # no yielding to report
    assert 0.0 <= res["slim"]["flagged_train"] <= 1.0
    assert res["slim"]["overrides"]["router_lr_scale"] == 0.1  # the benchmark's SLIM: the recommended routing
    single = res["slim-single/mask"]  # a SLIM variant of the forgetting bench, trained as SLIM, one override more
    assert single["method"] == "slim-single" and single["overrides"]["n_lora_experts"] == 1
    assert single["overrides"]["mask_mode"] == "fast" and single["overrides"]["router_lr_scale"] == 0.1
    assert single["overrides"]["yield_in_training"] is False
    assert (tmp_path / "learning.png").stat().st_size > 0

    def no_training(*a, **k):
        raise AssertionError("a measured variant was trained again")

    monkeypatch.setattr(learning, "run_variant", no_training)
    again = learning.run(["slim", "lora"], steps=4, out=tmp_path, log=lambda s: None)
    assert again["slim"]["final_loss"] == res["slim"]["final_loss"]
    with pytest.raises(AssertionError, match="trained again"):  # another step count is another measurement
        learning.run(["lora"], steps=5, out=tmp_path, log=lambda s: None)


def test_unknown_variant_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown variant 'slim/nope'.*known: lora"):
        learning.run(["lora", "slim/nope"], steps=2, out=tmp_path, log=lambda s: None)
    assert not (tmp_path / "learning.json").exists()
