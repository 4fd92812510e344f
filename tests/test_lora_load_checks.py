"""LoRA and DoRA (peft) adapters: a SHA-256 of the tensors is recorded on saving (in the weights file's header, so
that adapter_config.json stays exactly peft's), and everything is checked - with the base model untouched - before
peft loads them: damaged/tampered files and base models that do not fit are refused with a ValueError naming the
file and the key."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from slimpeft import methods
from slimpeft.methods.peft_lora import CHECKSUM_KEY
from slimpeft.model import safetensors_metadata, tensors_sha256

H, INTER = 32, 64
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
METHODS = ["lora", "dora"]


def tiny_llama(n_layers: int = 2, inter: int = INTER):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=H, intermediate_size=inter, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _perturb(model) -> None:
    """Non-zero LoRA B (and a changed DoRA magnitude) so that the adapter changes the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _checksum(path: Path) -> str | None:
    return safetensors_metadata(path / WEIGHTS).get(CHECKSUM_KEY)


def _save(method: str, path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = methods.build(method, tiny_llama(), r=4, alpha=8.0)
    _perturb(model)
    model.save_pretrained(path)
    return _logits(model, ids)


def _snapshot(base) -> dict:
    return {"types": {n: type(m) for n, m in base.named_modules()},
            "state": {k: v.clone() for k, v in base.state_dict().items()},
            "grad": {n: p.requires_grad for n, p in base.named_parameters()}}


def _assert_unchanged(base, snap: dict) -> None:
    assert type(base.model.layers[0].mlp.down_proj) is torch.nn.Linear  # no peft layer injected
    assert {n: type(m) for n, m in base.named_modules()} == snap["types"]
    state = base.state_dict()
    assert state.keys() == snap["state"].keys()
    assert all(torch.equal(v, state[k]) for k, v in snap["state"].items())
    assert {n: p.requires_grad for n, p in base.named_parameters()} == snap["grad"]


def _refused(method: str, base, path: Path, match: str) -> str:
    snap = _snapshot(base)
    with pytest.raises(ValueError, match=match) as e:
        methods.load(method, base, path)
    _assert_unchanged(base, snap)
    return str(e.value)


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_records_the_checksum_and_gives_identical_logits(method, ids, tmp_path):
    before = _save(method, tmp_path, ids)
    text = (tmp_path / CONFIG).read_text()
    meta = json.loads(text)
    assert text == json.dumps(meta, indent=2, sort_keys=True)  # still peft's layout: sorted keys
    assert "weights_sha256" not in meta  # the config is peft's alone
    tensors = load_file(tmp_path / WEIGHTS)
    assert _checksum(tmp_path) == tensors_sha256(tensors) and len(_checksum(tmp_path)) == 64
    assert safetensors_metadata(tmp_path / WEIGHTS)["format"] == "pt"  # peft's own metadata kept
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = methods.load(method, tiny_llama(), tmp_path)
        plain = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))  # what a user of plain peft does
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)], [str(w.message) for w in caught]
    assert isinstance(loaded, PeftModel) and not loaded.training
    assert torch.equal(_logits(loaded, ids), before)
    assert torch.equal(_logits(plain, ids), before)
    assert not torch.equal(before, _logits(tiny_llama(), ids))  # the adapter does change the outputs
    # a loaded adapter saved again records the checksum too (and loads back the same)
    loaded.save_pretrained(tmp_path / "again")
    assert _checksum(tmp_path / "again") == _checksum(tmp_path)
    assert torch.equal(_logits(methods.load(method, tiny_llama(), tmp_path / "again"), ids), before)


@pytest.mark.parametrize("method", METHODS)
def test_wrong_width_base_is_refused_naming_file_key_and_shapes(method, ids, tmp_path):
    _save(method, tmp_path, ids)
    msg = _refused(method, tiny_llama(inter=128), tmp_path, r"adapter_model\.safetensors: the saved adapter does "
                   r"not fit this base model")
    first = msg.splitlines()[1]
    assert "base_model.model.model.layers.0.mlp." in first
    assert "(64, 4) in the adapter, expected (128, 4)" in msg or "(4, 64) in the adapter, expected (4, 128)" in msg
    if method == "dora":
        assert "lora_magnitude_vector: (64,) in the adapter, expected (128,)" in msg


@pytest.mark.parametrize("method", METHODS)
def test_base_with_fewer_layers_is_refused(method, ids, tmp_path):
    _save(method, tmp_path, ids)
    msg = _refused(method, tiny_llama(n_layers=1), tmp_path, r"adapter_model\.safetensors: .*does not fit")
    assert "the base model has no module model.layers.1.mlp." in msg


@pytest.mark.parametrize("method", METHODS)
def test_base_layers_left_without_tensors_are_refused(method, ids, tmp_path):
    # plain peft, suffix targets: a deeper base would get layer 2 adapted with fresh (untrained) tensors
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"],
                                                 use_dora=method == "dora"))
    pm.save_pretrained(tmp_path)
    assert "weights_sha256" not in json.loads((tmp_path / CONFIG).read_text())
    msg = _refused(method, tiny_llama(n_layers=3), tmp_path, r"adapter_model\.safetensors: .*does not fit")
    assert "missing tensor base_model.model.model.layers.2.mlp.down_proj.lora_A.weight" in msg


@pytest.mark.parametrize("method", METHODS)
def test_tampered_weights_are_refused_by_the_checksum(method, ids, tmp_path):
    _save(method, tmp_path, ids)
    w = tmp_path / WEIGHTS
    b = bytearray(w.read_bytes())
    b[-4] ^= 1  # one mantissa bit of the last float: still a well-formed file with the right shapes
    w.write_bytes(bytes(b))
    _refused(method, tiny_llama(), tmp_path, r"adapter_model\.safetensors: SHA-256 of the tensors differs from "
             r"`slimpeft_tensors_sha256` in the file's header")


@pytest.mark.parametrize("method", METHODS)
def test_older_slimpeft_checksum_in_the_config_is_still_checked(method, ids, tmp_path):
    before = _save(method, tmp_path, ids)
    save_file(load_file(tmp_path / WEIGHTS), tmp_path / WEIGHTS, metadata={"format": "pt"})  # as slimpeft wrote it
    meta = json.loads((tmp_path / CONFIG).read_text())
    digest = hashlib.sha256((tmp_path / WEIGHTS).read_bytes()).hexdigest()
    (tmp_path / CONFIG).write_text(json.dumps({**meta, "weights_sha256": digest}, indent=2, sort_keys=True))
    assert torch.equal(_logits(methods.load(method, tiny_llama(), tmp_path), ids), before)
    (tmp_path / CONFIG).write_text(json.dumps({**meta, "weights_sha256": "0" * 64}, indent=2, sort_keys=True))
    _refused(method, tiny_llama(), tmp_path, r"adapter_model\.safetensors: SHA-256 differs from `weights_sha256`")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("keep", [0.5, 0.99, 6])
def test_truncated_weights_are_refused(method, keep, ids, tmp_path):
    _save(method, tmp_path, ids)
    w = tmp_path / WEIGHTS
    data = w.read_bytes()
    w.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    _refused(method, tiny_llama(), tmp_path, r"adapter_model\.safetensors: not a readable safetensors file")


@pytest.mark.parametrize("method", METHODS)
def test_missing_weights_and_bad_config_are_refused(method, ids, tmp_path):
    _save(method, tmp_path, ids)
    (tmp_path / CONFIG).write_text("{not json")
    _refused(method, tiny_llama(), tmp_path, r"adapter_config\.json: not valid JSON")
    _save(method, tmp_path, ids)
    (tmp_path / WEIGHTS).unlink()
    _refused(method, tiny_llama(), tmp_path, r"adapter_model\.safetensors: missing")
    _save(method, tmp_path, ids)
    meta = json.loads((tmp_path / CONFIG).read_text())
    (tmp_path / CONFIG).write_text(json.dumps({**meta, "weights_sha256": 5}))
    _refused(method, tiny_llama(), tmp_path, r"adapter_config\.json: `weights_sha256` must be a hex string")


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_tensors_are_refused(method, ids, tmp_path):
    _save(method, tmp_path, ids)
    tensors = load_file(tmp_path / WEIGHTS)
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, tmp_path / WEIGHTS, metadata={"format": "pt"})
    _refused(method, tiny_llama(), tmp_path, rf"{key}: non-finite values")


@pytest.mark.parametrize("method", METHODS)
def test_adapter_saved_again_by_plain_peft_still_loads(method, ids, tmp_path):
    before = _save(method, tmp_path, ids)
    plain = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    PeftModel.save_pretrained(plain, str(tmp_path))  # plain peft writes into the same folder: no stale checksum left
    assert _checksum(tmp_path) is None
    assert "weights_sha256" not in json.loads((tmp_path / CONFIG).read_text())
    assert torch.equal(_logits(methods.load(method, tiny_llama(), tmp_path), ids), before)


@pytest.mark.parametrize("method", METHODS)
def test_plain_peft_adapter_still_loads(method, ids, tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                     use_dora=method == "dora", task_type="CAUSAL_LM")
    pm = get_peft_model(tiny_llama(), cfg)
    _perturb(pm)
    before = _logits(pm, ids)
    PeftModel.save_pretrained(pm, str(tmp_path))  # peft's own writer: no checksum
    assert "weights_sha256" not in json.loads((tmp_path / CONFIG).read_text()) and _checksum(tmp_path) is None
    loaded = methods.load(method, tiny_llama(), tmp_path)
    assert torch.equal(_logits(loaded, ids), before)
    assert type(loaded).__name__ == "ChecksumPeftModelForCausalLM"


@pytest.mark.parametrize("method", METHODS)
def test_save_pretrained_passes_peft_arguments_through(method, ids, tmp_path):
    model = methods.build(method, tiny_llama(), r=4, alpha=8.0)
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)  # a non-main process writes no adapter
    assert not (tmp_path / "rank1" / WEIGHTS).exists()
    # the Trainer's call (checkpoints and the final adapter of slimpeft.training)
    model.save_pretrained(tmp_path / "sd", state_dict=model.state_dict(), safe_serialization=True)
    assert _checksum(tmp_path / "sd") == tensors_sha256(load_file(tmp_path / "sd" / WEIGHTS))
    methods.load(method, tiny_llama(), tmp_path / "sd")
