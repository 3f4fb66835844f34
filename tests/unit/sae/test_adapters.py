"""sae/adapters.py: SAEs through a frozen model as PEFT adapters, and PEFT adapter folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xsae_cli.core.errors import XsaeError
from xsae_cli.data.hooks import HiddenCapture
from xsae_cli.sae.adapters import (
    export_peft,
    inject_saes,
    load_peft_saes,
    training_outputs,
)
from xsae_cli.sae.evaluate import spliced
from xsae_cli.sae.formats import (
    detect_format,
    export_sae,
    load_sae,
    load_sae_dir,
    save_sae,
)
from xsae_cli.sae.models import SaeConfig, create_sae
from xsae_cli.sae.settings import SaeTrainSettings

IDS = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def _qwen(seed: int = 0):
    """A tiny random Qwen2 (a family the adapter code never names)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, vocab_size=100, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).eval()


def _sae(arch: str, d_sae: int, seed: int, hook: str) -> torch.nn.Module:
    k = 4 if arch in ("topk", "batchtopk") else None
    sae = create_sae(SaeConfig(arch=arch, d_in=32, d_sae=d_sae, k=k, metadata={"hook_name": hook, "model_name": "tiny-qwen"}), seed=seed)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.3, generator=torch.Generator().manual_seed(seed))
    return sae


def test_exported_adapter_splices_as_the_downstream_evaluation_does(tmp_path: Path) -> None:
    from peft import PeftModel

    sae = _sae("topk", 64, 0, "model.layers.1")
    model = _qwen()
    with torch.no_grad(), spliced(model, "model.layers.1", sae):
        want = model(input_ids=IDS).logits
    folder = save_sae(sae, tmp_path / "adapter", format="peft")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "XSAE" and cfg["target_modules"] == ["model.layers.1"] and cfg["k"] == 4 and cfg["num_latents"] == 64
    assert cfg["base_model_name_or_path"] == "tiny-qwen" and cfg["inference_mode"] is True
    for loader in (PeftModel.from_pretrained, __import__("xsae_cli.sae.peft", fromlist=["PeftSaeModel"]).PeftSaeModel.from_pretrained):
        loaded = loader(_qwen(), str(folder))
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-5)
    assert detect_format(folder) == "peft"
    torch.testing.assert_close(load_sae(folder)(torch.ones(3, 32)), sae(torch.ones(3, 32)))


def test_saes_of_several_shapes_become_several_adapters_and_round_trip(tmp_path: Path) -> None:
    saes = {"model.layers.1": _sae("topk", 64, 0, "model.layers.1"), "model.layers.2": _sae("jumprelu", 48, 1, "model.layers.2"), "model.layers.3": _sae("topk", 64, 2, "model.layers.3")}
    written = export_peft(saes, tmp_path / "ad")
    assert written == {"default": tmp_path / "ad", "default_1": tmp_path / "ad" / "default_1"}
    root = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert sorted(root["target_modules"]) == ["model.layers.1", "model.layers.3"]  # same settings: one adapter
    back = load_peft_saes(tmp_path / "ad")
    assert set(back) == set(saes)
    x = torch.randn(5, 32)
    for path, sae in saes.items():
        assert type(back[path]) is type(sae)
        torch.testing.assert_close(back[path](x), sae(x))
    # and back to SAELens files, one folder per module
    export_sae(tmp_path / "ad", tmp_path / "sl", "saelens")
    assert set(load_sae_dir(tmp_path / "sl")) == set(saes)
    with pytest.raises(XsaeError, match="holds 3 SAEs"):
        load_sae(tmp_path / "ad")
    with pytest.raises(XsaeError, match="already exists"):
        export_peft(saes, tmp_path / "ad")


def test_training_forward_through_the_model_equals_training_on_captured_activations() -> None:
    """The adapter's loss is the SAE's training loss on the module's hidden state, kept tokens only;
    the forward stops after the last adapted module (norm and LM head never run)."""
    settings = SaeTrainSettings(arch="topk", k=4, expansion=2)
    model = inject_saes(_qwen(), ["model.layers.1", "2"], settings=settings, mode="observe", seed=3)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[:, 0] = False  # BOS-like positions stay out of training
    base = model.get_base_model()
    calls = {"head": 0}
    base.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    outputs = training_outputs(model, lambda: model(input_ids=IDS), keep=keep)
    assert set(outputs) == {"model.layers.1", "model.layers.2"} and calls["head"] == 0
    sum(o.loss for o in outputs.values()).backward()
    trainable = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable and all(".xsae_sae." in n for n in trainable)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".xsae_sae." not in n)

    saes = model.get_saes()
    with torch.no_grad(), model.disable_adapter(), HiddenCapture(base, {"a": "model.layers.1", "b": "model.layers.2"}) as cap:
        base(input_ids=IDS)
    for path, key in (("model.layers.1", "a"), ("model.layers.2", "b")):
        rows = cap.values[key][keep]
        ref = saes[path].training_forward(rows)
        torch.testing.assert_close(outputs[path].loss, ref.loss)
        assert outputs[path].x_hat.shape == (int(keep.sum()), 32)


def test_observe_leaves_the_model_unchanged_and_splice_trains_what_follows() -> None:
    settings = SaeTrainSettings(arch="relu", expansion=2)
    clean = _qwen()
    with torch.no_grad():
        want = clean(input_ids=IDS).logits
    observed = inject_saes(_qwen(), ["model.layers.2"], settings=settings, mode="observe")
    training_outputs(observed, lambda: torch.testing.assert_close(observed(input_ids=IDS).logits, want), stop=False)
    spliced_model = inject_saes(_qwen(), ["model.layers.1", "model.layers.2"], settings=settings, mode="splice")
    got: dict[str, torch.Tensor] = {}
    outputs = training_outputs(spliced_model, lambda: got.__setitem__("logits", spliced_model(input_ids=IDS).logits), stop=False)
    assert not torch.allclose(got["logits"], want)  # the reconstructions ran on through the model
    assert got["logits"].requires_grad and set(outputs) == {"model.layers.1", "model.layers.2"}


def test_trained_saes_inject_as_they_are_and_a_few_steps_through_the_model_learn() -> None:
    sae = _sae("topk", 64, 0, "model.layers.1")
    model = inject_saes(_qwen(), {"layers.1": sae}, mode="observe")
    assert model.get_saes()["model.layers.1"] is sae
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(25):
        out = training_outputs(model, lambda: model(input_ids=IDS))["model.layers.1"]
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.terms["fvu"]))
    assert losses[-1] < 0.7 * losses[0]


def test_bad_input_names_the_module_and_the_fix() -> None:
    settings = SaeTrainSettings(arch="topk", k=4, expansion=2)
    with pytest.raises(XsaeError, match="no module 'model.layers.9'"):
        inject_saes(_qwen(), ["model.layers.9"], settings=settings)
    with pytest.raises(XsaeError, match="unknown SAE adapter mode 'watch'"):
        inject_saes(_qwen(), ["model.layers.1"], settings=settings, mode="watch")
    with pytest.raises(XsaeError, match="need training settings"):
        inject_saes(_qwen(), ["model.layers.1"])
    with pytest.raises(XsaeError, match="not an xsae SAE adapter"):
        load_peft_saes(Path(__file__).parent)
    on_input = create_sae(SaeConfig(arch="relu", d_in=32, d_sae=8, metadata={"hook_name": "model.layers.1", "hook_site": "input"}))
    with pytest.raises(XsaeError, match="trained on the module's input"):
        inject_saes(_qwen(), {"model.layers.1": on_input})
