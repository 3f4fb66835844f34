"""`xsae viz features`: one offline HTML dashboard of an SAE's latents.

Reads the ``features.json`` that `xsae sae features` writes and embeds it (compacted) in a
``<script type="application/json">`` tag of a single page: no server, no network, no external
file. Per latent the page shows frequency / mean / max activation, an activation histogram (inline
SVG), the top-activating contexts with each token shaded by its activation, and the logit-lens
tokens the decoder direction promotes and suppresses. A search box filters by latent id (``42``,
``10-20``) or by token (``the``, ``token:42``). Cards are built only when shown, 50 at a time as
the reader scrolls, so pages with thousands of latents stay responsive.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import atomic_write_text, read_json
from xsae_cli.viz.common import esc, require, script_json

PAGE_SIZE = 50


def find_features(path: str | Path, hook: str | None = None) -> Path:
    """The features.json behind ``path``: the file itself, a hook folder, or a run folder."""
    path = Path(path)
    if not path.exists():
        raise XsaeError(f"not found: {path}", "give a features.json, or the SAE run folder `xsae sae features` wrote it into")
    if path.is_file():
        return path
    if (path / "features.json").exists():
        return path / "features.json"
    found = sorted(path.glob("*/features.json"))
    if hook is not None:
        matches = [p for p in found if _hook_of(p) == hook or p.parent.name == hook]
        if not matches:
            have = ", ".join(_hook_of(p) or p.parent.name for p in found) or "none"
            raise XsaeError(f"no features.json for hook '{hook}' in {path} (hooks with features: {have})", f"run `xsae sae features {path} --hook {hook}` first")
        return matches[0]
    if len(found) == 1:
        return found[0]
    if not found:
        raise XsaeError(f"no features.json in {path}: looked for {path / 'features.json'} and {path}/<hook>/features.json", f"run `xsae sae features {path}` first")
    hooks = ", ".join(_hook_of(p) or p.parent.name for p in found)
    raise XsaeError(f"{path} has features for several hooks ({hooks})", "choose one with --hook")


def _hook_of(p: Path) -> str | None:
    try:
        cfg = read_json(p.parent / "cfg.json") if (p.parent / "cfg.json").exists() else {}
    except XsaeError:
        return None
    if not isinstance(cfg, dict):
        return None
    # SAELens 6 keeps the hook in metadata (what `xsae sae train` writes); older files at the top.
    meta = _v if isinstance(_v := cfg.get("metadata"), dict) else {}
    return cfg.get("hook_name") or meta.get("hook_name")


def load_features(path: str | Path) -> dict[str, Any]:
    """Read and check a features.json; a missing field is named with the file and the latent."""
    path = Path(path)
    data = read_json(path, "features file")
    if not isinstance(data, dict):
        raise XsaeError(f"{path}: expected a JSON object with a 'latents' field, got {type(data).__name__}", "point at the features.json that `xsae sae features` writes")
    latents = require(data, "latents", path, kind=list)
    for n, lat in enumerate(latents):
        where = f"latents[{n}]"
        if not isinstance(lat, dict):
            raise XsaeError(f"{path}: {where} must be an object", "re-create it with `xsae sae features`")
        require(lat, "id", path, where, int)
        where = f"latent {lat['id']}"
        for f in ("frequency", "max_act"):
            require(lat, f, path, where, (int, float))
        contexts = require(lat, "top_contexts", path, where, list)
        for j, c in enumerate(contexts):
            tokens = require(c, "tokens", path, f"{where} top_contexts[{j}]", list)
            acts = require(c, "acts", path, f"{where} top_contexts[{j}]", list)
            if len(tokens) != len(acts):
                raise XsaeError(f"{path}: {where} top_contexts[{j}] has {len(tokens)} tokens but {len(acts)} acts", "re-create it with `xsae sae features`")
        hist = lat.get("histogram")
        if hist is not None:
            edges = require(hist, "edges", path, f"{where} histogram", list)
            counts = require(hist, "counts", path, f"{where} histogram", list)
            if len(counts) != len(edges) - 1:
                raise XsaeError(f"{path}: {where} histogram has {len(counts)} counts for {len(edges)} edges (expected {len(edges) - 1})", "re-create it with `xsae sae features`")
    return data


def _r(x: Any, digits: int = 4) -> Any:
    """Round to ``digits`` significant digits (keeps the page small; the page shows 3)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool) or x == 0 or not math.isfinite(x):
        return x if isinstance(x, (int, float)) and math.isfinite(x) else None
    return float(f"{x:.{digits}g}")


def compact(data: dict[str, Any]) -> dict[str, Any]:
    """The page's payload: the same field names as features.json, floats rounded, shared histogram edges once."""
    edges_seen: list[list[float]] = []

    def edges_id(edges: list[float]) -> int:
        for i, e in enumerate(edges_seen):
            if e == edges:
                return i
        edges_seen.append(edges)
        return len(edges_seen) - 1

    latents = []
    for lat in data["latents"]:
        hist = lat.get("histogram")
        out: dict[str, Any] = {
            "id": lat["id"],
            "frequency": _r(lat["frequency"]),
            "mean_act": _r(lat.get("mean_act", 0.0)),
            "max_act": _r(lat["max_act"]),
            "histogram": {"edges": edges_id(hist["edges"]), "counts": hist["counts"]} if hist else None,
            "top_contexts": [
                {"tokens": [str(t) for t in c["tokens"]], "acts": [_r(a, 3) for a in c["acts"]], "max_index": c.get("max_index"), "max_act": _r(c.get("max_act"))} for c in lat["top_contexts"]
            ],
        }
        lens = lat.get("logit_lens")
        if lens:
            out["logit_lens"] = {k: [[str(t), _r(v, 3)] for t, v in lens.get(k) or []] for k in ("promoted", "suppressed")}
        latents.append(out)
    meta = {k: data.get(k) for k in ("model", "hook", "d_in", "d_sae", "architecture", "n_tokens", "n_contexts", "dead_fraction", "run", "corpus") if k in data}
    return {"format": "xsae-features-page", "meta": meta, "edges": [[_r(e, 6) for e in es] for es in edges_seen], "latents": latents}


def html_page(data: dict[str, Any], page_size: int = PAGE_SIZE, source: str = "") -> str:
    payload = compact(data)
    meta = payload["meta"]
    title = "SAE features" + (f": {meta['model']}" if meta.get("model") else "") + (f" · {meta['hook']}" if meta.get("hook") else "")
    facts = []
    for key, label in (("d_in", "d_in"), ("d_sae", "d_sae"), ("architecture", "architecture"), ("n_tokens", "tokens scanned"), ("n_contexts", "contexts")):
        if meta.get(key) is not None:
            facts.append(f"{label} {meta[key]:,}" if isinstance(meta[key], int) else f"{label} {meta[key]}")
    if isinstance(meta.get("dead_fraction"), (int, float)):
        facts.append(f"dead {100 * meta['dead_fraction']:.1f}%")
    if source:
        facts.append(f"from {source}")
    return _TEMPLATE.replace("__TITLE__", esc(title)).replace("__FACTS__", esc(" · ".join(facts))).replace("__PAGE_SIZE__", str(int(page_size))).replace("__DATA__", script_json(payload))


def write_features_page(src: str | Path, output: str | Path, hook: str | None = None, page_size: int = PAGE_SIZE) -> dict[str, Any]:
    path = find_features(src, hook)
    data = load_features(path)
    if not data["latents"]:
        raise XsaeError(f"{path} holds no latents", "re-run `xsae sae features` on a trained SAE")
    text = html_page(data, page_size=page_size, source=path.name if path.parent == Path(".") else f"{path.parent.name}/{path.name}")
    output = Path(output)
    atomic_write_text(output, text)
    return {"written": str(output), "source": str(path), "latents": len(data["latents"]), "bytes": len(text.encode("utf-8"))}


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
:root{--fg:#1d232a;--muted:#66707a;--line:#e3e6ea;--act:255,122,0;--pro:#0a7a3e;--sup:#b3261e}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:var(--fg);background:#f6f7f9}
header{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line);padding:12px 24px}
h1{font-size:18px;margin:0 0 2px} .facts{color:var(--muted);font-size:12.5px}
.controls{display:flex;gap:12px;align-items:center;margin-top:10px;flex-wrap:wrap}
#search{font:inherit;padding:6px 10px;width:340px;border:1px solid #c9ced4;border-radius:6px}
select,label{font:inherit;font-size:13px;color:var(--muted)} #status{font-size:12.5px;color:var(--muted)}
main{padding:16px 24px;max-width:1200px}
.latent-card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:12px 14px;margin-bottom:12px}
.latent-card .head{display:flex;gap:16px;align-items:baseline;flex-wrap:wrap}
.latent-card h2{font-size:15px;margin:0} .stats{color:var(--muted);font-size:12.5px}
.row{display:grid;grid-template-columns:290px 1fr;gap:18px;margin-top:8px}
@media (max-width:800px){.row{grid-template-columns:1fr}}
.hist svg{display:block} .hist .cap{font-size:11px;color:var(--muted)}
.ctx{font:12.5px/1.9 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-all;border-bottom:1px dashed var(--line);padding:1px 0}
.ctx .v{display:inline-block;min-width:52px;color:var(--muted);font-size:11px}
.tok{border-radius:2px;padding:1px 0} .tok.max{outline:1.5px solid rgb(var(--act));outline-offset:0}
.lens{margin-top:8px;font-size:12.5px} .lens .lab{color:var(--muted);display:inline-block;width:78px}
.chip{display:inline-block;font:12px ui-monospace,Menlo,Consolas,monospace;border-radius:4px;padding:0 5px;margin:1px 3px 1px 0;white-space:pre}
.chip.p{background:#e3f4ea;color:var(--pro)} .chip.s{background:#fbe7e5;color:var(--sup)}
.dead{color:var(--muted);font-style:italic;font-size:12.5px}
#more{font:inherit;margin:8px 0 40px;padding:6px 14px;border:1px solid #c9ced4;border-radius:6px;background:#fff;cursor:pointer}
#errors{color:var(--sup)}
</style></head>
<body>
<header>
<h1>__TITLE__</h1>
<div class="facts">__FACTS__</div>
<div class="controls">
<input id="search" type="search" placeholder="latent id (42, 10-20) or token (the, token:42)" autocomplete="off" aria-label="search latents">
<select id="sort" aria-label="sort"><option value="id">sort by id</option><option value="frequency">by frequency</option><option value="max_act">by max activation</option></select>
<label><input id="hide-dead" type="checkbox"> hide dead latents</label>
<span id="status"></span>
</div>
</header>
<main>
<div id="cards"></div>
<button id="more" type="button" hidden>show more</button>
<div id="sentinel"></div>
<div id="errors" hidden></div>
</main>
<script type="application/json" id="xsae-data">__DATA__</script>
<script>
(function () {
  'use strict';
  var errors = document.getElementById('errors');
  window.addEventListener('error', function (e) { errors.hidden = false; errors.textContent += 'error: ' + e.message + '\n'; });
  var PAGE = __PAGE_SIZE__;
  var D = JSON.parse(document.getElementById('xsae-data').textContent);
  var L = D.latents, EDGES = D.edges;
  var cards = document.getElementById('cards'), more = document.getElementById('more');
  var search = document.getElementById('search'), sortSel = document.getElementById('sort'), hideDead = document.getElementById('hide-dead');
  var status = document.getElementById('status');
  var list = [], shown = 0, tokenIndex = null;

  function el(tag, cls, text) { var e = document.createElement(tag); if (cls) e.className = cls; if (text != null) e.textContent = text; return e; }
  function fmt(x) { if (x == null) return '-'; var a = Math.abs(x); if (a === 0) return '0'; if (a >= 1000 || a < 0.001) return x.toExponential(2); return (+x.toPrecision(3)).toString(); }
  function pct(x) { return x == null ? '-' : (100 * x < 0.01 && x > 0 ? (100 * x).toExponential(1) : (+(100 * x).toPrecision(3))) + '%'; }
  function show(t) { return t.replace(/\n/g, '\u21b5').replace(/\t/g, '\u21e5'); }

  function buildTokenIndex() {
    tokenIndex = L.map(function (lat) {
      var parts = [];
      lat.top_contexts.forEach(function (c) { c.tokens.forEach(function (t, i) { if (c.acts[i] > 0) parts.push(t.trim().toLowerCase()); }); });
      if (lat.logit_lens) lat.logit_lens.promoted.forEach(function (p) { parts.push(String(p[0]).trim().toLowerCase()); });
      return '\n' + parts.join('\n') + '\n';
    });
  }

  function matcher(q) {
    q = q.trim();
    if (!q) return null;
    var m;
    if ((m = /^(?:id:|#)?\s*(\d+)$/i.exec(q))) { var id = +m[1]; return function (lat) { return lat.id === id; }; }
    if ((m = /^(?:id:)?\s*(\d+)\s*-\s*(\d+)$/i.exec(q))) { var a = +m[1], b = +m[2]; return function (lat) { return lat.id >= a && lat.id <= b; }; }
    var tok = q.replace(/^token:/i, '').trim().toLowerCase();
    if (!tokenIndex) buildTokenIndex();
    var exact = '\n' + tok + '\n';
    return function (lat, i) { var s = tokenIndex[i]; return tok.length > 2 ? s.indexOf(tok) >= 0 : s.indexOf(exact) >= 0; };
  }

  function update(fromHash) {
    var q = search.value, f = matcher(q), dead = hideDead.checked, key = sortSel.value;
    list = [];
    for (var i = 0; i < L.length; i++) {
      if (dead && !(L[i].frequency > 0)) continue;
      if (f && !f(L[i], i)) continue;
      list.push(i);
    }
    if (key !== 'id') list.sort(function (a, b) { return (L[b][key] || 0) - (L[a][key] || 0) || L[a].id - L[b].id; });
    cards.textContent = '';
    shown = 0;
    renderMore();
    if (!fromHash) { try { history.replaceState(null, '', q ? '#q=' + encodeURIComponent(q) : location.pathname); } catch (e) { /* file:// in some browsers */ } }
  }

  function renderMore() {
    var end = Math.min(list.length, shown + PAGE), frag = document.createDocumentFragment();
    for (; shown < end; shown++) frag.appendChild(card(L[list[shown]]));
    cards.appendChild(frag);
    more.hidden = shown >= list.length;
    status.textContent = list.length + ' of ' + L.length + ' latents match' + (list.length ? ' \u00b7 showing ' + shown : '');
  }

  function histogram(lat) {
    var h = lat.histogram, box = el('div', 'hist');
    if (!h) return box;
    var edges = EDGES[h.edges], c = h.counts, lo = -1, hi = -1, total = 0, peak = 0;
    for (var i = 0; i < c.length; i++) if (c[i] > 0) { if (lo < 0) lo = i; hi = i; total += c[i]; if (c[i] > peak) peak = c[i]; }
    if (lo < 0) { box.appendChild(el('div', 'dead', 'no activations above ' + fmt(edges[0]))); return box; }
    lo = Math.max(0, lo - 1); hi = Math.min(c.length - 1, hi + 1);
    var W = 280, H = 84, n = hi - lo + 1, bw = (W - 2) / n, s = '';
    for (i = lo; i <= hi; i++) {
      var bh = c[i] ? Math.max(1.5, (H - 4) * c[i] / peak) : 0, x = 1 + (i - lo) * bw;
      s += '<rect x="' + x.toFixed(1) + '" y="' + (H - bh).toFixed(1) + '" width="' + Math.max(1, bw - 1).toFixed(1) + '" height="' + bh.toFixed(1) + '" fill="rgb(255,122,0)"><title>' +
        fmt(edges[i]) + ' \u2013 ' + fmt(edges[i + 1]) + ': ' + c[i] + ' tokens (' + pct(c[i] / total) + ')</title></rect>';
    }
    var pts = [];  // density: share of firing tokens per log-spaced bin, smoothed over 3 bins
    for (i = lo; i <= hi; i++) { var v = ((c[i - 1] || 0) + 2 * c[i] + (c[i + 1] || 0)) / 4; pts.push((1 + (i - lo + 0.5) * bw).toFixed(1) + ',' + (H - (H - 4) * v / peak).toFixed(1)); }
    s += '<polyline points="' + pts.join(' ') + '" fill="none" stroke="#1d232a" stroke-width="1.2" opacity="0.7"/>';
    s += '<line x1="0" y1="' + H + '" x2="' + W + '" y2="' + H + '" stroke="#99a"/>';
    var svgBox = el('div');
    svgBox.innerHTML = '<svg width="' + W + '" height="' + (H + 1) + '" viewBox="0 0 ' + W + ' ' + (H + 1) + '" role="img" aria-label="activation histogram">' + s + '</svg>';  // numbers only
    box.appendChild(svgBox);
    box.appendChild(el('div', 'cap', 'activation ' + fmt(edges[lo]) + ' \u2192 ' + fmt(edges[hi + 1]) + ' (log bins) \u00b7 peak ' + peak + ' tokens \u00b7 line: density'));
    return box;
  }

  function contexts(lat) {
    var box = el('div', 'ctxs');
    var top = lat.max_act > 0 ? lat.max_act : 0;
    lat.top_contexts.forEach(function (c) { top = Math.max(top, c.max_act || 0); });
    lat.top_contexts.forEach(function (c) {
      var line = el('div', 'ctx');
      line.appendChild(el('span', 'v', fmt(c.max_act)));
      c.tokens.forEach(function (t, i) {
        var a = c.acts[i] || 0, span = el('span', 'tok' + (i === c.max_index ? ' max' : ''), show(t));
        if (a > 0 && top > 0) span.style.background = 'rgba(var(--act),' + (0.12 + 0.78 * Math.min(1, a / top)).toFixed(3) + ')';
        span.title = 'activation ' + fmt(a);
        span.dataset.act = a;
        line.appendChild(span);
      });
      box.appendChild(line);
    });
    return box;
  }

  function lens(lat) {
    var box = el('div', 'lens');
    if (!lat.logit_lens) return box;
    [['promoted', 'p'], ['suppressed', 's']].forEach(function (k) {
      var row = el('div'); row.appendChild(el('span', 'lab', k[0]));
      lat.logit_lens[k[0]].forEach(function (p) { var chip = el('span', 'chip ' + k[1], show(String(p[0]))); chip.title = 'logit ' + fmt(p[1]); row.appendChild(chip); });
      box.appendChild(row);
    });
    return box;
  }

  function card(lat) {
    var c = el('section', 'latent-card');
    c.id = 'latent-' + lat.id; c.dataset.id = lat.id;
    var head = el('div', 'head');
    head.appendChild(el('h2', null, 'Latent ' + lat.id));
    head.appendChild(el('span', 'stats', 'fires on ' + pct(lat.frequency) + ' of tokens \u00b7 mean ' + fmt(lat.mean_act) + ' \u00b7 max ' + fmt(lat.max_act)));
    c.appendChild(head);
    if (!(lat.frequency > 0)) { c.appendChild(el('div', 'dead', 'dead: never fired on the scanned tokens')); c.appendChild(lens(lat)); return c; }
    var row = el('div', 'row');
    row.appendChild(histogram(lat));
    var right = el('div'); right.appendChild(contexts(lat)); right.appendChild(lens(lat));
    row.appendChild(right);
    c.appendChild(row);
    return c;
  }

  function fromHash() {
    var m = /[#&]q=([^&]*)/.exec(location.hash);
    search.value = m ? decodeURIComponent(m[1].replace(/\+/g, ' ')) : '';
    update(true);
  }

  var timer = null;
  search.addEventListener('input', function () { clearTimeout(timer); timer = setTimeout(function () { update(false); }, 120); });
  sortSel.addEventListener('change', function () { update(false); });
  hideDead.addEventListener('change', function () { update(false); });
  more.addEventListener('click', renderMore);
  window.addEventListener('hashchange', fromHash);
  if ('IntersectionObserver' in window) {
    new IntersectionObserver(function (es) { if (es[0].isIntersecting && shown < list.length && shown > 0) renderMore(); }, { rootMargin: '600px' }).observe(document.getElementById('sentinel'));
  }
  fromHash();
  document.body.dataset.readyMs = Math.round(performance.now());  // time to first cards, for tests and curiosity
})();
</script>
</body></html>
"""
