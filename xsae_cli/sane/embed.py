"""Model embeddings from a trained SANE checkpoint, and nearest neighbours between them.

A model's embedding: encode the windows that cover all of its chunks (the last one padded, the
padding masked out) and pool every latent of the model at once (the per-window sums add up): the
512-float sketch of its centred latents (``pool="sketch"``, the default), or the trained head's
projection of their mean and std (``pool="moments"``).

``model_embeddings.json``::

    {"format": "xsae-sane-embeddings", "dim": 512,
     "embeddings": {"<name>": [512 floats], ...},
     "models": {"<name>": {"sha256", "family", "n_chunks", "windows", "seconds"}, ...},
     "config": {checkpoint, epoch, chunk_size, scheme, window_size, model},
     "versions": {...}}

plus ``model_embeddings.npz`` with ``names`` and ``embeddings`` ([n, 512]).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from xsae_cli.core.console import dumps
from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import atomic_paths, read_json
from xsae_cli.sane.dataset import TokenizedModel, collate

FORMAT = "xsae-sane-embeddings"


def _show_done(progress: Any, task: Any, done: int, _bytes_read: int) -> None:
    """A tokenising bar's update: ``on_tensor(chunks_done, bytes_read)``."""
    progress.update(task, completed=done)


def window_starts(tm: TokenizedModel, window_size: int, max_windows: int | None = None) -> list[int]:
    """Windows covering the whole model, or ``max_windows`` evenly spaced ones when it needs more.

    A capped embedding sees only part of the model (``max_windows * window_size`` chunks); models
    with the same tensor table get the same windows, so their embeddings stay comparable.
    """
    starts = tm.cover_starts(window_size)
    if max_windows is None or max_windows <= 0 or len(starts) <= max_windows:
        return starts
    last = max(tm.n_chunks - window_size, 0)
    return [int(round(x)) for x in np.linspace(0, last, max_windows)]


def embed_tokenized(
    model: Any, tm: TokenizedModel, window_size: int, batch_size: int = 8, device: Any = "cpu", on_window: Callable[[int], None] | None = None, max_windows: int | None = None
) -> tuple[np.ndarray, int]:
    """The 512-d embedding of one tokenised model and the number of windows it took."""
    import torch

    starts = window_starts(tm, window_size, max_windows)
    total: dict[str, Any] = {}
    with torch.no_grad():
        for i in range(0, len(starts), batch_size):
            wins = [tm.window(s, window_size) for s in starts[i : i + batch_size]]
            b = {k: v.to(device) for k, v in collate(wins).items()}
            z = model.encode(b)
            for k, v in model.pool_sums(z.double(), b).items():
                total[k] = total.get(k, 0) + v.sum(0, keepdim=True)
            if on_window:
                on_window(len(wins))
        pooled = model.pool_finish(total)
        vec = pooled if model.sketch is not None else model.project(pooled.float())
        vec = vec[0].double().cpu().numpy()
    return vec, len(starts)


def embed_models(
    checkpoint: Path,
    names: list[str],
    output_dir: Path | None = None,
    window_size: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    view: str | None = None,
    force: bool = False,
    warn: Callable[[str], None] | None = None,
    progress: Any = None,
    max_windows: int | None = None,
    layer_keywords: Any = None,
    layout: str = "xsae",
) -> dict[str, Any]:
    """Embed ``names`` with ``checkpoint``; write JSON + NPZ into ``output_dir`` when given.

    ``layout="plain"`` writes the JSON as the original Universal SANE does, a bare ``{name: [floats]}``
    map, which its tools read; the NPZ is written as usual, and the provenance is only in the returned
    result (`--json`).

    The models are tokenised with the checkpoint's own coordinate scheme (:func:`checkpoint_scheme`;
    ``view``, when given, must be the checkpoint's; ``layer_keywords``: the current [sane] setting,
    used to read checkpoints that predate stored schemes). ``max_windows`` caps the windows per
    model (evenly spaced, see :func:`window_starts`); the fraction of chunks seen is written per
    model as ``coverage``."""
    from xsae_cli.core.hardware import package_versions, resolve_device
    from xsae_cli.sane.dataset import model_source, tokenize_to_cache
    from xsae_cli.sane.tokenizer import model_chunk_count
    from xsae_cli.sane.train import checkpoint_scheme, load_model
    from xsae_cli.zoo.registry import Registry
    from xsae_cli.zoo.weights import tensor_index

    if not names:
        raise XsaeError("no models to embed", "pass --models a,b or --zoo demo")
    if len(set(names)) != len(names):
        raise XsaeError("a model is named twice in --models", "name each model once")
    checkpoint = Path(checkpoint)
    model, meta = load_model(checkpoint)
    scheme = checkpoint_scheme(meta, str(checkpoint), view=view, layer_keywords=layer_keywords, warn=warn)
    chunk_size = int(meta["chunk_size"])
    window_size = window_size or int(meta["settings"]["window_size"])
    dev = resolve_device(device)
    model.to(dev)
    json_path = npz_path = None
    if output_dir is not None:
        output_dir = Path(output_dir)
        json_path = output_dir / "model_embeddings.json"
        npz_path = output_dir / "model_embeddings.npz"
        if json_path.exists() and not force:
            raise XsaeError(f"{json_path} already exists", "pass --force to replace it, or choose another --output-dir")
    registry = Registry()
    sources = [model_source(n) for n in names]
    vectors: dict[str, list[float]] = {}
    info: dict[str, Any] = {}
    for src in sources:
        t0 = time.perf_counter()
        # a derived view's chunk count is known only once it is built: an open-ended bar then
        total = model_chunk_count(tensor_index(src.resolved), chunk_size) if scheme.view == "weights" else None
        task = progress.add_task(f"tokenise {src.name}", total=total, unit="chunks") if progress else None
        on_tensor: Callable[..., None] | None = None
        if progress is not None and task is not None:
            on_tensor = functools.partial(_show_done, progress, task)
        folder = tokenize_to_cache(src, chunk_size, scheme, warn=warn, on_tensor=on_tensor)
        tm = TokenizedModel(folder, src.name)
        wtask = progress.add_task(f"embed {src.name}", total=len(window_starts(tm, window_size, max_windows)), unit="windows") if progress else None
        on_windows = functools.partial(progress.advance, wtask) if progress is not None and wtask is not None else None
        vec, n_windows = embed_tokenized(model, tm, window_size, batch_size, dev, on_windows, max_windows=max_windows)
        vectors[src.name] = [float(x) for x in vec]
        entry = registry.find(src.name)
        info[src.name] = {
            "sha256": src.sha256,
            "family": entry.family if entry else None,
            "n_chunks": tm.n_chunks,
            "windows": n_windows,
            "coverage": min(1.0, n_windows * window_size / max(tm.n_chunks, 1)),
            "seconds": time.perf_counter() - t0,
        }
    result = {
        "format": FORMAT,
        "dim": len(next(iter(vectors.values()))) if vectors else int(model.cfg.embed_dim),
        "embeddings": vectors,
        "models": info,
        "config": {
            "checkpoint": str(checkpoint),
            "epoch": meta.get("epoch"),
            "chunk_size": chunk_size,
            "scheme": meta["scheme"],
            "coord_scheme": scheme.record(chunk_size),
            "window_size": window_size,
            "max_windows": max_windows,
            "model": meta["model"],
        },
        "versions": package_versions(),
    }
    if json_path is not None and npz_path is not None:
        # JSON and NPZ are one result: both are replaced together or (a full disk, a crash) neither is
        text = (dumps(vectors if layout == "plain" else result) + "\n").encode("utf-8")
        matrix = np.array([vectors[n] for n in vectors], dtype=np.float32)
        with atomic_paths(json_path, npz_path, need=len(text) + matrix.nbytes + 4096) as (tmp_json, tmp_npz):
            tmp_json.write_bytes(text)
            with open(tmp_npz, "wb") as fh:
                np.savez(fh, names=np.array(list(vectors)), embeddings=matrix)
        result["written"] = {"json": str(json_path), "npz": str(npz_path)}
    return result


def read_embeddings(path: Path) -> dict[str, np.ndarray]:
    """Name -> vector from ``model_embeddings.json`` (or a plain name -> list mapping)."""
    data = read_json(path, "embeddings file")
    table = data.get("embeddings", data) if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise XsaeError(f"{path} holds no name -> vector mapping", "point at the model_embeddings.json that `xsae sane embed` writes")
    out = {}
    for name, vec in table.items():
        if not (isinstance(vec, list) and vec and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vec)):
            raise XsaeError(f"{path}: embeddings['{name}'] is not a non-empty list of numbers", "re-create it with `xsae sane embed`")
        out[name] = np.asarray(vec, dtype=np.float64)
    bad = [n for n, v in out.items() if not np.isfinite(v).all()]
    if bad:  # as viz cluster: a distance to NaN is no distance
        raise XsaeError(f"{path}: embeddings of {', '.join(bad)} contain NaN or infinity", "re-embed those models")
    if not out:
        raise XsaeError(f"{path} holds no embeddings", "point at the model_embeddings.json that `xsae sane embed` writes")
    dims = {v.shape[0] for v in out.values()}
    if len(dims) > 1:
        raise XsaeError(f"{path} mixes embedding sizes {sorted(dims)}", "re-create it with one checkpoint")
    return out


def cosine_neighbors(embeddings: dict[str, np.ndarray], name: str, k: int | None = None) -> list[tuple[str, float]]:
    """The other models sorted by cosine distance (1 - cosine similarity) to ``name``."""
    if len(embeddings) < 2:
        raise XsaeError(f"only {len(embeddings)} model(s) in the embeddings file: neighbours need at least two", "embed more models with `xsae sane embed --models a,b,...`")
    if name not in embeddings:
        import difflib

        close = difflib.get_close_matches(name, list(embeddings), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise XsaeError(f"model '{name}' is not in the embeddings file", hint + f"known: {', '.join(sorted(embeddings))}")
    if k is not None and k < 1:
        raise XsaeError(f"--top {k} must be at least 1", "pass e.g. --top 5, or leave it out for all")
    q = embeddings[name]
    qn = q / (np.linalg.norm(q) + 1e-12)
    rows = []
    for other, v in embeddings.items():
        if other == name:
            continue
        cos = float(qn @ (v / (np.linalg.norm(v) + 1e-12)))
        rows.append((other, 1.0 - cos))
    rows.sort(key=lambda r: (r[1], r[0]))
    return rows[:k] if k else rows
