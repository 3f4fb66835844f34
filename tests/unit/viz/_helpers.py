"""Fixtures shared by the viz tests: small real files (cut from real `xsae` runs) and synthetic
ones of any size, plus headless Chromium for the dashboard."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"
CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
NO_CHROMIUM = "headless Chromium not installed (/usr/bin/chromium); `apt-get install -y chromium` or `make test` installs it"
URL = re.compile(r"https?://", re.IGNORECASE)


def real_features() -> dict[str, Any]:
    """12 latents of a real `xsae sae features` file (tiny-gpt2, transformer.h.2; latent 2 dead)."""
    return json.loads((DATA / "features_small.json").read_text())


def many_features(n: int) -> dict[str, Any]:
    """``n`` latents in the real file's shape (its latents repeated with new ids)."""
    base = real_features()
    src = base["latents"]
    base["latents"] = [dict(copy.deepcopy(src[i % len(src)]), id=i) for i in range(n)]
    base["d_sae"] = n
    return base


def write_run(root: Path, name: str = "run", hooks: tuple[str, ...] = ("transformer.h.2",)) -> Path:
    """An SAE run folder as `xsae sae train` leaves it (log, run.json, per hook cfg.json + features.json)."""
    run = root / name
    run.mkdir(parents=True)
    rows = [r for r in map(json.loads, (DATA / "train_log.jsonl").read_text().splitlines()) if r["hook"] == "transformer.h.2"]
    with open(run / "train_log.jsonl", "w") as fh:
        for hook in hooks:
            fh.writelines(json.dumps(dict(r, hook=hook)) + "\n" for r in rows)
    (run / "run.json").write_text(json.dumps({"spec": {"model": "tiny-gpt2", "hooks": list(hooks)}}))
    for hook in hooks:
        d = run / hook
        d.mkdir()
        (d / "cfg.json").write_text(json.dumps({"hook_name": hook, "d_in": 64, "d_sae": 256}))
        (d / "features.json").write_text(json.dumps(dict(real_features(), hook=hook)))
    return run


def write_sane_run(root: Path, name: str = "sane", epochs: int = 2) -> Path:
    """A SANE run folder as `xsae sane train --out` leaves it (history in each checkpoint's config.json)."""
    run = root / name
    cfg = json.loads((DATA / "sane_config.json").read_text())
    for e in range(1, epochs + 1):
        ck = run / f"checkpoint_epoch_{e}"
        ck.mkdir(parents=True)
        (ck / "config.json").write_text(json.dumps(dict(cfg, epoch=e, history=cfg["history"][:e])))
    return run


def chromium(url: str, *args: str, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM
    profile = tempfile.mkdtemp(prefix="xsae-chromium-")
    try:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-extensions",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=2000",
                "--window-size=1280,1600",
                *args,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "HOME": profile},
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def card_ids(dom: str) -> list[int]:
    return [int(m) for m in re.findall(r'<section class="latent-card" id="latent-\d+" data-id="(\d+)"', dom)]


# ------------------------------------------------------------------ run folders for `viz report`


def tiny_png(w: int = 40, h: int = 20) -> bytes:
    """A small real PNG (a plot some other tool left in the run folder)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (0, 114, 178)).save(buf, format="PNG")
    return buf.getvalue()


SVG_SMALL = '<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20"><rect width="40" height="20" fill="#0072B2"/></svg>\n'


def write_full_sae_run(root: Path, name: str = "sae") -> Path:
    """An SAE run with the real run.json / metrics.json / cfg.json of a tiny-gpt2 `xsae sae train`."""
    run = write_run(root, name)
    shutil.copy(DATA / "sae_run.json", run / "run.json")
    shutil.copy(DATA / "sae_metrics.json", run / "metrics.json")
    shutil.copy(DATA / "sae_cfg.json", run / "transformer.h.2" / "cfg.json")
    return run


def write_sane_embed(root: Path, name: str = "sane-embed") -> Path:
    """The --output-dir of `xsae sane embed` (five tiny models' real embeddings)."""
    out = root / name
    out.mkdir(parents=True)
    shutil.copy(DATA / "model_embeddings.json", out / "model_embeddings.json")
    return out


def write_restore_run(root: Path, name: str = "restore") -> Path:
    """A restoration run's files as `xsae restore train` wrote them (30 tiny steps)."""
    run = root / name
    shutil.copytree(DATA / "restore_run", run)
    return run


def write_align_run(root: Path, name: str = "align") -> Path:
    """What the align group's report.json is announced to hold: a kind, config, versions and tables."""
    run = root / name
    run.mkdir(parents=True)
    report = {
        "kind": "align",
        "a": "smollm2-135m",
        "b": "minilm-l6",
        "config": {"layers": ["5", "6"], "mappers": ["procrustes", "ridge"], "k": 32},
        "versions": {"python": "3.11", "torch": "2.13.0"},
        "tables": {
            "mapper r2 (test)": [
                {"layer": 5, "mapper": "procrustes", "r2": 0.41, "null": 0.02, "ceiling": 0.77},
                {"layer": 5, "mapper": "ridge", "r2": 0.47, "null": 0.03, "ceiling": 0.81},
                {"layer": 6, "mapper": "ridge", "r2": 0.44, "null": 0.01, "ceiling": 0.79},
            ],
            "similarity": {"columns": ["layer", "cka", "svcca"], "rows": [[5, 0.62, 0.55], [6, 0.58, 0.51]]},
        },
        "results": [{"layer_a": 5, "layer_b": 2, "directions": {"a_to_b": {"ridge": {"r2": 0.47}}}}],
    }
    (run / "report.json").write_text(json.dumps(report))
    (run / "heatmap.png").write_bytes(tiny_png())
    (run / "bars.svg").write_text(SVG_SMALL)
    return run


def write_demo_tree(root: Path) -> Path:
    """A folder holding several run folders, as `make demo` leaves runs/demo."""
    demo = root / "demo"
    demo.mkdir(parents=True)
    write_full_sae_run(demo, "sae")
    sane = write_sane_run(demo, "sane")
    write_sane_embed(sane, "embed")
    write_restore_run(demo, "restore")
    write_align_run(demo, "align")
    return demo


def page_images(page: str) -> list[tuple[str, bytes]]:
    """(mime, bytes) of every <img> of a page, all of which must be data: URIs."""
    import base64

    srcs = re.findall(r'<img src="([^"]*)"', page)
    out = []
    for src in srcs:
        m = re.fullmatch(r"data:(image/[a-z+]+);base64,([A-Za-z0-9+/=]+)", src)
        assert m, f"not an embedded picture: {src[:80]}"
        out.append((m.group(1), base64.b64decode(m.group(2))))
    return out


EXTERNAL_REF = re.compile(r"""(?:src|href|action|srcset)\s*=\s*["']?\s*(?!data:|#)[a-z]+:""", re.IGNORECASE)
