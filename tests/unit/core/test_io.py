import pickle
from pathlib import Path

import pytest
import torch

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import (
    Checkpoints,
    atomic_dir,
    atomic_write_text,
    check_safetensors,
    flatten_state,
    load_safetensors,
    refuse_overwrite,
    safe_torch_load,
    save_safetensors,
    unflatten_state,
)


def test_atomic_write_keeps_old_content_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    from xsae_cli.core import io

    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_dir_refuses_without_force_and_replaces_with_force(tmp_path: Path) -> None:
    target = tmp_path / "run"
    with atomic_dir(target) as d:
        (d / "a").write_text("1")
    with pytest.raises(XsaeError, match="--force"):
        with atomic_dir(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(target, force=True) as d:
            (d / "a").write_text("2")
            raise RuntimeError
    assert (target / "a").read_text() == "1"  # a failed forced run destroys nothing
    with atomic_dir(target, force=True) as d:
        (d / "a").write_text("2")
    assert (target / "a").read_text() == "2"
    refuse_overwrite(tmp_path / "missing", force=False)


def test_safetensors_round_trip_and_truncation(tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_safetensors(tensors, f, metadata={"k": "v"})
    back = load_safetensors(f)
    assert torch.equal(back["a"], tensors["a"]) and torch.equal(back["b"], tensors["b"])
    data = f.read_bytes()
    f.write_bytes(data[:-7])
    with pytest.raises(XsaeError, match="truncated safetensors file .*w.safetensors"):
        check_safetensors(f)
    f.write_bytes(b"\x00" * 3)
    with pytest.raises(XsaeError, match="corrupt"):
        load_safetensors(f)


class _Evil:
    def __reduce__(self):  # noqa: D105
        return (print, ("pwned",))


def test_safe_torch_load_refuses_code_objects(tmp_path: Path) -> None:
    ok = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2)}, ok)
    assert torch.equal(safe_torch_load(ok)["w"], torch.ones(2))
    bad = tmp_path / "bad.pt"
    torch.save({"w": torch.ones(2), "obj": _Evil()}, bad, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(XsaeError, match="refused to load .*bad.pt: unpickling it would need code"):
        safe_torch_load(bad)


def test_flatten_state_round_trips_an_optimizer_state() -> None:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": 5, "rng": torch.get_rng_state()}
    tensors, skeleton = flatten_state(state)
    import json

    back = unflatten_state(tensors, json.loads(json.dumps(skeleton)))
    opt2 = torch.optim.Adam(torch.nn.Linear(4, 3).parameters(), lr=1e-3)
    opt2.load_state_dict(back["opt"])
    assert back["step"] == 5
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(back["rng"], state["rng"])


def test_checkpoints_keep_last_and_ignore_incomplete(tmp_path: Path) -> None:
    ck = Checkpoints(tmp_path, keep=2)
    for step in (10, 20, 30):
        ck.save(step, {"w": torch.full((2,), float(step))}, {"tokens": step * 100})
    assert ck.steps() == [20, 30]
    # A half-written checkpoint (crash mid-save) has no meta.json and is never picked.
    (tmp_path / "checkpoints" / "step_000000040").mkdir()
    step, state, meta = ck.latest()  # type: ignore[misc]
    assert step == 30 and meta["tokens"] == 3000 and torch.equal(state["w"], torch.full((2,), 30.0))


def test_atomic_dir_cleans_the_debris_of_dead_builders_only(tmp_path) -> None:
    """A kill -9 during a harvest left `.<key>.<host>-<pid>.*.tmp`; the next build removes it, not a live one's."""
    import os
    import subprocess
    import sys
    import time

    from xsae_cli.core.io import _owner_tag, atomic_dir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _owner_tag().rsplit("-", 1)[0]
    key = tmp_path / "abc123"
    names = {
        "dead": f".abc123.{host}-{dead.pid}.x1y2.tmp",
        "live": f".abc123.{host}-{os.getpid()}.q9.tmp",
        "other_host": f".abc123.elsewhere-{dead.pid}.z.tmp",
        "legacy_new": ".abc123.k3j4.tmp",
        "legacy_old": ".abc123.old5.tmp",
        "other_key": f".zzz.{host}-{dead.pid}.a.tmp",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard_00000.safetensors").write_bytes(b"x")
    old = time.time() - 2 * 24 * 3600
    os.utime(tmp_path / names["legacy_old"], (old, old))
    with atomic_dir(key) as tmp:
        assert tmp.name.startswith(f".abc123.{host}-{os.getpid()}.")
        (tmp / "meta.json").write_text("{}")
    left = {k for k, n in names.items() if (tmp_path / n).exists()}
    assert left == {"live", "other_host", "legacy_new", "other_key"}
    assert (key / "meta.json").exists()
