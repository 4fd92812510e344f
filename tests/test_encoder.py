"""Encoder track: the real all-MiniLM-L6-v2 (installed package, offline), WordNet/FOLDOC data, a few steps."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slimpeft import methods
from slimpeft.bench.encoder import (
    EncoderBenchConfig,
    GeneralProbes,
    general_scores,
    load_encoder,
    method_overrides,
    profile_config,
    retrieval_metrics,
    run_encoder_bench,
)
from slimpeft.data.encoder_tasks import FOLDOC_SUBJECTS, foldoc_classification, gloss_retrieval, synonym_pairs


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()


# ---------------------------------------------------------------------------------------------- data
def test_gloss_retrieval_is_fixed_and_never_names_its_answer():
    a, b = gloss_retrieval(200, seed=0), gloss_retrieval(200, seed=0)
    assert a == b and len(a.queries) == len(a.candidates) == 200
    assert len(set(a.candidates)) == 200
    assert all(w not in q.lower().split() for q, w in zip(a.queries, a.candidates))
    assert gloss_retrieval(200, seed=1).candidates != a.candidates
    with pytest.raises(ValueError, match="`n`=1000000 exceeds"):
        gloss_retrieval(1_000_000)


def test_synonym_pairs_balance_and_same_words():
    s = synonym_pairs(100, seed=0)
    assert s.labels == [1] * 100 + [0] * 100
    pos, neg = s.pairs[:100], s.pairs[100:]
    assert set(pos).isdisjoint(neg)
    assert sorted(w for p in pos for w in p) == sorted(w for p in neg for w in p)  # same words in both classes
    with pytest.raises(ValueError, match="`n`=1 must be an integer >= 2"):
        synonym_pairs(1)


def test_foldoc_split_is_stratified_disjoint_and_seeded():
    d = foldoc_classification(20, 10, seed=0)
    assert d.labels == list(FOLDOC_SUBJECTS)
    assert torch.bincount(torch.tensor(d.train_labels)).tolist() == [20] * 8
    assert torch.bincount(torch.tensor(d.test_labels)).tolist() == [10] * 8
    assert set(d.train_texts).isdisjoint(d.test_texts)
    assert foldoc_classification(20, 10, seed=0) == d
    assert foldoc_classification(20, 10, seed=1).test_texts != d.test_texts
    with pytest.raises(ValueError, match="has .* entries, fewer than n_train"):
        foldoc_classification(5000, 10)
    with pytest.raises(ValueError, match="`n_test`=0"):
        foldoc_classification(10, 0)


# ---------------------------------------------------------------------------------------------- metrics
def test_retrieval_metrics_exact():
    q = torch.eye(3)
    c = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 0.9, 0.1]])
    # query 0: answer first; query 1: answer scores 0, tied with candidate 0 (ties count against) -> rank 3;
    # query 2: answer scores 0.1, below candidate 1's 1.0 -> rank 2
    acc1, mrr = retrieval_metrics(q, c)
    assert acc1 == pytest.approx(1 / 3)
    assert mrr == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)


def test_base_encoder_general_ability_far_above_chance(encoder):
    model, tok = encoder
    probes = GeneralProbes.build(300, 200, seed=0)
    s, chance = general_scores(model, tok, probes), probes.chance()
    # measured: acc@1 0.517, MRR 0.623 (chance 0.0033 / 0.021), synonym AUROC 0.907 (chance 0.5)
    assert s["wordnet_def2word_acc1"] > 0.35 > 50 * chance["wordnet_def2word_acc1"]
    assert s["wordnet_def2word_mrr"] > 0.45
    assert s["wordnet_synonym_auroc"] > 0.8


def test_budgets_match_slim(encoder):
    model, _ = encoder
    cfg = profile_config("quick")
    slim = methods.trainable_budget("slim", model, **cfg.slim)
    for m in ("lora", "dora", "mixlora", "loramoe", "mola"):
        ov = {k: v for k, v in method_overrides(m, model, cfg, 0).items() if k != "seed"}
        gap = abs(methods.trainable_budget(m, model, **ov) - slim)
        # the rank is the closest: one rank step more or less is farther from SLIM's budget
        for r in (ov["r"] - 1, ov["r"] + 1):
            assert abs(methods.trainable_budget(m, model, **{**ov, "r": r}) - slim) >= gap, (m, r)
        # one expert-rank step of the MoE methods is ~6 % of the budget: MixLoRA's closest rank (17) lands 3.5 % above
        assert gap / slim < (0.036 if m == "mixlora" else 0.02), m


def test_config_errors_are_reported_together():
    with pytest.raises(ValueError) as e:
        EncoderBenchConfig(methods=["mixlora", "nope"], steps=0, lr_grid=[], lr_search="all")
    msg = str(e.value)
    for part in ("unknown ['nope']", "`steps`=0", "`lr_grid`=[]", "`lr_search`='all' must be"):
        assert part in msg
    with pytest.raises(ValueError, match="unknown encoder profile 'huge'"):
        profile_config("huge")


# ---------------------------------------------------------------------------------------------- a tiny benchmark
def test_tiny_benchmark_learns_and_writes_schema(tmp_path):
    cfg = EncoderBenchConfig(profile="tiny", methods=["slim", "lora"], steps=12, batch_size=16, n_train=4, n_test=4,
                             n_gloss=60, n_synonym=40, out=str(tmp_path))
    records = run_encoder_bench(cfg)
    assert [r["method"] for r in records] == ["slim", "lora"]
    for r in records:
        assert {"method", "setting", "seed", "downstream", "general", "base_general", "retention",
                "trainable_params", "train_seconds"} <= set(r)
        assert r["setting"] == "main" and r["seed"] == 0
        assert set(r["general"]) == set(r["base_general"]) == {"wordnet_def2word_acc1", "wordnet_def2word_mrr",
                                                                 "wordnet_synonym_auroc"}
        assert r["loss_last"] < r["loss_first"]  # 32 texts seen 6 times: the training loss falls
        assert 0 <= r["downstream"]["foldoc_subject_acc"] <= 1 and math.isfinite(r["retention"])
        assert r["base_downstream"]["foldoc_subject_acc"] > 2 / 8  # class means of the base: above chance (1/8)
        saved = json.loads((tmp_path / "tiny" / f"{r['method']}-seed0.json").read_text())
        assert saved["retention"] == pytest.approx(r["retention"])
    slim, lora = records
    assert abs(slim["trainable_params"] - lora["trainable_params"]) / slim["trainable_params"] < 0.02
    assert 0 <= slim["ood"]["auroc_best"] <= 1 and "ood" not in lora
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert set(summary["methods"]) == {"slim", "lora"}
    assert summary["methods"]["lora"]["retention"]["mean"] == pytest.approx(lora["retention"])
    assert summary["chance"]["foldoc_subject_acc"] == pytest.approx(1 / 8)
    assert (tmp_path / "tiny" / "encoder.png").stat().st_size > 10_000


def test_cli_rejects_unknown_profile():
    from typer.testing import CliRunner

    from slimpeft.cli import app

    res = CliRunner().invoke(app, ["bench", "encoder", "--profile", "huge"])
    assert res.exit_code != 0
    assert "unknown encoder profile 'huge'" in res.output


def test_lr_searched_on_first_seed_then_reused_and_runs_resume(tmp_path, monkeypatch):
    import slimpeft.bench.encoder as enc

    cfg = EncoderBenchConfig(profile="tiny", methods=["lora"], seeds=[0, 1], steps=3, batch_size=8, n_train=3,
                             n_val=2, n_test=2, n_gloss=30, n_synonym=20, lr_grid=[0.5, 2.0], out=str(tmp_path))
    calls: list[tuple[int, float]] = []
    real = enc.train_run

    def counting(method, seed, lr, *a, **k):
        calls.append((seed, lr))
        return real(method, seed, lr, *a, **k)

    monkeypatch.setattr(enc, "train_run", counting)
    first, second = run_encoder_bench(cfg)
    base_lr = cfg.lr["lora"]
    assert calls[:2] == [(0, 0.5 * base_lr), (0, 2.0 * base_lr)]  # the grid, on seed 0's validation split
    assert len(first["lr_validation"]) == 2 and first["lr"] in (0.5 * base_lr, 2.0 * base_lr)
    assert calls[2:] == [(1, first["lr"])]  # seed 1: only the lr chosen on seed 0
    assert second["lr"] == first["lr"] and second["lr_chosen_on_seed"] == 0 and second["lr_validation"] == {}

    # a second call reads the records back and trains nothing
    calls.clear()
    again = run_encoder_bench(cfg)
    assert calls == [] and [r["train_seconds"] for r in again] == [first["train_seconds"], second["train_seconds"]]
    # records of another protocol in the same folder are refused, naming what differs; nothing is overwritten
    before = (tmp_path / "tiny" / "lora-seed0.json").read_text()
    with pytest.raises(ValueError, match=r"lora-seed0.json: record measured under another configuration "
                                         r"\(differs in \['steps'\]\)"):
        run_encoder_bench(EncoderBenchConfig(**{**cfg.__dict__, "steps": 4}))
    assert calls == [] and (tmp_path / "tiny" / "lora-seed0.json").read_text() == before


def test_cli_methods_option_is_validated():
    from typer.testing import CliRunner

    from slimpeft.cli import app

    res = CliRunner().invoke(app, ["bench", "encoder", "--profile", "quick", "--methods", "lora,nope"])
    assert res.exit_code != 0
    assert "unknown ['nope']" in res.output
