"""Per-kind pooling gains fitted on known lineages: what training on windows does not learn.

Why: the pooled sketch weighs every chunk alike, but tensor kinds keep a model's identity very
differently. On the lineage zoo a 200-step fine-tune moves the anchors' Gram (``gram``) by 0.2-0.4
of its squared norm and the block circuits by 1.0-1.7 (another seed: 1.0 and 2.0). Gradient training
on windows does not find this: the Gram sits in one window of a small model's several, and the
training types it does see (short fine-tunes) move the QK circuit least, which long ones move most.
At the level of whole models the choice is a fit of a handful of scalars.

The sketch is linear in the latents (:meth:`SaneAutoencoder.pool_finish` centres with the mean of
the same scaled latents), so a model's embedding under log-gains ``g`` is ``sum_k exp(g_k) C_k``
with one component ``C_k`` per kind present, computed once by :func:`kind_components`. The gains
maximise a smooth retrieval margin over (variant, base) pairs: ``log d(variant, own base)`` minus a
soft minimum of ``log d(variant, other base)``, cosine distances, as retrieval ranks them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from xsae_cli.core.errors import XsaeError


def kind_components(model: Any, tm: Any, window_size: int, max_windows: int | None = None) -> dict[int, np.ndarray]:
    """``{kind id: C_k}``: each present kind's share of the model's pooled sketch (gains of 1), so
    that the embedding with gains ``G`` is ``sum_k G_k C_k``."""
    import torch

    from xsae_cli.sane.dataset import collate
    from xsae_cli.sane.embed import window_starts

    if model.sketch is None:
        raise XsaeError("per-kind gains need the sketch pooling", "use a checkpoint with pool = 'sketch' (the default)")
    kinds = sorted({int(k) for k in np.unique(tm.t_kind)})
    saved = model.kind_gain.clone()
    model.kind_gain.zero_()
    tot: dict[tuple[int, str], Any] = {}
    try:
        with torch.no_grad():
            for s in window_starts(tm, window_size, max_windows):
                b = collate([tm.window(s, window_size)])
                z = model.encode(b).double()
                for k in kinds:
                    for key, v in model.pool_sums(z * (b["kind"] == k).unsqueeze(-1), b).items():
                        tot[(k, key)] = tot.get((k, key), 0) + v
            return {k: model.pool_finish({key: tot[(k, key)] for key in ("n", "z", "zphi", "phi")})[0].numpy() for k in kinds}
    finally:
        model.kind_gain.copy_(saved)


def check_counts(n_bases: int, n_variants: int) -> None:
    if n_bases < 2 or not n_variants:
        raise XsaeError(f"fitting pooling gains needs at least two bases and one variant (got {n_bases} and {n_variants})", "give descendants of at least two lineages")


def fit_kind_gains(components: dict[str, dict[int, np.ndarray]], base_of: dict[str, str], n_kinds: int, steps: int = 300, lr: float = 0.05, tau: float = 0.05) -> np.ndarray:
    """Log-gains ``[n_kinds]`` (0 for kinds no model has) maximising the retrieval margin of every
    variant (a name whose ``base_of`` is another model) against the bases (names that are their own
    base). ``tau`` is the soft minimum's temperature in log-distance."""
    import torch
    from torch.nn import functional as F

    bases = sorted(n for n in components if base_of[n] == n)
    variants = sorted(n for n in components if base_of[n] != n and base_of[n] in components)
    check_counts(len(bases), len(variants))
    kinds = sorted({k for c in components.values() for k in c})
    dim = next(iter(next(iter(components.values())).values())).shape[0]

    def stack(names: list[str]) -> Any:
        return torch.tensor(np.stack([np.stack([components[n].get(k, np.zeros(dim)) for k in kinds]) for n in names]))

    xv, xb = stack(variants), stack(bases)
    own = torch.tensor([bases.index(base_of[n]) for n in variants])
    other = F.one_hot(own, len(bases)).bool()
    g = torch.zeros(len(kinds), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([g], lr=lr)
    for _ in range(steps):
        w = g.exp().view(1, -1, 1)
        ev, eb = F.normalize((xv * w).sum(1), dim=-1), F.normalize((xb * w).sum(1), dim=-1)
        logd = (1 - ev @ eb.t()).clamp_min(1e-12).log()
        near_other = -tau * torch.logsumexp(-logd.masked_fill(other, float("inf")) / tau, 1)
        loss = (logd.gather(1, own[:, None])[:, 0] - near_other).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = np.zeros(n_kinds)
    out[kinds] = g.detach().numpy()
    return out


def fit_into(model: Any, tms: dict[str, Any], base_of: dict[str, str], window_size: int, max_windows: int | None = None) -> dict[str, float]:
    """Fit the gains on the tokenised models ``tms`` (name -> TokenizedModel) and set them in
    ``model``; returns ``{kind: gain}`` for the kinds present (what checkpoints and reports record)."""
    import torch

    from xsae_cli.sane.tokenizer import KINDS

    comps = {n: kind_components(model, tm, window_size, max_windows) for n, tm in tms.items()}
    fitted = fit_kind_gains(comps, base_of, len(KINDS))
    model.kind_gain.copy_(torch.from_numpy(fitted))
    return {KINDS[i]: round(float(np.exp(v)), 3) for i, v in enumerate(fitted) if v != 0}


def write_weights(model: Any, meta: dict[str, Any], folder: Path, **extra: Any) -> None:
    """The model's weights (gains included) and its checkpoint config with ``extra`` keys, into ``folder``."""
    from xsae_cli.core.io import atomic_write_json, save_safetensors

    save_safetensors(model.state_dict(), Path(folder) / "model.safetensors", metadata={"format": "xsae-sane"})
    atomic_write_json(Path(folder) / "config.json", {**meta, **extra})


def read_lineage(path: Path) -> dict[str, str]:
    """``{model: base}`` from a JSON object; every base is its own base (added when missing)."""
    from xsae_cli.core.io import read_json

    data = read_json(Path(path), "lineage file")
    if not isinstance(data, dict) or not data or not all(isinstance(k, str) and isinstance(v, str) and k and v for k, v in data.items()):
        raise XsaeError(f"{path} is not a lineage map", 'write a JSON object {"variant": "its base", ...}, e.g. {"my-finetune": "smollm2-135m"}')
    out = dict(data)
    for base in set(data.values()):
        if out.setdefault(base, base) != base:
            raise XsaeError(f"{path}: '{base}' is a base and also descends from '{out[base]}'", "map every model to its root base")
    return out


def calibrate_checkpoint(
    checkpoint: Path,
    lineage: dict[str, str],
    out_dir: Path,
    force: bool = False,
    max_windows: int | None = None,
    warn: Callable[[str], None] | None = None,
    progress: Any = None,
    layer_keywords: Any = None,
) -> dict[str, Any]:
    """Fit the per-kind pooling gains of ``checkpoint`` on the known ``lineage`` (``{model: base}``)
    and write the checkpoint with them to ``out_dir`` (a copy; the original stays as it was). The
    models are tokenised with the checkpoint's own coordinate scheme (see ``embed_models``)."""
    import shutil

    from xsae_cli.core.io import atomic_dir
    from xsae_cli.sane.dataset import TokenizedModel, model_source, tokenize_to_cache
    from xsae_cli.sane.train import checkpoint_scheme, load_model

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    n_bases = len(set(lineage.values()))
    check_counts(n_bases, sum(1 for k, v in lineage.items() if k != v))  # before any model is read
    if out_dir.resolve() == checkpoint.resolve():
        raise XsaeError(f"--out {out_dir} is the checkpoint itself", "write the calibrated checkpoint to another folder")
    if out_dir.exists() and not force:
        raise XsaeError(f"{out_dir} already exists", "pass --force to replace it, or choose another --out")
    model, meta = load_model(checkpoint)
    scheme = checkpoint_scheme(meta, str(checkpoint), layer_keywords=layer_keywords, warn=warn)
    tms = {}
    task = progress.add_task("tokenise", total=len(lineage), unit="models") if progress else None
    for name in lineage:
        tms[name] = TokenizedModel(tokenize_to_cache(model_source(name), int(meta["chunk_size"]), scheme, warn=warn), name)
        if progress:
            progress.advance(task)
    gains = fit_into(model, tms, lineage, int(meta["settings"]["window_size"]), max_windows)
    with atomic_dir(out_dir, force=True) as tmp:
        for f in checkpoint.iterdir():
            if f.is_file() and f.name not in ("model.safetensors", "config.json"):
                shutil.copy2(f, tmp / f.name)
        write_weights(model, meta, tmp, kind_gains=gains, calibrated_from=str(checkpoint), calibration_lineage=lineage, coord_scheme=scheme.record(int(meta["chunk_size"])))
    return {"checkpoint": str(out_dir), "from": str(checkpoint), "kind_gains": gains, "n_models": len(lineage), "n_bases": n_bases}
