"""On-disk tokenised models: contents, caching, windows, row permutations, bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from xsae_cli.sane.dataset import (
    PERMUTABLE_KINDS,
    TokenizedModel,
    WindowSampler,
    cache_key,
    config_digest,
    model_source,
    permute_columns,
    permute_rows,
    tokenize_to_cache,
)
from xsae_cli.sane.tokenizer import CoordScheme


def test_cache_holds_every_tensor_and_reconstructs_it(demo_zoo, tiny_models) -> None:
    from xsae_cli.zoo.registry import resolve_entry
    from xsae_cli.zoo.weights import iter_weights

    tm = tiny_models[0]  # tiny-gpt2
    assert tm.name == "tiny-gpt2"
    man = tm.manifest
    assert man["n_chunks"] == tm.n_chunks == sum(t["n_chunks"] for t in man["tensors"])
    assert tm.folder.name == cache_key(man["sha256"], 64, CoordScheme(view="weights"), config_digest(resolve_entry("tiny-gpt2")))
    assert isinstance(tm.arrays["values"], np.memmap)
    tensors = {t["name"]: t for t in man["tensors"]}
    assert man["view"] == {"view": "weights", "applied": False}
    for name, w in iter_weights(resolve_entry("tiny-gpt2")):
        t = tensors[name]
        rows = np.asarray(tm.arrays["values"][t["start"] : t["start"] + t["n_chunks"]], dtype=np.float32).reshape(-1)[: w.numel()]
        assert np.allclose(rows * t["std"] + t["mean"], w.reshape(-1).numpy(), atol=2e-3 * max(t["std"], 1e-3) * 10), name
        assert np.all(tm.arrays["tensor_id"][t["start"] : t["start"] + t["n_chunks"]] == list(tensors).index(name))
    assert tensors["transformer.wte.weight"]["depth"] == 0.0 and tensors["transformer.ln_f.weight"]["depth"] == 1.0


def test_window_coordinates_match_the_tokenizer(demo_zoo, tiny_models) -> None:
    """Per-chunk depth/pos/kind/fill/scale rebuilt from the tensor table equal what the tokenizer made."""
    from xsae_cli.sane.tokenizer import tensor_coords, tokenize_stream
    from xsae_cli.zoo.registry import resolve_entry
    from xsae_cli.zoo.weights import iter_weights, tensor_index

    tm = tiny_models[0]
    r = resolve_entry(tm.name)
    blocks = list(tokenize_stream(tensor_index(r), iter_weights(r), 64))
    w = tm.window(0, tm.n_chunks + 7)
    for k in ("values", "valid", "depth", "pos", "kind", "stats"):
        ref = np.concatenate([getattr(b, k) for b in blocks])
        got = w[k][: tm.n_chunks].astype(np.float32)
        bad = np.nonzero(got.reshape(len(got), -1) != ref.astype(np.float32).reshape(len(got), -1))[0]
        assert len(bad) == 0, (k, bad[:5], [tm.manifest["tensors"][tm.arrays["tensor_id"][i]]["name"] for i in bad[:3]])
        assert not w[k][tm.n_chunks :].any(), k
    assert len(tensor_coords([b.name for b in blocks])) == tm.manifest["n_tensors"]


def test_tokenising_is_cached_and_deterministic(demo_zoo, tmp_path: Path) -> None:
    src = model_source("tiny-qwen2")
    a = tokenize_to_cache(src, cache_dir=tmp_path / "a")
    mtime = (a / "values.npy").stat().st_mtime_ns
    assert tokenize_to_cache(src, cache_dir=tmp_path / "a") == a
    assert (a / "values.npy").stat().st_mtime_ns == mtime  # not re-written
    b = tokenize_to_cache(src, cache_dir=tmp_path / "b")
    for f in ("values", "tensor_id"):
        assert (a / f"{f}.npy").read_bytes() == (b / f"{f}.npy").read_bytes(), f
    c32 = tokenize_to_cache(src, chunk_size=32, cache_dir=tmp_path / "a")
    assert c32 != a and TokenizedModel(c32).n_chunks > TokenizedModel(a).n_chunks


def test_windows_pad_and_mask(tiny_models) -> None:
    tm = tiny_models[1]
    w = tm.window(tm.n_chunks - 10, 64)
    assert w["values"].shape == (64, 64) and w["values"].dtype == np.float32
    assert w["mask"].sum() == 10 and not w["mask"][10:].any()
    assert np.all(w["values"][10:] == 0) and np.all(w["valid"][10:] == 0)
    starts = tm.cover_starts(1000)
    assert starts[0] == 0 and len(starts) == tm.n_windows(1000) == -(-tm.n_chunks // 1000)
    sampler = WindowSampler(tiny_models, 256)
    r1 = [sampler.sample(np.random.default_rng(3))[1]["index"][0] for _ in range(2)]
    assert r1[0] == r1[1]  # same seed, same window


def test_permute_rows_moves_whole_rows_of_attention_and_mlp_only(tiny_models) -> None:
    tm = tiny_models[2]  # tiny-qwen2: q_proj [64, 64] -> one chunk per row; up_proj [192, 64]
    changed_any = False
    for start in range(0, tm.n_chunks, 512):
        w = tm.window(start, 512)
        p = permute_rows(w, tm, np.random.default_rng(0))
        tid = w["tensor_id"]
        for t in np.unique(tid[w["mask"]]):
            sel = w["mask"] & (tid == t)
            a, b = w["values"][sel], p["values"][sel]
            if int(tm.t_kind[t]) in PERMUTABLE_KINDS and tm.t_rows[t] > 0:
                # same multiset of rows
                assert sorted(map(bytes, a.astype(np.float32))) == sorted(map(bytes, b.astype(np.float32)))
                changed_any |= not np.array_equal(a, b)
            else:
                assert np.array_equal(a, b)
        for k in ("depth", "pos", "kind"):
            assert np.array_equal(w[k], p[k])
    assert changed_any


def test_permute_columns_shuffles_within_rows_of_attention_and_mlp_only(tiny_models) -> None:
    tm = tiny_models[0]  # tiny-gpt2: c_fc [64, 256] -> rows of 4 chunks
    changed_any = False
    for start in range(0, tm.n_chunks, 700):
        w = tm.window(start, 700)
        p = permute_columns(w, tm, np.random.default_rng(1))
        tid = w["tensor_id"]
        for t in np.unique(tid[w["mask"]]):
            sel = w["mask"] & (tid == t)
            a, b = w["values"][sel], p["values"][sel]
            rows = int(tm.t_rows[t])
            if int(tm.t_kind[t]) in PERMUTABLE_KINDS and rows > 0:
                assert np.array_equal(np.sort(a, axis=None), np.sort(b, axis=None))
                local0 = int(w["index"][np.nonzero(sel)[0][0]] - tm.t_start[t])
                skip = (-local0) % rows  # a partial first row stays as it is
                assert np.array_equal(a[:skip], b[:skip])
                full = (len(a) - skip) // rows * rows
                ra, rb = a[skip : skip + full].reshape(-1, rows * 64), b[skip : skip + full].reshape(-1, rows * 64)
                assert np.array_equal(np.sort(ra, axis=1), np.sort(rb, axis=1))  # values stay in their row
                changed_any |= not np.array_equal(ra, rb)
            else:
                assert np.array_equal(a, b)
    assert changed_any


def test_tokenising_memory_is_bounded_by_one_tensor(tmp_path: Path) -> None:
    """A 384 MB model of 24 x 16 MB tensors: RSS plateaus at a few tensors and does not grow with the model."""
    script = textwrap.dedent(
        f"""
        import json, torch, gc, psutil
        from pathlib import Path
        from safetensors.torch import save_file
        torch.set_num_threads(1)
        path = Path({str(tmp_path)!r}) / "big.safetensors"
        g = torch.Generator().manual_seed(0)
        save_file({{f"model.layers.{{i}}.mlp.up_proj.weight": torch.randn(2048, 2048, generator=g) for i in range(24)}}, str(path))
        from xsae_cli.sane.dataset import ModelSource, tokenize_to_cache
        from xsae_cli.zoo.sources import resolve
        src = ModelSource("big", resolve(str(path)), "0" * 64)
        gc.collect()
        base = psutil.Process().memory_info().rss
        trace = []
        out = tokenize_to_cache(src, cache_dir=Path({str(tmp_path)!r}) / "cache", on_tensor=lambda d, b: trace.append(psutil.Process().memory_info().rss - base))
        print(json.dumps({{"trace": trace, "n": json.loads((out / "manifest.json").read_text())["n_chunks"]}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["n"] == 24 * 2048 * 2048 // 64
    tensor = 2048 * 2048 * 4
    trace = r["trace"]
    assert max(trace) < 8 * tensor, f"RSS grew {max(trace) / 1e6:.0f} MB for 16 MB tensors of a 384 MB model"
    assert max(trace[12:]) - max(trace[:12]) < 2 * tensor, [round(t / 1e6) for t in trace]  # a plateau, not growth with the model


def test_views_are_cached_apart_and_recorded(demo_zoo, tmp_path) -> None:
    """The canonical and circuit views of one model: their own cache folders and manifests."""
    from xsae_cli.sane.dataset import TokenizedModel, model_source, tokenize_to_cache

    src = model_source("tiny-qwen2")
    canon = TokenizedModel(tokenize_to_cache(src, scheme=CoordScheme(view="canonical"), cache_dir=tmp_path), src.name)
    circ = TokenizedModel(tokenize_to_cache(src, scheme=CoordScheme(), cache_dir=tmp_path), src.name)
    assert canon.folder != circ.folder
    assert canon.manifest["view"]["view"] == "canonical" and canon.manifest["view"]["sorted"] == {"resid": 1, "heads": 4, "mlp": 4}
    v = circ.manifest["view"]
    assert v["view"] == "circuits" and v["anchors"] == 64 and v["layers"] == [0, 1, 2, 3]
    names = [t["name"] for t in circ.manifest["tensors"]]
    assert names[0] == "embed.gram" and "layers.3.circuit_gate" in names and len(names) == 1 + 4 * 4 + 1
    assert names[-1] == "lm_head.circuit_head"  # tiny Qwen2 does not tie its head
    by = {t["name"]: t for t in circ.manifest["tensors"]}
    from xsae_cli.sane.tokenizer import KIND_ID

    assert by["embed.gram"]["depth"] == 0.0 and by["layers.0.circuit_qk"]["kind"] == KIND_ID["circuit_qk"]
    assert by["layers.3.circuit_ov"]["depth"] == (3 + 0.5) / 4 and circ.n_chunks == 18 * 64
    assert by["lm_head.circuit_head"]["depth"] == 1.0


def test_a_bare_file_falls_back_to_its_weights_with_reasons(tmp_path) -> None:
    """No config.json: no circuit view, no canonical form; the weights are tokenised, and the user is told why."""
    import torch
    from safetensors.torch import save_file

    from xsae_cli.sane.dataset import ModelSource, TokenizedModel, tokenize_to_cache
    from xsae_cli.zoo.sources import resolve

    f = tmp_path / "bare.safetensors"
    save_file({"layers.0.w": torch.randn(8, 64), "layers.1.w": torch.randn(8, 64)}, str(f))
    warned: list[str] = []
    tm = TokenizedModel(tokenize_to_cache(ModelSource("bare", resolve(str(f)), "c" * 64), cache_dir=tmp_path / "cache", warn=warned.append), "bare")
    assert tm.manifest["view"]["view"] == "weights" and tm.n_chunks == 16
    assert any("no circuits view" in w and "no config.json" in w and "trying its canonical form" in w for w in warned), warned
    assert any("no canonical view" in w and "tokenised as stored" in w for w in warned), warned
    assert tm.manifest["view"]["reason"] == "no config.json"


def test_cache_key_covers_the_config(tmp_path) -> None:
    """Same weights, another config.json: another cache folder, tokenised under the new anatomy."""
    import json

    from tests.e2e.test_sane_derived import _save

    folder = _save(tmp_path / "m", seed=3)
    first = tokenize_to_cache(model_source(str(folder)), 64, CoordScheme(view="circuits"), cache_dir=tmp_path / "cache")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "not-a-family"
    (folder / "config.json").write_text(json.dumps(cfg))
    second = tokenize_to_cache(model_source(str(folder)), 64, CoordScheme(view="circuits"), cache_dir=tmp_path / "cache")
    assert first != second and first.name.split("-k")[0] == second.name.split("-k")[0]
    views = [json.loads((f / "manifest.json").read_text())["view"]["view"] for f in (first, second)]
    assert views == ["circuits", "weights"]
