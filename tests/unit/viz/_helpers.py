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
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}", "--virtual-time-budget=2000",
             "--window-size=1280,1600", *args, url],
            capture_output=True, text=True, timeout=timeout, check=False, env={**os.environ, "HOME": profile},
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def card_ids(dom: str) -> list[int]:
    return [int(m) for m in re.findall(r'<section class="latent-card" id="latent-\d+" data-id="(\d+)"', dom)]
