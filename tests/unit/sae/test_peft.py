"""SAEs as PEFT adapters: PEFT's own entry points, splice/observe, any module type, save/load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from xsae_cli.core.errors import XsaeError
from xsae_cli.sae.peft import (
    BatchTopKSaeConfig,
    JumpReluSaeConfig,
    PeftSaeModel,
    ReluSaeConfig,
    SaeLayer,
    TopKSaeConfig,
    get_peft_sae_model,
)


class DummyModel(nn.Module):
    """The model of the README snippet: one Linear(10, 10) called ``linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Block(nn.Module):
    """A decoder-like block that returns a tuple (hidden, extra), as transformers blocks do."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.attention_type = "full"  # read by some parent models; must stay reachable through the wrapper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + self.mlp(x), x.mean(-1)


class Tiny(nn.Module):
    """Blocks, a LayerNorm and a head: targets of several kinds."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x, _ = block(x)
        return self.head(self.ln(x))


def fresh(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls().eval()


def sae_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".xsae_sae." in k}


X10 = torch.randn(2, 7, 10, generator=torch.Generator().manual_seed(1))
X8 = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(2))


def test_readme_snippet_runs_verbatim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    # --- the snippet, only the import line differs from PEFT's LoRA example -----------------
    from peft import inject_adapter_in_model

    from xsae_cli.sae.peft import PeftSaeModel, TopKSaeConfig, get_peft_sae_model

    model = DummyModel()  # nn.Linear(10, 10) inside, attribute "linear"
    config = TopKSaeConfig(k=1, num_latents=5, target_modules=["linear"])
    model = inject_adapter_in_model(config, model)
    result = model(torch.randn(1, 512, 10))
    peft_model = get_peft_sae_model(model, config)
    peft_model.save_pretrained("test_save_peft_model")
    model = PeftSaeModel.from_pretrained(DummyModel(), "test_save_peft_model", adapter_name="default", low_cpu_mem_usage=True)
    # -----------------------------------------------------------------------------------------
    assert result.shape == (1, 512, 10)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir("test_save_peft_model"))
    saved = json.loads(Path("test_save_peft_model/adapter_config.json").read_text())
    assert (saved["peft_type"], saved["arch"], saved["k"], saved["num_latents"], saved["target_modules"]) == ("XSAE", "topk", 1, 5, ["linear"])
    assert isinstance(model, PeftSaeModel) and isinstance(model.peft_config["default"], TopKSaeConfig)
    # the SAE weights survived, and trained-or-not, the loaded SAE is the one that was saved
    before = {k.replace(".default", ""): v for k, v in sae_state(peft_model).items()}
    after = {k.replace(".default", ""): v for k, v in sae_state(model).items()}
    assert before.keys() == after.keys() and len(before) >= 4
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    assert all(p.device.type != "meta" for p in model.parameters())


def test_splice_replaces_the_output_by_the_reconstruction_and_round_trips(tmp_path: Path) -> None:
    base_out = fresh(DummyModel)(X10)
    model = get_peft_sae_model(fresh(DummyModel), TopKSaeConfig(k=2, num_latents=6, target_modules=["linear"], init_seed=3))
    sae = model.get_saes()["linear"]
    with torch.no_grad():
        out = model(X10)
        torch.testing.assert_close(out, sae.decode(sae.encode(base_out)))
        assert not torch.allclose(out, base_out)
        codes = model.get_codes()["linear"]
        assert codes.shape == (2, 7, 6) and int((codes != 0).sum(-1).max()) <= 2
        with model.disable_adapter():
            torch.testing.assert_close(model(X10), base_out, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "ad")
    loaded = PeftSaeModel.from_pretrained(fresh(DummyModel), tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(loaded(X10), out, rtol=0, atol=1e-6)


def test_observe_leaves_outputs_bit_identical_and_records_codes() -> None:
    base = fresh(Tiny)
    with torch.no_grad():
        expected = base(X8)
        ln_out = base.ln(base.blocks[1](base.blocks[0](X8)[0])[0])
    model = get_peft_sae_model(fresh(Tiny), ReluSaeConfig(expansion_factor=2, target_modules=["ln"], mode="observe"))
    with torch.no_grad():
        out = model(X8)
    assert torch.equal(out, expected)
    codes = model.get_codes()["ln"]
    sae = model.get_saes()["ln"]
    assert codes.shape == (2, 7, 16)  # LayerNorm normalized_shape 8 x expansion 2
    with torch.no_grad():
        torch.testing.assert_close(codes, sae.encode(ln_out))


def test_layernorm_target_infers_d_in_and_splices(tmp_path: Path) -> None:
    model = get_peft_sae_model(fresh(Tiny), TopKSaeConfig(k=3, num_latents=12, target_modules=["ln"]))
    layer = model.base_model.model.ln
    assert isinstance(layer, SaeLayer) and isinstance(layer.base_layer, nn.LayerNorm)
    sae = model.get_saes()["ln"]
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.metadata["hook_name"]) == (8, 12, "ln")
    base = fresh(Tiny)
    with torch.no_grad():
        hidden = base.ln(base.blocks[1](base.blocks[0](X8)[0])[0])
        torch.testing.assert_close(model(X8), base.head(sae.decode(sae.encode(hidden))))
    # each SAE of an adapter exports to SAELens's layout, named by its module path
    from xsae_cli.sae.formats import load_sae

    written = model.export_saes(tmp_path / "saes")
    assert written == {"ln": tmp_path / "saes" / "ln"}
    exported = load_sae(written["ln"])
    assert exported.cfg.metadata["hook_name"] == "ln"
    torch.testing.assert_close(exported.W_enc, sae.W_enc, rtol=0, atol=0)


def test_tuple_returning_block_splices_the_hidden_state_and_reloads(tmp_path: Path) -> None:
    model = get_peft_sae_model(fresh(Tiny), JumpReluSaeConfig(num_latents=16, target_modules=["blocks.0"], init_seed=0))
    layer = model.base_model.model.blocks[0]
    assert "default" in layer.xsae_pending  # a block's width is learnt at the first forward
    assert layer.attention_type == "full"  # attributes of the wrapped block stay reachable
    base = fresh(Tiny)
    with torch.no_grad():
        hidden, extra = base.blocks[0](X8)
        out_hidden, out_extra = layer(X8)
        sae = model.get_saes()["blocks.0"]
        assert sae.cfg.d_in == 8 and sae.cfg.arch == "jumprelu"
        torch.testing.assert_close(out_hidden, sae.decode(sae.encode(hidden)))
        assert torch.equal(out_extra, extra)  # the rest of the tuple is untouched
        sae.threshold.fill_(0.05)
        out = model(X8)
    model.save_pretrained(tmp_path / "ad")
    # the SAE is created from the checkpoint's shapes, also when PEFT first builds adapters on "meta"
    loaded = PeftSaeModel.from_pretrained(fresh(Tiny), tmp_path / "ad", low_cpu_mem_usage=True)
    assert isinstance(loaded.peft_config["default"], JumpReluSaeConfig)
    torch.testing.assert_close(loaded.get_saes()["blocks.0"].threshold, torch.full((16,), 0.05))
    with torch.no_grad():
        torch.testing.assert_close(loaded(X8), out, rtol=0, atol=1e-6)


def test_several_adapters_save_all_and_load_back(tmp_path: Path) -> None:
    model = get_peft_sae_model(fresh(Tiny), TopKSaeConfig(k=2, num_latents=10, target_modules=["ln"], init_seed=1))
    model.add_adapter("watch", BatchTopKSaeConfig(k=3, num_latents=24, target_modules=["blocks.1"], mode="observe", init_seed=2))
    model.add_adapter("relu", ReluSaeConfig(num_latents=9, target_modules=["ln"], mode="observe", init_seed=3))
    model.set_adapter(["watch", "relu", "default"])
    with torch.no_grad():
        out = model(X8)
    codes = {name: model.get_codes(name) for name in ("default", "watch", "relu")}
    assert set(codes["watch"]) == {"blocks.1"} and codes["watch"]["blocks.1"].shape == (2, 7, 24)
    assert set(codes["relu"]) == {"ln"} and set(codes["default"]) == {"ln"}

    model.save_pretrained(tmp_path / "ad")
    assert (tmp_path / "ad" / "adapter_config.json").is_file()
    for sub in ("watch", "relu"):  # PEFT's layout: non-default adapters in subfolders
        assert (tmp_path / "ad" / sub / "adapter_model.safetensors").is_file()

    loaded = PeftSaeModel.from_pretrained(fresh(Tiny), tmp_path / "ad")
    loaded.load_adapter(tmp_path / "ad" / "watch", adapter_name="watch")
    loaded.load_adapter(tmp_path / "ad" / "relu", adapter_name="relu")
    assert isinstance(loaded.peft_config["watch"], BatchTopKSaeConfig)
    before, after = sae_state(model), sae_state(loaded)
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    loaded.set_adapter(["watch", "relu", "default"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(X8), out, rtol=0, atol=1e-6)
    for name in codes:
        for where, c in codes[name].items():
            torch.testing.assert_close(loaded.get_codes(name)[where], c, rtol=0, atol=1e-6)


def test_only_sae_weights_train_and_the_sae_keeps_its_dtype() -> None:
    base = fresh(DummyModel).to(torch.bfloat16)
    model = get_peft_sae_model(base, TopKSaeConfig(k=2, num_latents=6, target_modules=["linear"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".xsae_sae.default." in n for n in trainable)
    sae = model.get_saes()["linear"]
    assert sae.W_enc.dtype == torch.float32  # not cast to the model's bfloat16
    out = model(X10.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert sae.W_dec.grad is not None


def test_unload_gives_back_the_original_modules() -> None:
    model = get_peft_sae_model(fresh(Tiny), TopKSaeConfig(k=2, num_latents=10, target_modules=["ln", "blocks.0"]))
    base = model.unload()
    assert isinstance(base.ln, nn.LayerNorm) and isinstance(base.blocks[0], Block)
    with pytest.raises(XsaeError, match="cannot be merged"):
        get_peft_sae_model(fresh(Tiny), TopKSaeConfig(k=2, num_latents=10, target_modules=["ln"])).merge_and_unload()


def test_plain_peft_loader_reads_xsae_adapters(tmp_path: Path) -> None:
    from peft import PeftModel
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING["XSAE"].__name__ == "SaeAdapterConfig"
    model = get_peft_sae_model(fresh(DummyModel), ReluSaeConfig(num_latents=7, target_modules=["linear"]))
    model.save_pretrained(tmp_path / "ad")
    plain = PeftModel.from_pretrained(fresh(DummyModel), tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(plain(X10), model(X10), rtol=0, atol=1e-6)


def test_config_mistakes_are_one_line_errors() -> None:
    with pytest.raises(XsaeError, match="unknown SAE adapter mode 'watch'"):
        TopKSaeConfig(k=1, num_latents=4, target_modules=["linear"], mode="watch")
    with pytest.raises(XsaeError, match="TopKSaeConfig is for arch 'topk'"):
        TopKSaeConfig(arch="relu", target_modules=["linear"])
    with pytest.raises(XsaeError, match="k=9 is larger than num_latents=4"):
        TopKSaeConfig(k=9, num_latents=4, target_modules=["linear"])
    with pytest.raises(XsaeError, match="unknown SAE settings in sae_kwargs: l2_coefficient"):
        ReluSaeConfig(target_modules=["linear"], sae_kwargs={"l2_coefficient": 1.0})
    with pytest.raises(XsaeError, match="no target_modules"):
        get_peft_sae_model(fresh(DummyModel), TopKSaeConfig(k=1, num_latents=4))


def test_rewrapping_an_injected_model_keeps_its_sae_or_refuses_another() -> None:
    from peft import inject_adapter_in_model

    config = TopKSaeConfig(k=1, num_latents=5, target_modules=["linear"])
    model = inject_adapter_in_model(config, fresh(DummyModel))
    with torch.no_grad():
        model.linear.xsae_sae["default"].b_dec.fill_(0.5)  # "trained" since injection
    wrapped = get_peft_sae_model(model, TopKSaeConfig(k=1, num_latents=5, target_modules=["linear"], mode="observe"))
    assert torch.equal(wrapped.get_saes()["linear"].b_dec, torch.full((10,), 0.5))
    with pytest.raises(XsaeError, match="already sits on linear with another SAE"):
        get_peft_sae_model(inject_adapter_in_model(config, fresh(DummyModel)), TopKSaeConfig(k=2, num_latents=8, target_modules=["linear"]))
