"""SANE lineage benchmark: retrieval of a variant's base, SANE vs per-tensor quantile statistics vs a
randomly initialised encoder, on held-out transform types (every type is held out in one of two folds).

Bases: SmolLM2-135M and MiniLM-L6 (3 evenly spaced blocks of each are compared; the fine-tunes and
the function check run on the whole model) and 6 tiny families x 3 random-init seeds. 16 transform
types per base (see xsae_cli/sane/lineage/zoo.py). The built zoo is cached in --out, so a second run
only retrains and rescores.

Run: ``.venv/bin/python benchmarks/sane_lineage.py [--out runs/bench-lineage] [--quick]``; prints the
per-transform table and the pair metrics, writes lineage.json in --out. ``--quick``: 2 tiny families,
2 seeds, no real bases, fold 1 only (about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    from xsae_cli.sane.views import view_names

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench-lineage")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps-per-epoch", type=int, default=40)
    ap.add_argument("--train-seed", type=int, default=0, help="SANE's training seed (the zoo and the baselines do not change)")
    ap.add_argument("--view", default="circuits", choices=view_names(), help="what SANE reads (weights: as stored, the earlier behaviour)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    torch.set_num_threads(args.threads)
    from xsae_cli.sane.evaluate import LineageSettings, evaluate
    from xsae_cli.sane.lineage.metrics import METHODS

    s = LineageSettings(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, view=args.view, train_seed=args.train_seed)
    if args.quick:
        s = LineageSettings(families=("tiny-gpt2", "tiny-qwen2"), seeds=2, real=(), folds=1, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, view=args.view)
    t0 = time.perf_counter()
    r = evaluate(Path(args.out), s, log=lambda m: print(m, flush=True), force=True)
    wall = time.perf_counter() - t0

    head = f"{'transform':<22} {'fold':>4}  " + "  ".join(f"{k.split('_')[0]:>18}" for k in METHODS) + "   SANE-Q top-1"
    print("\nheld-out retrieval of the base: top-1 / MRR / AUROC")
    print(head)
    for t, row in r["per_type"].items():
        cells = "  ".join(f"{row[k]['top1']:.2f} / {row[k]['mrr']:.2f} / {row[k]['auroc']:.2f}".rjust(18) for k in METHODS)
        diff = row["sane"]["top1"] - row["quantile_baseline"]["top1"]
        print(f"{t + (' *' if row['hard'] else ''):<22} {row['fold']:>4}  {cells}   {diff:+.2f}")
    print("(* hard types)")
    print("\nseparation (median of nearest other base / own base distance; > 1 retrieves it): SANE / quantile / random")
    for t, row in r["per_type"].items():
        if "separation" in row["sane"]:
            print(f"  {t + (' *' if row['hard'] else ''):<22} " + " / ".join(f"{row[k]['separation']:.2f}" for k in METHODS))
    print("\nbase strictly nearer than every model of another lineage (function-preserving types): SANE / quantile / random")
    for t, row in r["per_type"].items():
        near = row.get("base_nearer_than_other_lineages")
        if near:
            print(f"  {t:<14} " + " / ".join(f"{near[k]:.2f}" for k in METHODS))
    for f in r["folds"]:
        p = f["pairs"]
        rec = f["reconstruction_held_out"]
        print(f"\nfold {f['fold']} (train {f['n_train_models']} models, {f['train_seconds']:.0f} s; eval {f['n_eval_models']}; embed {f['embed_seconds_per_model']:.2f} s/model)")
        for k in METHODS:
            print(f"  same-lineage pairs {k:<24} mAP {p[k]['map']:.3f}  AUROC {p[k]['auroc']:.3f}")
        print(f"  masked-chunk R^2 vs per-tensor mean: {rec['r2_masked']:.3f} (visible chunks {rec['r2_visible']:.3f})")
        if f["train_history"]:
            h = f["train_history"][-1]
            print(f"  last epoch: loss {h['loss']:.3f} recon {h['recon']:.3f} contrast {h['contrast']:.3f}, {h['windows_per_second']:.1f} windows/s")
    print("\ngoals:", json.dumps(r["goals"]))
    fc = r["function_check_max_rel_logit_diff"]
    print(f"function check (max relative logit change): {fc:.1e}" if fc is not None else "function check: not recorded for this zoo")
    print(f"seconds: {json.dumps({k: round(v, 1) for k, v in r['seconds'].items()})}; wall {wall:.0f} s; wrote {Path(args.out) / 'lineage.json'}")


if __name__ == "__main__":
    main()
