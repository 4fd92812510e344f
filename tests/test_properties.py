"""Property-based tests (hypothesis) of the two validators users feed by hand: SlimConfig and the JSONL reader.

Properties: valid configs round-trip and are usable; every invalid field is reported in one error; unknown fields are
named; any JSON value for any field gives a config or a ValueError, never another exception. Records written by
write_jsonl read back equal; any JSON value as a record and any bytes as a file give examples or a ValueError that
names the file and line.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimpeft import SlimConfig
from slimpeft.data.jsonl import parse_record, read_jsonl, write_jsonl
from slimpeft.data.tasks import GenExample, MCExample

FIELDS = [f.name for f in fields(SlimConfig)]
PROFILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

finite = st.floats(min_value=0, max_value=1e6, allow_nan=False)
unit = st.floats(min_value=0, max_value=1, exclude_max=True, allow_nan=False)
names = st.text(st.characters(whitelist_categories=("Ll", "Nd"), whitelist_characters="._"), min_size=1, max_size=12)
VALID = {
    "r": st.integers(1, 64), "alpha": finite, "n_lora_experts": st.integers(1, 16),
    "n_identity_experts": st.integers(0, 4), "n_clusters": st.integers(1, 64), "cluster_momentum": unit,
    "distance": st.sampled_from(["max", "rms"]), "ood_score": st.sampled_from(["paper", "calibrated", "standardized"]),
    "threshold_std": finite, "ood_pooling": st.sampled_from(["token", "sequence", "causal"]),
    "ood_source": st.sampled_from(["own", "first"]), "yield_strength": finite, "mask_rate": unit,
    "mask_mode": st.sampled_from(["fast", "dare", "none"]), "mask_rescale": st.booleans(),
    "inference_mask": st.sampled_from(["fixed", "none"]), "l1_weight": finite, "router_init_std": finite,
    "seed": st.integers(0, 2**31), "target_modules": st.none() | names | st.lists(names, min_size=1, max_size=3),
}
# for each field, values that are wrong whatever the other fields are
INVALID = {
    "r": st.integers(max_value=0) | st.just(2.5) | st.just("4") | st.just(True),
    "alpha": st.floats(max_value=-1e-9) | st.just(math.nan) | st.just(math.inf) | st.just(10**400) | st.just("2"),
    "n_lora_experts": st.integers(max_value=0) | st.just(None), "n_identity_experts": st.integers(max_value=-1),
    "top_k": st.integers(max_value=0), "n_clusters": st.integers(max_value=0) | st.just([4]),
    "cluster_momentum": st.floats(min_value=1) | st.floats(max_value=-1e-9) | st.just(math.nan),
    "distance": st.text(max_size=5).filter(lambda s: s not in ("max", "rms")),
    "ood_score": st.just("fixed") | st.just(None), "ood_pooling": st.just("batch"), "ood_source": st.just(1),
    "threshold_std": st.just(-1.0), "yield_strength": st.just(math.inf), "mask_rate": st.floats(min_value=1),
    "mask_mode": st.just("random"), "mask_rescale": st.just(1) | st.just("yes"), "inference_mask": st.just(""),
    "l1_weight": st.floats(max_value=-1e-9), "router_init_std": st.just(-0.02), "seed": st.integers(max_value=-1),
    "target_modules": st.just([]) | st.just([""]) | st.just(3) | st.just({"a": 1}),
}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


@PROFILE
@given(st.fixed_dictionaries({}, optional=VALID), st.data())
def test_valid_configs_round_trip_and_are_usable(kw, data):
    n_experts = kw.get("n_lora_experts", 8) + kw.get("n_identity_experts", 2)
    kw["top_k"] = data.draw(st.integers(1, n_experts))
    c = SlimConfig(**kw)
    assert c.validate() == []
    assert math.isfinite(c.scaling) and c.n_experts == n_experts
    assert SlimConfig.from_dict(json.loads(c.to_json())) == c


@PROFILE
@given(st.lists(st.sampled_from(sorted(INVALID)), min_size=1, max_size=6, unique=True), st.data())
def test_every_invalid_field_is_reported_in_one_error(bad, data):
    kw = {name: data.draw(INVALID[name], label=name) for name in bad}
    try:
        SlimConfig(**kw)
    except ValueError as e:
        msg = str(e)
    else:
        raise AssertionError(f"accepted {kw}")
    for name in bad:
        assert f"`{name}`=" in msg, (name, msg)


@PROFILE
@given(st.dictionaries(st.text(min_size=1, max_size=10).filter(lambda k: k not in FIELDS), json_values, min_size=1,
                       max_size=3),
       st.fixed_dictionaries({}, optional={k: VALID[k] for k in ("r", "alpha", "mask_rate")}))
def test_from_dict_names_every_unknown_field(unknown, known):
    try:
        SlimConfig.from_dict({**known, **unknown}, where="cfg.json")
    except ValueError as e:
        msg = str(e)
    else:
        raise AssertionError("unknown fields accepted")
    assert msg.startswith("cfg.json: unknown SlimConfig field(s) ")
    for k in unknown:
        assert repr(k) in msg


@PROFILE
@given(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5))
def test_any_json_value_for_any_field_gives_a_config_or_valueerror(d):
    try:
        c = SlimConfig.from_dict(d, where="cfg.json")
    except ValueError as e:
        assert str(e).startswith("cfg.json: ")
        return
    assert c.validate() == [] and math.isfinite(c.scaling)
    assert SlimConfig.from_dict(json.loads(c.to_json())) == c


# ------------------------------------------------------------------------------------------------ data readers
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
gen_examples = st.builds(GenExample, texts, texts)
mc_examples = st.integers(2, 5).flatmap(
    lambda n: st.builds(MCExample, texts, st.tuples(*[texts] * n), st.integers(0, n - 1)))


@PROFILE
@given(st.lists(gen_examples | mc_examples, min_size=1, max_size=8))
def test_written_jsonl_reads_back_equal(tmp_path_factory, examples):
    path = write_jsonl(examples, tmp_path_factory.mktemp("rt") / "d.jsonl")
    assert read_jsonl(path) == examples


@PROFILE
@given(json_values)
def test_any_json_value_parses_to_an_example_or_a_valueerror_naming_where(value):
    try:
        ex = parse_record(value, "f.jsonl:7")
    except ValueError as e:
        assert str(e).startswith("f.jsonl:7: ")
        return
    assert isinstance(ex, (GenExample, MCExample)) and parse_record(ex.to_dict(), "x") == ex


@PROFILE
@given(st.lists(st.binary(max_size=30) | st.sampled_from([b'{"prompt": "a", "response": "b"}', b"", b"\xef\xbb\xbf",
                                                          b'{"question": "q", "choices": ["a", "b"], "answer": 1}']),
                max_size=6))
def test_any_bytes_give_examples_or_a_valueerror_naming_the_file(tmp_path_factory, lines):
    path: Path = tmp_path_factory.mktemp("fz") / "d.jsonl"
    path.write_bytes(b"\n".join(lines))
    try:
        examples = read_jsonl(path)
    except ValueError as e:
        assert re.match(rf"{re.escape(str(path))}(:\d+)?: ", str(e)), str(e)
        return
    assert examples and all(isinstance(ex, (GenExample, MCExample)) for ex in examples)
