"""The lineage benchmark's table: one row per held-out transform type (``xsae sane evaluate``)."""

from __future__ import annotations

from typing import Any

from xsae_cli.sane.lineage.metrics import METHODS


def format_table(result: dict[str, Any]) -> list[list[str]]:
    """One row per held-out transform type: top-1 / MRR / AUROC for SANE and both baselines."""
    rows = []
    for t, r in result["per_type"].items():
        cells = [t + (" (hard)" if r["hard"] else ""), str(r["fold"])]
        for k in METHODS:
            x = r[k]
            cells.append(f"{x['top1']:.2f} / {x['mrr']:.2f} / {x['auroc']:.2f}")
        near = r.get("base_nearer_than_other_lineages")
        cells.append(" / ".join(f"{near[k]:.2f}" for k in METHODS) if near else "")
        rows.append(cells)
    return rows
