from __future__ import annotations

import pytest

from slimpeft import SlimConfig


def test_defaults_follow_the_paper():
    c = SlimConfig()
    assert (c.n_lora_experts, c.n_identity_experts, c.top_k) == (8, 2, 2)
    assert c.target_modules is None and c.mask_mode == "fast" and c.distance == "max"
    assert c.scaling == pytest.approx(2.0)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"top_k": 11}, r"`top_k`=11 exceeds the number of experts .*= 10\); allowed: 1..10"),
        ({"r": 0}, r"`r`=0 must be >= 1"),
        ({"r": 2.5}, r"`r`=2.5 must be an integer"),
        ({"mask_rate": 1.0}, r"`mask_rate`=1.0 must lie in \[0.0, 1.0\)"),
        ({"mask_rate": -0.1}, r"`mask_rate`=-0.1 must lie in"),
        ({"distance": "l2"}, r"`distance`='l2'; allowed: 'max', 'rms'"),
        ({"mask_mode": "drop"}, r"`mask_mode`='drop'; allowed: 'fast', 'dare', 'none'"),
        ({"inference_mask": "random"}, r"`inference_mask`='random'; allowed: 'fixed', 'none'"),
        ({"yield_strength": -1.0}, r"`yield_strength`=-1.0 must be a finite number >= 0"),
        ({"cluster_momentum": 1.0}, r"`cluster_momentum`=1.0 must lie in"),
        ({"target_modules": []}, r"`target_modules`=\[\] must be"),
        ({"n_lora_experts": 0}, r"`n_lora_experts`=0 must be >= 1"),
        ({"router_lr_scale": 10**400}, r"`router_lr_scale`=1000\d+ must be a finite number > 0"),
        ({"router_lr_scale": 0}, r"`router_lr_scale`=0 must be a finite number > 0"),
        ({"yield_in_training": 1}, r"`yield_in_training`=1 must be true or false"),
        ({"adapt_output_head": "yes"}, r"`adapt_output_head`='yes' must be true or false"),
    ],
)
def test_invalid_fields_name_field_value_and_allowed(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SlimConfig(**kwargs)


def test_all_problems_reported_at_once():
    with pytest.raises(ValueError) as e:
        SlimConfig(r=0, mask_rate=2.0, distance="l1")
    msg = str(e.value)
    assert "`r`=0" in msg and "`mask_rate`=2.0" in msg and "`distance`='l1'" in msg


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"adapter_config.json: unknown SlimConfig field\(s\) \['rank'\]"):
        SlimConfig.from_dict({"rank": 4}, where="adapter_config.json")
    c = SlimConfig(r=4, target_modules=["mlp.up_proj"])
    assert SlimConfig.from_dict(c.to_dict()) == c
