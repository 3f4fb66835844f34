"""Every source kind resolves, is described, and streams the same tensors the model holds."""

import json
from pathlib import Path

import pytest
import torch

from xsae_cli.core.errors import XsaeError
from xsae_cli.zoo.registry import Registry, add_model, describe, resolve_entry
from xsae_cli.zoo.sources import resolve
from xsae_cli.zoo.weights import iter_weights, tensor_index


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).state_dict()


def _streamed(source: str | Path) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in iter_weights(resolve(source))}


def test_hf_folder_single_safetensors(tiny_gpt2_dir: Path) -> None:
    r = resolve(tiny_gpt2_dir)
    assert r.kind == "hf_dir" and r.config["model_type"] == "gpt2"
    streamed = _streamed(tiny_gpt2_dir)
    state = _state(tiny_gpt2_dir)
    for name, t in streamed.items():
        assert torch.equal(t, state[name]), name
    entry = describe(r, "g")
    assert entry.layers == 2 and entry.hidden == 16 and entry.architecture == "GPT2LMHeadModel"
    assert entry.params == sum(t.numel() for t in streamed.values())
    assert len(entry.sha256) == 64


def test_sharded_folder_streams_every_shard(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=3, n_head=2))
    m.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    r = resolve(tmp_path / "sharded")
    assert len(r.weight_files) > 1
    streamed = _streamed(tmp_path / "sharded")
    ref = m.state_dict()
    assert set(streamed) <= set(ref) and len(streamed) >= len(ref) - 1  # tied lm_head stored once
    assert all(torch.equal(streamed[k], ref[k]) for k in streamed)


def test_pytorch_model_bin_folder(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    state = _state(tiny_gpt2_dir)
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text((tiny_gpt2_dir / "config.json").read_text())
    torch.save(state, d / "pytorch_model.bin")
    r = resolve(d)
    assert r.kind == "hf_dir" and r.weight_files[0].name == "pytorch_model.bin"
    streamed = _streamed(d)
    assert all(torch.equal(streamed[k], state[k]) for k in state)


def test_single_safetensors_file_and_pt_checkpoint(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    st = tiny_gpt2_dir / "model.safetensors"
    r = resolve(st)
    assert r.kind == "safetensors"
    assert [i.name for i in tensor_index(r)] == sorted(i.name for i in tensor_index(r)) or len(tensor_index(r)) > 0

    state = _state(tiny_gpt2_dir)
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)
    nested = tmp_path / "nested.pt"
    torch.save({"model_state_dict": state, "config": {"d_model": 16, "n_layers": 2}, "vocab_size": 100}, nested)
    for f in (plain, nested):
        r = resolve(f)
        assert r.kind == "pt"
        streamed = _streamed(f)
        assert set(streamed) == set(state)
        assert all(torch.equal(streamed[k], state[k]) for k in state)
    e = describe(resolve(nested), "n")
    assert e.hidden == 16 and e.layers == 2


def test_gguf_file_streams_raw_tensors_and_converts_once(demo_zoo: Path) -> None:
    from xsae_cli.zoo.demo import real_model_path
    from xsae_cli.zoo.sources.gguf_file import GGUFFile

    gguf = real_model_path("smollm2-135m")
    r = resolve(gguf)
    assert r.kind == "gguf" and r.model_dir is not None and (r.model_dir / "config.json").exists()
    cfg = json.loads((r.model_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    first = next(GGUFFile().read_weights(gguf))
    assert first[0] == "token_embd.weight" and tuple(first[1].shape) == (49152, 576)
    names = [i.name for i in tensor_index(r)]
    assert "model.layers.29.mlp.down_proj.weight" in names


def test_hub_id_offline_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(XsaeError) as exc:
        resolve("someorg/not-a-cached-model")
    text = exc.value.one_line()
    assert "someorg/not-a-cached-model" in text and "xsae zoo add DIR" in text


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(XsaeError, match="model path not found"):
        resolve(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(XsaeError, match="holds no model weights"):
        resolve(tmp_path / "empty")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(XsaeError, match="corrupt or truncated GGUF"):
        resolve(bad)
    worse = tmp_path / "worse.gguf"
    worse.write_bytes(b"NOPE")
    with pytest.raises(XsaeError, match="GGUF magic"):
        resolve(worse)
    (tmp_path / "x.onnx").write_bytes(b"1")
    with pytest.raises(XsaeError, match="don't know how to read"):
        resolve(tmp_path / "x.onnx")


def test_registry_add_get_remove_and_suggestions(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    reg = Registry(tmp_path / "home")
    e = add_model(str(tiny_gpt2_dir), registry=reg, family="gpt2")
    assert e.name == "tiny-gpt2" and reg.get("tiny-gpt2").sha256 == e.sha256
    with pytest.raises(XsaeError, match="already in the zoo"):
        add_model(str(tiny_gpt2_dir), registry=reg)
    add_model(str(tiny_gpt2_dir), registry=reg, force=True)
    with pytest.raises(XsaeError, match="did you mean tiny-gpt2"):
        reg.get("tiny-gpt")
    assert resolve_entry("tiny-gpt2", reg).kind == "hf_dir"
    reg.remove("tiny-gpt2")
    assert reg.list() == []
    with pytest.raises(XsaeError, match="the catalogue is empty"):
        reg.get("tiny-gpt2")
