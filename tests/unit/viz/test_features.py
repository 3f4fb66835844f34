"""`viz features`: the offline dashboard's HTML, its embedded data, bad input, and (when Chromium is
installed) the page as a browser renders it: card count, search, screenshot, no script errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.unit.viz._helpers import (
    CHROMIUM,
    NO_CHROMIUM,
    URL,
    card_ids,
    chromium,
    many_features,
    real_features,
    write_run,
)
from xsae_cli.core.errors import XsaeError
from xsae_cli.viz.features import (
    PAGE_SIZE,
    find_features,
    html_page,
    load_features,
    write_features_page,
)


def _payload(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="xsae-data">(.*?)</script>', page, re.DOTALL)
    assert m, "no embedded data"
    return json.loads(m.group(1))


def test_page_embeds_data_offline(tmp_path: Path) -> None:
    data = real_features()
    page = html_page(data)
    assert not URL.search(page), URL.search(page)
    assert "<link" not in page and "src=" not in page  # nothing to fetch: no stylesheets, scripts or images
    payload = _payload(page)
    assert [lat["id"] for lat in payload["latents"]] == [lat["id"] for lat in data["latents"]]
    first, src = payload["latents"][0], data["latents"][0]
    assert first["top_contexts"][0]["tokens"] == src["top_contexts"][0]["tokens"]
    assert first["histogram"]["counts"] == src["histogram"]["counts"]
    assert payload["edges"][first["histogram"]["edges"]][-1] == pytest.approx(src["histogram"]["edges"][-1])
    assert first["logit_lens"]["promoted"][0][0] == src["logit_lens"]["promoted"][0][0]
    assert len(payload["edges"]) == 1  # shared edges stored once
    assert 'id="search"' in page and "latent-card" in page and "tiny-gpt2" in page


def test_hostile_tokens_stay_text(tmp_path: Path) -> None:
    data = real_features()
    data["latents"][0]["top_contexts"][0]["tokens"][0] = "</script><img src=x onerror=alert(1)>"
    data["model"] = "<b>m</b>"
    page = html_page(data)
    assert page.count("</script>") == 2 and "<img" not in page and "<b>m</b>" not in page
    assert _payload(page)["latents"][0]["top_contexts"][0]["tokens"][0].startswith("</script>")


def test_size_scales_with_latents(tmp_path: Path) -> None:
    out = tmp_path / "f.html"
    s = write_features_page(_write(tmp_path, many_features(2000)), out)
    assert s["latents"] == 2000 and s["bytes"] == out.stat().st_size
    assert s["bytes"] < 2000 * 2500  # compact: ~2 KB per latent with 4 contexts


def _write(tmp_path: Path, data: dict, name: str = "features.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_find_features_in_run_folders(tmp_path: Path) -> None:
    run = write_run(tmp_path, hooks=("transformer.h.1", "transformer.h.2"))
    with pytest.raises(XsaeError, match=r"several hooks \(transformer.h.1, transformer.h.2\).*--hook"):
        find_features(run)
    assert find_features(run, "transformer.h.2") == run / "transformer.h.2" / "features.json"
    assert find_features(run / "transformer.h.1") == run / "transformer.h.1" / "features.json"
    with pytest.raises(XsaeError, match="no features.json for hook 'x'"):
        find_features(run, "x")
    # A real cfg.json (SAELens 6) keeps the hook in metadata, and the folder name is sanitised.
    odd = run / "model.layers_3_"
    (run / "transformer.h.1").rename(odd)
    (odd / "cfg.json").write_text(json.dumps({"d_in": 64, "metadata": {"hook_name": "model.layers[3]"}}))
    assert find_features(run, "model.layers[3]") == odd / "features.json"
    with pytest.raises(XsaeError, match=r"several hooks \(model.layers\[3\], transformer.h.2\)"):
        find_features(run)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(XsaeError, match=r"no features.json in .*looked for .*features.json.*xsae sae features"):
        find_features(empty)


def test_bad_features_named(tmp_path: Path) -> None:
    cases = []
    d = real_features()
    del d["latents"]
    cases.append((d, "missing field 'latents'"))
    d = real_features()
    del d["latents"][3]["top_contexts"]
    cases.append((d, "latent 3: missing field 'top_contexts'"))
    d = real_features()
    d["latents"][1]["histogram"]["counts"].append(1)
    cases.append((d, "latent 1 histogram has 50 counts for 50 edges"))
    d = real_features()
    d["latents"][0]["top_contexts"][0]["acts"].pop()
    cases.append((d, "top_contexts[0] has"))
    d = real_features()
    d["latents"][0]["id"] = "zero"
    cases.append((d, "field 'id' must be an integer"))
    for data, needle in cases:
        p = _write(tmp_path, data)
        with pytest.raises(XsaeError) as exc:
            load_features(p)
        assert needle in str(exc.value) and str(p) in str(exc.value), str(exc.value)


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_dashboard_in_headless_chromium(tmp_path: Path) -> None:
    n = 180
    data = many_features(n)
    for lat in data["latents"]:
        if lat["id"] % 12 == 4:  # an unusual token where these latents fire
            ctx = lat["top_contexts"][0]
            ctx["tokens"][1], ctx["acts"][1] = " Quokka", 0.5
    out = tmp_path / "features.html"
    write_features_page(_write(tmp_path, data), out)
    url = out.resolve().as_uri()

    shot = tmp_path / "shot.png"
    proc = chromium(url, f"--screenshot={shot}")
    assert shot.exists() and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape == (1600, 1280) and img.std() > 10  # a rendered page, not a blank one

    dom = chromium(url, "--dump-dom").stdout
    assert card_ids(dom) == list(range(PAGE_SIZE)), card_ids(dom)[:5]  # lazily: one page of cards, not 180
    assert f"{n} of {n} latents match" in dom
    assert re.search(r'<div id="errors" hidden="">\s*</div>', dom), "the page logged a script error"
    assert dom.count('class="tok') > 100 and "<svg" in dom and 'class="chip p"' in dom

    by_id = chromium(url + "#q=123", "--dump-dom").stdout
    assert card_ids(by_id) == [123]
    ranged = chromium(url + "#q=10-14", "--dump-dom").stdout
    assert card_ids(ranged) == [10, 11, 12, 13, 14]
    by_tok = chromium(url + "#q=quokka", "--dump-dom").stdout
    assert card_ids(by_tok) == list(range(4, n, 12))
    assert card_ids(chromium(url + "#q=token:%20Quokka", "--dump-dom").stdout) == list(range(4, n, 12))
    none = chromium(url + "#q=token:zzzqqq-not-a-token", "--dump-dom").stdout
    assert card_ids(none) == [] and f"0 of {n} latents match" in none
