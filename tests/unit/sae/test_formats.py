"""SAE files: SAELens's layout (native) and sparsify's, round trips and refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from xsae_cli.core.errors import XsaeError
from xsae_cli.sae.formats import detect_format, export_sae, load_sae, load_sae_dir, save_sae
from xsae_cli.sae.models import SaeConfig, create_sae

META = {"model_name": "tiny-model", "hook_name": "blocks.1.hook_resid_post", "context_size": 64, "prepend_bos": True}
D_IN, D_SAE, K = 12, 40, 4


def make_sae(arch: str, *, seed: int = 0, metadata: dict | None = None, **overrides):
    """An SAE with every tensor random (biases and thresholds too), so a dropped tensor shows."""
    cfg = SaeConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, k=K if arch in ("topk", "batchtopk") else None, metadata=dict(META if metadata is None else metadata), **overrides)
    sae = create_sae(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            t = getattr(sae, name)
            t.copy_(torch.randn(t.shape, generator=gen) * (0.3 if name.startswith("W") else 0.1))
        if getattr(sae, "threshold", None) is not None:
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=gen) * 0.2)
    return sae.eval()


def inputs(n: int = 32) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(7))


def assert_same_sae(a, b) -> None:
    assert a.cfg.arch == b.cfg.arch and a.cfg.d_in == b.cfg.d_in and a.cfg.d_sae == b.cfg.d_sae and a.cfg.k == b.cfg.k
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "batchtopk"])
def test_saelens_round_trip_keeps_weights_outputs_config_and_metadata(tmp_path: Path, arch: str) -> None:
    sae = make_sae(arch, l1_coefficient=2.5)
    out = save_sae(sae, tmp_path / "sae")
    assert out == tmp_path / "sae"
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert detect_format(out) == "saelens"
    back = load_sae(out)
    assert_same_sae(sae, back)
    assert back.cfg.metadata == META  # nothing added, nothing lost
    assert back.cfg.l1_coefficient == 2.5
    if arch in ("jumprelu", "batchtopk"):
        torch.testing.assert_close(back.threshold, sae.threshold, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("arch", "saelens_name", "keys"),
    [
        ("relu", "standard", {"W_enc", "b_enc", "W_dec", "b_dec"}),
        ("topk", "topk", {"W_enc", "b_enc", "W_dec", "b_dec"}),
        ("jumprelu", "jumprelu", {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}),
        ("batchtopk", "jumprelu", {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}),  # as SAELens saves a trained BatchTopK
    ],
)
def test_saelens_layout_names_shapes_and_cfg_keys(tmp_path: Path, arch: str, saelens_name: str, keys: set[str]) -> None:
    save_sae(make_sae(arch), tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    tensors = load_file(tmp_path / "s" / "sae_weights.safetensors")
    assert set(tensors) == keys
    assert list(tensors["W_enc"].shape) == [D_IN, D_SAE] and list(tensors["W_dec"].shape) == [D_SAE, D_IN]
    assert list(tensors["b_enc"].shape) == [D_SAE] and list(tensors["b_dec"].shape) == [D_IN]
    if "threshold" in keys:
        assert list(tensors["threshold"].shape) == [D_SAE]
    assert cfg["architecture"] == saelens_name
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["apply_b_dec_to_input"], cfg["normalize_activations"]) == (D_IN, D_SAE, "float32", True, "none")
    assert ("k" in cfg) == (saelens_name == "topk")
    for key, value in META.items():
        assert cfg["metadata"][key] == value
    assert cfg["xsae"]["arch"] == arch


def test_sparsify_round_trip_layout_and_orientation(tmp_path: Path) -> None:
    sae = make_sae("topk")
    folder = save_sae(sae, tmp_path / "run", format="sparsify")
    assert folder == tmp_path / "run" / META["hook_name"]
    assert {"cfg.json", "sae.safetensors"} <= {p.name for p in folder.iterdir()}
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (cfg["activation"], cfg["num_latents"], cfg["k"], cfg["d_in"], cfg["transcode"], cfg["skip_connection"]) == ("topk", D_SAE, K, D_IN, False, False)
    tensors = load_file(folder / "sae.safetensors")
    assert set(tensors) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    assert list(tensors["encoder.weight"].shape) == [D_SAE, D_IN]
    torch.testing.assert_close(tensors["W_dec"], sae.W_dec.detach(), rtol=0, atol=0)  # same orientation, not transposed
    for path in (tmp_path / "run", folder):  # the run folder (one hook) and the hook folder both load
        assert detect_format(path) == "sparsify"
        back = load_sae(path)
        assert_same_sae(sae, back)
        assert back.cfg.metadata == META


def test_sparsify_folds_b_dec_when_the_sae_does_not_subtract_it(tmp_path: Path) -> None:
    sae = make_sae("topk", apply_b_dec_to_input=False)
    back = load_sae(save_sae(sae, tmp_path / "run", format="sparsify"))
    assert back.cfg.apply_b_dec_to_input is True  # sparsify always encodes x - b_dec
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(back(x), sae(x), rtol=0, atol=1e-5)


def test_sparsify_stores_only_topk(tmp_path: Path) -> None:
    with pytest.raises(XsaeError, match="sparsify stores only TopK SAEs, and this one is relu"):
        save_sae(make_sae("relu"), tmp_path / "run", format="sparsify")


def test_sparsify_needs_a_hook_name(tmp_path: Path) -> None:
    sae = make_sae("topk", metadata={})
    with pytest.raises(XsaeError, match="needs a hook name"):
        save_sae(sae, tmp_path / "run", format="sparsify")
    assert save_sae(sae, tmp_path / "run", format="sparsify", hook="layers.3") == tmp_path / "run" / "layers.3"
    assert load_sae(tmp_path / "run").cfg.metadata.get("hook_name") in (None, "layers.3")


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    first, second = make_sae("topk", seed=1), make_sae("topk", seed=2)
    save_sae(first, tmp_path / "s")
    with pytest.raises(XsaeError, match="already exists"):
        save_sae(second, tmp_path / "s")
    assert_same_sae(first, load_sae(tmp_path / "s"))  # the refused save changed nothing
    save_sae(second, tmp_path / "s", force=True)
    assert_same_sae(second, load_sae(tmp_path / "s"))


def test_several_hooks_error_lists_them_and_load_sae_dir_loads_all(tmp_path: Path) -> None:
    a, b = make_sae("topk", seed=1), make_sae("topk", seed=2)
    save_sae(a, tmp_path / "run", format="sparsify", hook="layers.2")
    save_sae(b, tmp_path / "run", format="sparsify", hook="layers.10")
    with pytest.raises(XsaeError, match=r"holds 2 SAEs \(layers\.2, layers\.10\)"):
        load_sae(tmp_path / "run")
    both = load_sae_dir(tmp_path / "run")
    assert list(both) == ["layers.2", "layers.10"]
    assert_same_sae(a, both["layers.2"])
    assert_same_sae(b, both["layers.10"])
    assert list(load_sae_dir(tmp_path / "run" / "layers.2")) == [META["hook_name"]]


def test_export_between_layouts_both_ways(tmp_path: Path) -> None:
    sae = make_sae("topk")
    save_sae(sae, tmp_path / "lens")
    export_sae(tmp_path / "lens", tmp_path / "spars", format="sparsify")
    assert detect_format(tmp_path / "spars") == "sparsify"
    export_sae(tmp_path / "spars", tmp_path / "lens2", format="saelens")
    assert_same_sae(sae, load_sae(tmp_path / "lens2" / META["hook_name"]))
    with pytest.raises(XsaeError, match="unknown SAE file format 'gguf'"):
        export_sae(tmp_path / "lens", tmp_path / "x", format="gguf")


def test_bfloat16_sae_keeps_its_dtype(tmp_path: Path) -> None:
    sae = make_sae("relu", dtype="bfloat16")
    back = load_sae(save_sae(sae, tmp_path / "s"))
    assert back.W_enc.dtype == torch.bfloat16 and back.cfg.dtype == "bfloat16"
    assert json.loads((tmp_path / "s" / "cfg.json").read_text())["dtype"] == "bfloat16"


# -- bad input --------------------------------------------------------------------------------


def test_truncated_weights_are_refused_with_their_path(tmp_path: Path) -> None:
    folder = save_sae(make_sae("topk"), tmp_path / "s")
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(XsaeError, match="corrupt or truncated") as err:
        load_sae(folder)
    assert str(weights) in err.value.one_line()


def test_garbage_weights_are_refused_with_their_path(tmp_path: Path) -> None:
    folder = save_sae(make_sae("topk"), tmp_path / "run", format="sparsify")
    (folder / "sae.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(XsaeError, match="corrupt or truncated") as err:
        load_sae(folder)
    assert str(folder / "sae.safetensors") in err.value.one_line()


def test_missing_weights_file_names_what_was_expected(tmp_path: Path) -> None:
    folder = save_sae(make_sae("topk"), tmp_path / "s")
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(XsaeError, match="missing SAE weights: .*sae_weights.safetensors"):
        load_sae(folder)


def test_missing_cfg_names_what_was_expected(tmp_path: Path) -> None:
    folder = save_sae(make_sae("topk"), tmp_path / "s")
    (folder / "cfg.json").unlink()
    with pytest.raises(XsaeError, match="missing SAELens config: .*cfg.json"):
        load_sae(folder)


def test_empty_folder_says_what_an_sae_folder_holds(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(XsaeError, match="no SAE found") as err:
        load_sae(tmp_path / "empty")
    assert "sae_weights.safetensors" in err.value.one_line() and "sae.safetensors" in err.value.one_line()
    with pytest.raises(XsaeError, match="not found"):
        load_sae(tmp_path / "nowhere")


def test_cfg_and_tensor_shape_disagreement_names_both_shapes(tmp_path: Path) -> None:
    folder = save_sae(make_sae("topk"), tmp_path / "s")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["d_sae"] = 64
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(XsaeError, match=rf"W_enc .* has shape \[{D_IN}, {D_SAE}\] but .*needs \[{D_IN}, 64\]"):
        load_sae(folder)


def test_sparsify_shape_disagreement_names_both_shapes(tmp_path: Path) -> None:
    folder = save_sae(make_sae("topk"), tmp_path / "run", format="sparsify")
    tensors = load_file(folder / "sae.safetensors")
    tensors["b_dec"] = torch.zeros(D_IN + 1)
    save_file(tensors, folder / "sae.safetensors")
    with pytest.raises(XsaeError, match=rf"b_dec .* has shape \[{D_IN + 1}\] but .*needs \[{D_IN}\]"):
        load_sae(folder)


def test_unknown_architecture_lists_the_valid_ones(tmp_path: Path) -> None:
    folder = save_sae(make_sae("relu"), tmp_path / "s")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["architecture"] = "matching_pursuit"
    del cfg["xsae"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(XsaeError, match="unknown SAE architecture 'matching_pursuit'") as err:
        load_sae(folder)
    for name in ("standard", "topk", "jumprelu"):
        assert name in err.value.one_line()
    with pytest.raises(XsaeError, match="unknown SAE architecture 'groupmax'|activation 'groupmax'") as err:
        spars = save_sae(make_sae("topk"), tmp_path / "run", format="sparsify")
        raw = json.loads((spars / "cfg.json").read_text())
        raw["activation"] = "groupmax"
        (spars / "cfg.json").write_text(json.dumps(raw))
        load_sae(spars)
    assert "topk" in err.value.one_line()


def test_unknown_arch_in_the_xsae_record_lists_ours(tmp_path: Path) -> None:
    folder = save_sae(make_sae("relu"), tmp_path / "s")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["xsae"]["arch"] = "matryoshka"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(XsaeError, match="unknown SAE architecture 'matryoshka'") as err:
        load_sae(folder)
    assert all(name in err.value.one_line() for name in ("relu", "topk", "batchtopk", "jumprelu"))
