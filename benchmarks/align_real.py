"""The real-model alignment table: SmolLM2-135M <-> MiniLM-L6, every mapper next to its null, 2nd-SAE reference and upper bound.

Runs ``xsae align transfer``'s protocol (``run_transfer``) at the sizes below, or reads a report it
already wrote (``--report DIR``), and prints the markdown table that goes into README / RESULTS.md:
per layer pair, direction, space and mapper, held-out R^2 / centred cosine / latent correlation / F1
with the mean predictor, the shuffled-pair null, the 2nd-SAE reference and the upper bound (mapper fit on the test pairs) of the same run, plus the verdict on
whether the MLP mapper (``mlp``; ``hypernet`` in 0.1) beats ridge on held-out data.

    .venv/bin/python benchmarks/align_real.py --out /tmp/align_real           # run, then print
    .venv/bin/python benchmarks/align_real.py --report /tmp/align_real        # print a saved run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _f(v: Any, nd: int = 3) -> str:
    return "-" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.{nd}f}")


def markdown(report: dict[str, Any]) -> str:
    a, b = report["a"], report["b"]
    names = {"a->b": f"{a} -> {b}", "b->a": f"{b} -> {a}"}
    p, used = report["pairing"], report["pairs_used"]
    lines = [
        (
            f"Pairs: {p['pairs']:,} positions ({p['kept_a']:.1%} of {a}'s tokens, {p['kept_b']:.1%} of {b}'s) in {p['documents']} documents; "
            f"fit on {used['train']:,} train pairs, penalties / early stopping on {used['val']:,} val pairs, scored on {used['test']:,} test pairs (test documents only)."
        ),
        "",
        "Each cell: test value (mean predictor / shuffled-pair null / 2nd-SAE reference = target model through its 2nd-seed SAE, not a bound / upper bound = the mapper fit on the test pairs).",
        "",
        "| layers | direction | space | mapper | R^2 | cos (centred) | latent r | active-set F1 | matched latents |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        for direction in ("a->b", "b->a"):
            for row in r["directions"][direction]:
                cells = []
                for key in ("r2", "cosine", "latent_r", "f1", "matched"):
                    refs = "/".join(_f((row.get(v) or {}).get(key)) for v in ("mean", "null", "sae_ref", "upper"))
                    cells.append(f"**{_f(row['test'].get(key))}** ({refs})")
                lines.append(f"| {r['layer_a']}:{r['layer_b']} | {names[direction]} | {row['space']} | {row['mapper']} | " + " | ".join(cells) + " |")
    lines += ["", "| layers | CKA acts (test/null/ceil A/ceil B) | CKA codes | SVCCA held-out | SVCCA in-sample (rows/dim) | direct latent matches |", "| --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        s, lm = r["similarity"], r["latent_matching"]

        def four(d: dict[str, Any], key: str | None = None) -> str:
            return "/".join(_f((d.get(v) or {}).get(key) if key else d.get(v)) for v in ("test", "null", "sae_ref_a", "sae_ref_b"))

        sv = s["svcca_acts"]
        lines.append(
            f"| {r['layer_a']}:{r['layer_b']} | {four(s['cka_acts'])} | {four(s['cka_codes'])} | {four(sv)} | {_f(sv['in_sample'])} ({_f(sv['train_rows_per_dim'], 1)}) | {four(lm, 'matched')} |"
        )
    lines += ["", "| layers | direction | target readout | KL mapped | KL random | top-10 token overlap mapped | random |", "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        for direction, iv in (r.get("interventions") or {}).items():
            lines.append(
                f"| {r['layer_a']}:{r['layer_b']} | {names[direction]} | {'LM head' if iv['kl'] is not None else 'embedding lens'} | {_f(iv['kl'])} | {_f(iv['kl_random'])} | {_f(iv['overlap'])} | {_f(iv['overlap_random'])} |"
            )
    lines += ["", verdict(report)]
    return "\n".join(lines)


def verdict(report: dict[str, Any]) -> str:
    """Does the MLP mapper beat ridge on held-out R^2, row by row? (Reports from 0.1 call it hypernet.)"""
    wins, total, details = 0, 0, []
    for r in report["results"]:
        for direction, rows in r["directions"].items():
            for space in ("acts", "codes"):
                by = {{"hypernet": "mlp"}.get(row["mapper"], row["mapper"]): row for row in rows if row["space"] == space}
                if "mlp" in by and "ridge" in by:
                    h, g = by["mlp"]["test"]["r2"], by["ridge"]["test"]["r2"]
                    total += 1
                    wins += h > g
                    details.append(f"{r['layer_a']}:{r['layer_b']} {direction} {space}: {h:.3f} vs {g:.3f}")
    return f"The MLP mapper beats ridge on held-out R^2 in {wins} of {total} rows ({'; '.join(details)})."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", help="print the table of a report already written (folder or report.json)")
    ap.add_argument("--out", default="/tmp/align_real")
    ap.add_argument("--layers", default="5,6,7")
    ap.add_argument("--limit", type=int, default=400, help="documents of the built-in corpus")
    ap.add_argument("--train-pairs", type=int, default=15000)
    ap.add_argument("--test-pairs", type=int, default=8000)
    ap.add_argument("--sae-tokens", type=int, default=100_000)
    ap.add_argument("--hypernet-epochs", type=int, default=10)
    args = ap.parse_args()

    from xsae_cli.align.transfer import TransferSpec, load_report, run_transfer

    if args.report:
        report = load_report(args.report)
    else:
        from xsae_cli.align.settings import AlignSettings, MlpMapperSettings
        from xsae_cli.sae.settings import SaeTrainSettings

        spec = TransferSpec(
            a="smollm2-135m",
            b="minilm-l6",
            out=Path(args.out),
            force=True,
            settings=AlignSettings(layers=args.layers.split(","), limit=args.limit, max_train_pairs=args.train_pairs, max_test_pairs=args.test_pairs, intervene_contexts=4),
            sae=SaeTrainSettings(k=32, expansion=4, tokens=args.sae_tokens, batch_size=2048),
            mlp=MlpMapperSettings(max_epochs=args.hypernet_epochs),
        )
        t0 = time.perf_counter()
        report = run_transfer(spec)
        print(f"ran in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    print(markdown(report))
    t = report["timings"]
    print(
        "\nharvest: "
        + ", ".join(f"{m} {v['tokens_per_second']:,.0f} tok/s" for m, v in report["harvest"].items())
        + f"; total {t['total']:.0f}s; peak RSS {report['memory']['peak_rss_bytes'] / 2**30:.2f} GiB"
    )


if __name__ == "__main__":
    main()
