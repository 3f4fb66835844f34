"""`xsae align`: Map SAE feature spaces between two models, with held-out metrics and nulls."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer

from xsae_cli.align.settings import AlignSettings, CrosscoderSettings, MlpMapperSettings
from xsae_cli.commands.options import options
from xsae_cli.core import console as out
from xsae_cli.sae.settings import SaeTrainSettings

app = typer.Typer(help="Map SAE feature spaces between two models, with held-out metrics and nulls.", no_args_is_help=True)


# --------------------------------------------------------------------------------------- rendering


def _f(value: Any, nd: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{nd}f}"


def _refs(row: dict[str, Any], key: str, nd: int = 3) -> str:
    """'mean/null/2nd-SAE/upper' of one metric ('ceiling' is the 2nd-SAE reference of earlier reports)."""
    return "/".join(_f((row.get(v) or row.get("ceiling" if v == "sae_ref" else "") or {}).get(key), nd) for v in ("mean", "null", "sae_ref", "upper"))


def _pairing_table(stats: dict[str, Any]) -> Any:
    rows = []
    for split, s in stats["splits"].items():
        rows.append([split, _f(s["documents"]), _f(s["windows"]), _f(s["tokens_a"]), _f(s["tokens_b"]), _f(s["pairs"]), f"{s['kept_a']:.1%}", f"{s['kept_b']:.1%}"])
    rows.append(["all", _f(stats["documents"]), "", _f(stats["tokens_a"]), _f(stats["tokens_b"]), _f(stats["pairs"]), f"{stats['kept_a']:.1%}", f"{stats['kept_b']:.1%}"])
    a, b = stats["a"], stats["b"]
    return out.table(f"pairing {a} | {b} (context {stats['context_size']})", ["split", "documents", "windows", f"tokens {a}", f"tokens {b}", "pairs", f"kept {a}", f"kept {b}"], rows)


def render_pair(stats: dict[str, Any]) -> None:
    out.console.print(_pairing_table(stats))
    if stats.get("examples"):
        out.console.print(out.table("first shared token ends (test split)", [stats["a"], stats["b"]], [[repr(x), repr(y)] for x, y in stats["examples"]]))
    out.console.print("a pair = both tokenizers end a token at the same character; BOS/CLS/EOS/SEP are never paired; splits are by document")


def render_report(report: dict[str, Any]) -> None:
    from xsae_cli.align.interventions import READOUT_LM

    a, b = report["a"], report["b"]
    names = {"a->b": f"{a} -> {b}", "b->a": f"{b} -> {a}"}
    p = report["pairing"]
    pairs = ", ".join("{}:{} ({} <-> {})".format(r["layer_a"], r["layer_b"], r["hook_a"], r["hook_b"]) for r in report["results"])
    out.console.print(f"[bold]{a}[/bold] ({report['blocks'][a]} blocks, d={report['widths'][a]}) and [bold]{b}[/bold] ({report['blocks'][b]} blocks, d={report['widths'][b]}); layer pairs {pairs}")
    used = report["pairs_used"]
    out.console.print(
        f"paired {p['pairs']:,} positions ({p['kept_a']:.1%} of {a}'s tokens, {p['kept_b']:.1%} of {b}'s) in {p['documents']:,} documents; "
        f"mappers fit on {used['train']:,} train pairs, chosen on {used['val']:,} val pairs, scored on {used['test']:,} test pairs"
    )
    for direction in ("a->b", "b->a"):
        rows = []
        for r in report["results"]:
            for row in r["directions"][direction]:
                t = row["test"]
                rows.append(
                    [
                        f"{r['layer_a']}:{r['layer_b']}",
                        row["space"],
                        row["mapper"],
                        _f(t["r2"]),
                        _refs(row, "r2"),
                        _f(t["fvu"]),
                        _f(t["cosine"]),
                        _refs(row, "cosine"),
                        _f(t.get("latent_r")),
                        _refs(row, "latent_r"),
                        _f(t.get("f1")),
                        _refs(row, "f1"),
                        _f(t.get("matched")),
                        _refs(row, "matched"),
                    ]
                )
        cols = [
            "layers",
            "space",
            "mapper",
            "R2",
            "mean/null/sae/upper",
            "FVU",
            "cos",
            "mean/null/sae/upper",
            "latent r",
            "mean/null/sae/upper",
            "F1",
            "mean/null/sae/upper",
            "matched",
            "mean/null/sae/upper",
        ]
        out.console.print(
            out.table(
                f"held-out mapping {names[direction]}: test value, then mean predictor/shuffled-pair null/2nd-SAE reference (target through its 2nd SAE, not a bound)/upper bound (mapper fit on the test pairs)",
                cols,
                rows,
            )
        )
    sim_rows = []
    for r in report["results"]:
        s = r["similarity"]
        lm = r["latent_matching"]

        def four(d: dict[str, Any], key: str | None = None) -> str:
            get = (lambda v: (d.get(v) or {}).get(key)) if key else d.get
            return "/".join(_f(get(v) if d.get(v) is not None else get(v.replace("sae_ref", "ceiling"))) for v in ("test", "null", "sae_ref_a", "sae_ref_b"))

        sv = s["svcca_acts"]
        sim_rows.append(
            [
                f"{r['layer_a']}:{r['layer_b']}",
                four(s["cka_acts"]),
                four(s["cka_codes"]),
                four(sv),
                f"{_f(sv['in_sample'])} ({_f(sv['train_rows_per_dim'], 1)} rows/dim)",
                four(lm, "matched"),
            ]
        )
    out.console.print(
        out.table(
            f"similarity between the layers (test/null/2nd-SAE reference {a}/2nd-SAE reference {b})",
            ["layers", "CKA acts", "CKA codes", "SVCCA held-out", "SVCCA in-sample", "direct latent matches"],
            sim_rows,
        )
    )
    int_rows = []
    for r in report["results"]:
        for direction, iv in (r.get("interventions") or {}).items():
            first = (iv.get("latents") or [{}])[0]
            int_rows.append(
                [
                    f"{r['layer_a']}:{r['layer_b']}",
                    names[direction],
                    "next-token (LM head)" if iv["readout_target"] == READOUT_LM else "embedding lens (no KL)",
                    _f(iv.get("kl")),
                    _f(iv.get("kl_random")),
                    _f(iv.get("overlap")),
                    _f(iv.get("overlap_random")),
                    f"#{first.get('latent', '-')}: {' '.join(repr(x) for x in (first.get('promoted_source') or [])[:4])} -> {' '.join(repr(x) for x in (first.get('promoted_target') or [])[:4])}",
                ]
            )
    if int_rows:
        conf = report["config"].get("settings", report["config"])  # reports before 0.2 kept the settings flat
        out.console.print(
            out.table(
                f"interventions (strength {conf['strength']} x median norm; mapper {conf['intervene_mapper']})",
                ["layers", "direction", "target readout", "KL mapped", "KL random", "token overlap", "overlap random", "example latent: source -> target"],
                int_rows,
            )
        )
    h = report.get("harvest", {})
    rates = ", ".join(f"{m} {v['tokens_per_second']:,.0f} tok/s" for m, v in h.items())
    mem = report.get("memory", {})
    t = report.get("timings", {})
    out.console.print(
        f"harvest {rates}; total {t.get('total', 0):.0f}s (pairing {t.get('pairing', 0):.0f}s, harvest {t.get('harvest', 0):.0f}s, SAEs {t.get('saes', 0):.0f}s, "
        f"mapping {t.get('mapping', 0):.0f}s, interventions {t.get('interventions', 0):.0f}s); peak RSS {mem.get('peak_rss_bytes', 0) / 2**30:.2f} GiB"
    )


# --------------------------------------------------------------------------------------- commands

PAIR_FIELDS = ("corpus", "text_field", "limit", "context_size", "val_fraction", "test_fraction")


@app.command("pair")
@options("zoo", into="_zoo", only=("trust_remote_code",))
@options("align", into="settings", only=PAIR_FIELDS)
def pair(
    ctx: typer.Context,
    a: str = typer.Option(..., "--a", help="Model A: zoo name or model path."),
    b: str = typer.Option(..., "--b", help="Model B: zoo name or model path."),
    settings: AlignSettings = None,  # type: ignore[assignment]
    _zoo: Any = None,
) -> None:
    """Pair two tokenizers' positions on a corpus and show how many tokens each side keeps."""
    from xsae_cli.align.transfer import TransferSpec, pair_stats

    cfg = ctx.obj.config
    spec = TransferSpec(a=a, b=b, out=Path("."), settings=settings, seed=cfg.hardware.seed, trust_remote_code=cfg.zoo.trust_remote_code)
    out.emit(pair_stats(spec), render_pair)


@app.command("transfer")
@options("zoo", into="_zoo", only=("trust_remote_code",))
@options("align", "align.sae", "align.mlp", into=("settings", "sae", "mlp"), aliases={"align.sae.tokens": ["--sae-tokens"]})
def transfer(
    ctx: typer.Context,
    a: str = typer.Option(..., "--a", help="Model A: zoo name or model path."),
    b: str = typer.Option(..., "--b", help="Model B: zoo name or model path."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run folder (report.json, SAEs)."),
    sae_a: str | None = typer.Option(None, "--sae-a", help="Folder of trained SAEs for A's layers (SAELens or sparsify layout) instead of training seed 1."),
    sae_b: str | None = typer.Option(None, "--sae-b", help="Folder of trained SAEs for B's layers."),
    force: bool = typer.Option(False, "--force", help="Run again even if the folder holds a report (retrains the SAEs)."),
    settings: AlignSettings = None,  # type: ignore[assignment]
    _zoo: Any = None,
    sae: SaeTrainSettings = None,  # type: ignore[assignment]
    mlp: MlpMapperSettings = None,  # type: ignore[assignment]
) -> None:
    """Pair, train SAEs, fit mappers both ways, score against nulls, second-SAE references and upper bounds, intervene; write report.json."""
    from xsae_cli.align.transfer import TransferSpec, run_transfer, warn_small

    cfg = ctx.obj.config
    hw = cfg.hardware
    spec = TransferSpec(
        a=a,
        b=b,
        out=out_dir,
        settings=settings,
        sae=sae,
        mlp=mlp.replace(seed=hw.seed),
        sae_a=sae_a,
        sae_b=sae_b,
        device=hw.device,
        dtype=hw.dtype,
        seed=hw.seed,
        force=force,
        trust_remote_code=cfg.zoo.trust_remote_code,
    )
    report = run_transfer(spec)
    warn_small(report)
    out.emit(report, render_report)
    out.info(f"wrote {Path(out_dir) / 'report.json'}")


@app.command("report")
def report(
    run_dir: Path = typer.Argument(..., help="A folder written by `xsae align transfer` (or its report.json)."),
) -> None:
    """Reprint a saved alignment report (use the root --json for the JSON itself)."""
    from xsae_cli.align.transfer import load_report

    out.emit(load_report(run_dir), render_report)


PAIR_ONLY = tuple(f"align.{n}" for n in ("layers", "corpus", "text_field", "limit", "context_size", "val_fraction", "test_fraction", "max_train_pairs", "max_test_pairs", "batch_contexts")) + tuple(
    f"align.crosscoder.{f.name}" for f in dataclasses.fields(CrosscoderSettings)
)


def render_crosscoder(report: dict[str, Any]) -> None:
    a, b = report["models"]
    p = report["pairing"]
    out.console.print(f"[bold]{a}[/bold] and [bold]{b}[/bold]: paired {p['pairs']:,} positions ({p['kept_a']:.1%} / {p['kept_b']:.1%} of tokens kept; floor {report['floor_kept']:.0%})")
    rows = []
    for r in report["results"]:
        t, n, rg = r["test"], r["null"], r["ridge"]
        lat, ln = r["latents"], r["latents_null"]
        rows.append(
            [
                f"{r['layer_a']}:{r['layer_b']}",
                r["config"]["objective"],
                f"{_f(t['r2_joint'][a])} ({_f(n['r2_joint'][a])})",
                f"{_f(t['r2_joint'][b])} ({_f(n['r2_joint'][b])})",
                f"{_f(t['r2_from_one'][f'{a}->{b}'])} ({_f(n['r2_from_one'][f'{a}->{b}'])})",
                f"{_f(rg['a->b']['ridge'])} / {_f(rg['a->b']['ridge_upper'])}",
                f"{_f(t['r2_from_one'][f'{b}->{a}'])} ({_f(n['r2_from_one'][f'{b}->{a}'])})",
                f"{_f(rg['b->a']['ridge'])} / {_f(rg['b->a']['ridge_upper'])}",
                f"{_f(lat['shared_fraction'])} ({_f(ln['shared_fraction'])})",
                f"{_f(lat['exclusive_fraction'][a])} / {_f(lat['exclusive_fraction'][b])}",
                _f(lat["alive"]),
            ]
        )
    cols = ["layers", "objective", f"R2 {a} (null)", f"R2 {b} (null)", f"{a}->{b} (null)", "ridge / upper", f"{b}->{a} (null)", "ridge / upper", "shared (null)", f"exclusive {a} / {b}", "alive"]
    out.console.print(out.table("held-out crosscoder figures: R2 from the joint code, cross-reconstruction from one model's code, shuffled-pair null in brackets", cols, rows))


@app.command("crosscoder")
@options("zoo", into="_zoo", only=("trust_remote_code",))
@options("align", "align.crosscoder", into=("settings", "cc"), only=PAIR_ONLY)
def crosscoder(
    ctx: typer.Context,
    models: str = typer.Option(..., "--models", help="Two models, comma-separated: zoo names or model paths."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run folder (crosscoder_report.json, crosscoders/<layer_a>_<layer_b>/)."),
    force: bool = typer.Option(False, "--force", help="Run again even if the folder holds a report."),
    settings: AlignSettings = None,  # type: ignore[assignment]
    cc: CrosscoderSettings = None,  # type: ignore[assignment]
    _zoo: Any = None,
) -> None:
    """One dictionary over two models' paired positions (crosscoder or universal SAE), scored next to its shuffled-pair null and the ridge map."""
    from xsae_cli.align.crosscoder_run import CrosscoderSpec, parse_models, run_crosscoder

    cfg = ctx.obj.config
    hw = cfg.hardware
    spec = CrosscoderSpec(models=parse_models(models), out=out_dir, settings=settings, cc=cc, device=hw.device, dtype=hw.dtype, seed=hw.seed, force=force, trust_remote_code=cfg.zoo.trust_remote_code)
    report = run_crosscoder(spec)
    out.emit(report, render_crosscoder)
    out.info(f"wrote {Path(out_dir) / 'crosscoder_report.json'}")


def render_diff(report: dict[str, Any]) -> None:
    render_crosscoder(report)
    for r in report["results"]:
        for name, rows in r.get("exclusive_latents", {}).items():
            table = [[str(x["latent"]), _f(x["relative_norm"]), _f(x["firing_rate"], 4), " | ".join(f"{c['text']}[{c['token']}]" for c in x["contexts"])] for x in rows]
            out.console.print(
                out.table(
                    f"latents most exclusive to {name} (layers {r['layer_a']}:{r['layer_b']}; relative decoder norm, 1 = only {name})",
                    ["latent", "rel. norm", "firing", "top test contexts [token]"],
                    table,
                )
            )


@app.command("diff")
@options("zoo", into="_zoo", only=("trust_remote_code",))
@options("align", "align.crosscoder", into=("settings", "cc"), only=PAIR_ONLY)
def diff(
    ctx: typer.Context,
    base: str = typer.Option(..., "--base", help="The base model: zoo name or model path."),
    finetuned: str = typer.Option(..., "--finetuned", help="The fine-tuned model (same tokenizer)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run folder (crosscoder_report.json, crosscoders/<layer>_<layer>/)."),
    top: int = typer.Option(10, "--top", min=1, help="Latents listed per side."),
    force: bool = typer.Option(False, "--force", help="Run again even if the folder holds a report."),
    settings: AlignSettings = None,  # type: ignore[assignment]
    cc: CrosscoderSettings = None,  # type: ignore[assignment]
    _zoo: Any = None,
) -> None:
    """Model diffing: a crosscoder on base vs fine-tuned activations, latents ranked by how exclusive they are to each side, with top contexts."""
    from xsae_cli.align.crosscoder_run import CrosscoderSpec, run_crosscoder

    cfg = ctx.obj.config
    hw = cfg.hardware
    spec = CrosscoderSpec(
        models=[base, finetuned],
        out=out_dir,
        settings=settings,
        cc=cc,
        device=hw.device,
        dtype=hw.dtype,
        seed=hw.seed,
        force=force,
        trust_remote_code=cfg.zoo.trust_remote_code,
        diff=True,
        top_latents=top,
    )
    report = run_crosscoder(spec)
    out.emit(report, render_diff)
    out.info(f"wrote {Path(out_dir) / 'crosscoder_report.json'}")
