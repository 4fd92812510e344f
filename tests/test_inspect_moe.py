"""`slim inspect` on the MoE-LoRA baselines: no identity experts and no OOD score, so the report carries the expert
load, identity weight 0 and null / "-" for the OOD measures -- and never crashes or writes invalid JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slimpeft.cli import app
from slimpeft.report import LayerRouting, plot_routing, print_routing_table, print_task_routing_table

BASE = Path(__file__).resolve().parents[1] / "assets" / "base"
runner = CliRunner(env={"COLUMNS": "250"})  # rich sizes tables by COLUMNS when not on a terminal
OOD_FIELDS = ("ood_general", "ood_downstream", "flagged_general", "flagged_downstream", "auroc_token",
              "auroc_sequence")


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (not JSON, though Python's json writes and reads them)."""
    def refuse(c: str):
        raise ValueError(f"not JSON: {c}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def moe_run(request, tmp_path_factory):
    """A 2-step run of the method named by indirect parametrisation (built once per method and module)."""
    from slimpeft.training import TrainArgs, train

    if not (BASE / "config.json").is_file():
        pytest.skip("the shipped base model (assets/base) is missing")
    out = tmp_path_factory.mktemp("inspect") / request.param
    train(TrainArgs(base=str(BASE), method=request.param, out=str(out), steps=2, batch_size=4, save_steps=2,
                    progress=False))
    return request.param, out


@pytest.mark.parametrize("moe_run", ["mixlora", "mixlora-dy", "loramoe", "mola"], indirect=True)
def test_inspect_moe_baseline_reports_expert_load(moe_run):
    method, run = moe_run
    res = runner.invoke(app, ["inspect", str(run), "--limit", "1", "--per-task"], terminal_width=250)
    assert res.exit_code == 0, f"{method}: {res.output}\n{res.exception!r}"
    assert "routing: general (G) vs downstream (D)" in res.output and "routing per task" in res.output
    assert "not defined for this method" in res.output  # the "-" cells are explained
    assert "nan" not in res.output.lower()

    png = run / "routing.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = strict_json((run / "routing.json").read_text())
    assert report, f"{method}: no routed layer reported"
    for layer, r in report.items():
        assert sum(r["expert_load"]) == pytest.approx(1.0, abs=1e-5), layer
        assert all(x >= 0 for x in r["expert_load"]) and len(r["expert_load"]) >= 2
        assert r["identity_weight_general"] == 0.0 and r["identity_weight_downstream"] == 0.0  # no identity experts
        assert all(r[k] is None for k in OOD_FIELDS)  # no OOD score: null, not a made-up number

    by_task = strict_json((run / "routing_by_task.json").read_text())
    assert {n.split("/")[0] for n in by_task} == {"general", "downstream"}
    for layers in by_task.values():
        assert set(layers) == set(report)
        for t in layers.values():
            assert t == {"identity_weight": 0.0, "flagged": None, "auroc_vs_downstream": None}


@pytest.mark.parametrize("moe_run", ["mixlora"], indirect=True)
def test_inspect_moe_baseline_without_per_task(moe_run, tmp_path):
    method, run = moe_run
    png = tmp_path / "sub" / "heat.png"
    res = runner.invoke(app, ["inspect", str(run), "--limit", "1", "--png", str(png)], terminal_width=250)
    assert res.exit_code == 0, f"{method}: {res.output}\n{res.exception!r}"
    assert png.stat().st_size > 1000
    strict_json((run / "routing.json").read_text())


@pytest.mark.parametrize("moe_run", ["loramoe"], indirect=True)
def test_loramoe_load_is_the_routing_weight_share(moe_run):
    """LoRAMoE routes densely (every expert takes a slot on every token): the load is the share of the routing weight,
    as in its routing_stats, not the (near-uniform) slot share."""
    from slimpeft.report import collect_by_task, routing_report
    from slimpeft.training import load_run

    _, run = moe_run
    model, tok, _ = load_run(run)
    collected = collect_by_task(model, tok, limit=1)
    report = routing_report(model, tok, collected=collected)
    for layer, r in report.items():
        per_task = [recs[layer] for recs in collected.values()]
        weight = sum(rec["load"].sum(0) for rec in per_task)
        assert r.expert_load == pytest.approx((weight / weight.sum()).tolist(), abs=1e-6)
    stats = model.routing_stats(**tok(["The quick brown fox."], return_tensors="pt"))
    assert set(stats) == set(report)


def test_plot_routing_handles_an_empty_report(tmp_path):
    out = plot_routing({}, tmp_path / "x" / "empty.png")
    assert out.stat().st_size > 0
    print_routing_table({})
    print_task_routing_table({})


def test_plot_routing_handles_ragged_expert_counts_and_missing_measures(tmp_path):
    """MoLA gives lower layers fewer experts; baselines have no AUROC."""
    none = dict.fromkeys(OOD_FIELDS)
    report = {
        "model.layers.0.mlp.up_proj": LayerRouting(0.0, 0.0, **none, expert_load=[0.5, 0.5]),
        "model.layers.1.mlp.up_proj": LayerRouting(0.0, 0.0, **none, expert_load=[0.1, 0.2, 0.3, 0.4]),
    }
    out = plot_routing(report, tmp_path / "ragged.png")
    assert out.stat().st_size > 1000
