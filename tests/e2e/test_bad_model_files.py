"""Bad model files, by kind, through the real `xsae`: exit 2, one stderr line naming the file, no
traceback, and nothing written or catalogued.

One builder per *kind* of damage (not per example): safetensors headers that are valid JSON but
not a tensor mapping, shapes that disagree with their byte range, negative dimensions, reversed,
overlapping or gapped offsets, unknown dtypes, trailing bytes; PyTorch files that are empty,
garbage, truncated, pickled code or not a state dict; GGUF files that are not GGUF or are cut
short; HF folders transformers would refuse or silently mis-load. Every kind goes through
`zoo add`; one kind of each format goes through every command that reads it (the validation
lives in one place, the source registry, so the other commands share it); the full matrix is
`-m slow`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import assert_user_error, run_xsae

# ----------------------------------------------------------------------------------- builders


def _st(header: object, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def _f32(shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


#: kind -> (file bytes, words the error must contain besides the file name)
SAFETENSORS: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "header-a-list": (_st([1, 2, 3], b""), ("not a mapping",)),
    "header-a-number": (_st(7, b""), ("not a mapping",)),
    "entry-not-a-mapping": (_st({"w": [0, 4]}, b"\0" * 4), ("'w'", "dtype, shape, data_offsets")),
    "shape-vs-bytes": (_st({"w": _f32([4, 4], 0, 32)}, b"\0" * 32), ("'w'", "needs 64 bytes", "hold 32")),
    "negative-dimension": (_st({"w": _f32([-2, -2], 0, 16)}, b"\0" * 16), ("'w'", "negative dimension")),
    "shape-not-integers": (_st({"w": _f32(["2", 2], 0, 16)}, b"\0" * 16), ("'w'", "not a list of integers")),
    "reversed-offsets": (_st({"w": _f32([2], 8, 0)}, b"\0" * 8), ("'w'", "reversed")),
    "overlapping-offsets": (_st({"a": _f32([4], 0, 16), "b": _f32([4], 8, 24)}, b"\0" * 24), ("'b'", "overlaps")),
    "gap-between-tensors": (_st({"a": _f32([4], 0, 16), "b": _f32([4], 20, 36)}, b"\0" * 36), ("'b'", "gap")),
    "unknown-dtype": (_st({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), ("'w'", "unknown dtype 'Q7'")),
    "metadata-not-strings": (_st({"__metadata__": {"step": 5}, "w": _f32([2], 0, 8)}, b"\0" * 8), ("__metadata__",)),
    "trailing-bytes": (_st({"w": _f32([2], 0, 8)}, b"\0" * 18), ("10 bytes after its last tensor",)),
    "truncated-data": (_st({"w": _f32([64], 0, 256)}, b"\0" * 100), ("truncated",)),
    "header-length-too-big": ((10**6).to_bytes(8, "little") + b"{}", ("header length",)),
    "not-json": (len(b"{nope").to_bytes(8, "little") + b"{nope", ("corrupt",)),
    "empty": (b"", ("shorter than",)),
}


def _pt_bytes(kind: str, tmp: Path) -> bytes:
    import pickle

    import torch

    f = tmp / "build.pt"
    if kind == "empty":
        return b""
    if kind == "garbage":
        return bytes(range(256)) * 4
    if kind == "text":
        return b"this is not a checkpoint\n" * 20
    if kind == "truncated-zip":
        torch.save({"w": torch.ones(64)}, f)
        return f.read_bytes()[:-200]
    if kind == "pickled-code":
        torch.save({"w": torch.ones(2), "obj": _Evil()}, f, pickle_protocol=pickle.DEFAULT_PROTOCOL)
        return f.read_bytes()
    if kind == "not-a-state-dict":
        torch.save([torch.ones(2), torch.ones(3)], f)
        return f.read_bytes()
    if kind == "no-tensors":
        torch.save({"step": 3, "name": "x"}, f)
        return f.read_bytes()
    raise AssertionError(kind)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never be printed",))


PT: dict[str, tuple[str, ...]] = {
    "empty": ("not a PyTorch checkpoint", "empty"),
    "garbage": ("not a PyTorch checkpoint",),
    "text": ("not a PyTorch checkpoint",),
    "truncated-zip": ("cannot read PyTorch checkpoint",),
    "pickled-code": ("unpickling it would need code", "print", "safetensors"),
    "not-a-state-dict": ("not a state dict",),
    "no-tensors": ("holds no tensors",),
}


def _gguf_bytes(kind: str, tmp: Path) -> bytes:
    import gguf
    import numpy as np

    f = tmp / "build.gguf"
    w = gguf.GGUFWriter(str(f), "llama")
    w.add_tensor("a.weight", np.ones((4, 8), dtype=np.float32))
    w.add_tensor("b.weight", np.ones((16,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    good = f.read_bytes()
    return {"not-gguf": b"GGML" + good[4:], "empty": b"", "truncated-header": good[:40], "truncated-data": good[:-32]}[kind]


GGUF: dict[str, tuple[str, ...]] = {
    "not-gguf": ("magic",),
    "empty": ("magic",),
    "truncated-header": ("truncated",),
    "truncated-data": ("truncated",),
}


def _make(fmt: str, kind: str, tmp: Path) -> tuple[Path, tuple[str, ...]]:
    if fmt == "safetensors":
        data, needles = SAFETENSORS[kind]
        path = tmp / f"bad-{kind}.safetensors"
    elif fmt == "pt":
        data, needles = _pt_bytes(kind, tmp), PT[kind]
        path = tmp / f"bad-{kind}.pt"
    else:
        data, needles = _gguf_bytes(kind, tmp), GGUF[kind]
        path = tmp / f"bad-{kind}.gguf"
    path.write_bytes(data)
    for scratch in tmp.glob("build.*"):
        scratch.unlink()
    return path, needles


# ----------------------------------------------------------------------------------- runner

COMMANDS: dict[str, Callable[[Path], list[str]]] = {
    "zoo add": lambda p: ["zoo", "add", str(p), "--name", "bad"],
    "zoo weights": lambda p: ["zoo", "weights", str(p)],
    "zoo weights --stats": lambda p: ["zoo", "weights", str(p), "--stats"],
    "sane tokenize": lambda p: ["sane", "tokenize", str(p), "--view", "weights"],
}


def _refused(tmp_path: Path, path: Path, command: str, needles: tuple[str, ...]) -> None:
    """Run ``command`` on ``path`` in a fresh home and cache; assert a clean refusal that changed nothing."""
    from xsae_cli.zoo.registry import Registry

    home, cache = tmp_path / "home", tmp_path / "cache"
    before = _digest(path)
    proc = run_xsae(*COMMANDS[command](path), env={"XSAE_HOME": str(home), "XSAE_CACHE": str(cache)})
    assert_user_error(proc, path.name, *needles)
    assert "must never be printed" not in proc.stdout + proc.stderr  # no pickle payload ran
    assert _digest(path) == before
    assert Registry(home).list() == []  # nothing catalogued
    assert not [f for f in cache.rglob("*") if f.is_file()] if cache.exists() else True  # nothing cached


def _digest(path: Path) -> str:
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()


CASES = [("safetensors", k) for k in SAFETENSORS] + [("pt", k) for k in PT] + [("gguf", k) for k in GGUF]
#: One kind per format through every command; every other kind through `zoo add` only (default run).
ONE_PER_FORMAT = {"safetensors": "negative-dimension", "pt": "garbage", "gguf": "truncated-data"}


def _param(fmt: str, kind: str, command: str) -> object:
    default = command == "zoo add" or ONE_PER_FORMAT[fmt] == kind
    return pytest.param(fmt, kind, command, id=f"{fmt}-{kind}-{command.replace(' ', '_')}", marks=() if default else pytest.mark.slow)


@pytest.mark.parametrize(("fmt", "kind", "command"), [_param(f, k, c) for f, k in CASES for c in COMMANDS])
def test_bad_model_file_is_one_clean_error(tmp_path: Path, fmt: str, kind: str, command: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    path, needles = _make(fmt, kind, src)
    _refused(tmp_path, path, command, needles)


def test_zoo_info_of_a_refused_model_says_it_is_not_catalogued(tmp_path: Path) -> None:
    data, _ = SAFETENSORS["unknown-dtype"]
    path = tmp_path / "odd.safetensors"
    path.write_bytes(data)
    env = {"XSAE_HOME": str(tmp_path / "home")}
    assert_user_error(run_xsae("zoo", "add", str(path), env=env), "odd.safetensors", "unknown dtype")
    assert_user_error(run_xsae("zoo", "info", "odd", env=env), "unknown model 'odd'")


def test_bad_shard_in_a_folder_names_the_shard(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    """A folder is only as good as its worst shard: the damaged one is named, nothing catalogued."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_gpt2_dir, folder)
    st = folder / "model.safetensors"
    raw = st.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    name = min(k for k in header if k != "__metadata__")
    header[name]["shape"] = [-1, *header[name]["shape"][1:]]
    body = json.dumps(header).encode()
    st.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])
    _refused(tmp_path, folder, "zoo add", ("model.safetensors", name, "negative dimension"))


# ----------------------------------------------------------------------------------- HF folders


def _folder(tiny_gpt2_dir: Path, tmp_path: Path, kind: str) -> tuple[Path, tuple[str, ...]]:
    import pickle

    import torch

    d = tmp_path / f"hf-{kind}"
    shutil.copytree(tiny_gpt2_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    if kind == "pickled-bin":
        from safetensors.torch import load_file

        state = dict(load_file(str(d / "model.safetensors")))
        (d / "model.safetensors").unlink()
        state["extra"] = _Evil()  # type: ignore[assignment]
        torch.save(state, d / "pytorch_model.bin", pickle_protocol=pickle.DEFAULT_PROTOCOL)
        return d, ("pytorch_model.bin", "unpickling it would need code", "safetensors")
    if kind == "remote-code":
        cfg.update(model_type="mything", architectures=["MyThingForCausalLM"], auto_map={"AutoConfig": "configuration_mything.MyConfig", "AutoModelForCausalLM": "modeling_mything.MyModel"})
        (d / "config.json").write_text(json.dumps(cfg))
        return d, ("config.json", "remote code", "XSAE_ZOO_TRUST_REMOTE_CODE=true")
    if kind == "shapes-disagree":
        cfg["n_embd"] = 32
        (d / "config.json").write_text(json.dumps(cfg))
        return d, ("config.json disagrees with the weights", "tensor transformer.h.0.attn.c_attn.bias is [48] in the weights but the config builds [96]")
    if kind == "more-layers-than-weights":
        cfg["n_layer"] = 4
        (d / "config.json").write_text(json.dumps(cfg))
        return d, ("config.json builds tensor transformer.h.2", "start at random")
    if kind == "config-not-json":
        (d / "config.json").write_text("{not json")
        return d, ("config.json",)
    raise AssertionError(kind)


#: Each loads torch and transformers (~4 s): three kinds by default, the rest with -m slow.
FOLDER_KINDS = ["pickled-bin", "remote-code", "shapes-disagree", pytest.param("more-layers-than-weights", marks=pytest.mark.slow), pytest.param("config-not-json", marks=pytest.mark.slow)]


@pytest.mark.parametrize("kind", FOLDER_KINDS)
def test_sae_train_refuses_a_bad_hf_folder_before_any_harvest(tmp_path: Path, tiny_gpt2_dir: Path, kind: str) -> None:
    folder, needles = _folder(tiny_gpt2_dir, tmp_path, kind)
    out, cache = tmp_path / "run", tmp_path / "cache"
    proc = run_xsae(
        "sae", "train", "--model", str(folder), "--hook", "transformer.h.0", "--out", str(out), "--tokens", "2k", "--k", "4", env={"XSAE_HOME": str(tmp_path / "home"), "XSAE_CACHE": str(cache)}
    )
    assert_user_error(proc, folder.name, *needles)
    assert "must never be printed" not in proc.stdout + proc.stderr
    assert not out.exists()  # no run folder
    assert not (cache / "activations").exists()  # no harvest started


def test_zoo_add_refuses_a_folder_whose_bin_needs_code(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    folder, needles = _folder(tiny_gpt2_dir, tmp_path, "pickled-bin")
    _refused(tmp_path, folder, "zoo add", needles)
