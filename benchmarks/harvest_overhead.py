"""Activation harvest overhead on SmolLM2-135M-Instruct with the built-in corpus.

Measures, per hooked layer:
* ours: tokens/s of ``ActivationStore.batches`` (hook, drop special tokens, shuffle buffer, batch)
  against a bare forward of the same model truncated after the same layer (goal: ours/bare >= 0.90);
* stop-early: the same harvest against a full ``LlamaForCausalLM`` forward (all layers + LM head),
  which is what a harvester without early stopping pays;
* norms of special-token positions (BOS at context start, EOS separators) relative to the median
  norm of ordinary tokens, which is why the store drops them.

The machine may be shared: variants are timed in paired rounds on the same chunk and ratios are
medians over rounds (see the comment in ``main``).

Usage: python benchmarks/harvest_overhead.py [--gguf PATH | --model HF_FOLDER] [--layers 6 15] [--contexts 16]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xsae_cli.core.console import state  # noqa: E402
from xsae_cli.data.activations import ActivationStore, HarvestStats  # noqa: E402
from xsae_cli.data.corpus import builtin_texts, tokenize_contexts  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
clock = time.perf_counter  # --clock cpu: time.process_time


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
    sys.exit("SmolLM2 GGUF not found: pass --gguf, or run `xsae zoo fetch`")


def time_bare(model, chunk, layer: int) -> float:
    """Seconds for the base model truncated after ``layer``: nothing hooked, copied or filtered."""
    base = model.model
    layers = base.layers
    base.layers = layers[: layer + 1]
    try:
        t0 = clock()
        with torch.inference_mode():
            base(input_ids=chunk.input_ids, attention_mask=chunk.attention_mask, use_cache=False)
        return clock() - t0
    finally:
        base.layers = layers


def time_full(model, chunk) -> float:
    """Seconds for the whole CausalLM (all layers and the LM head): a harvester that does not stop."""
    t0 = clock()
    with torch.inference_mode():
        model(input_ids=chunk.input_ids, attention_mask=chunk.attention_mask, use_cache=False)
    return clock() - t0


def time_ours(model, tok, chunk, layer: int, stop_early: bool = True) -> tuple[float, ActivationStore]:
    """Seconds for ActivationStore to yield every kept activation of ``chunk`` (store built inside)."""
    t0 = clock()
    store = ActivationStore(model, tok, [f"model.layers.{layer}"], chunk, batch_contexts=len(chunk), stop_early=stop_early, shuffle_buffer_tokens=16384)
    n = 0
    for batch in store.batches(4096):
        n += batch[f"model.layers.{layer}"].shape[0]
    return clock() - t0, store


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
        "bos_min": float(bos_r.min()),
        "bos_median": float(bos_r.median()),
        "bos_max": float(bos_r.max()),
        "eos_min": float(eos_r.min()),
        "eos_median": float(eos_r.median()),
        "eos_max": float(eos_r.max()),
        "content_max": float(content.max()),
        "content_over_10x": int((content > 10).sum()),
        "n_content": int(content.numel()),
        "n_bos": int(bos_r.numel()),
        "n_eos": int(eos_r.numel()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", help="path to SmolLM2-135M-Instruct.Q4_1.gguf (default: the demo zoo's copy)")
    ap.add_argument("--model", help="an HF folder with the same model instead of the GGUF (loads faster)")
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 15])
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--contexts", type=int, default=32, help="contexts timed (split into chunks of --batch-contexts)")
    ap.add_argument("--norm-contexts", type=int, default=64, help="contexts for the special-token norm figures")
    ap.add_argument("--batch-contexts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the chunks")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time, robust to other jobs on a shared machine (use with --threads 1)")
    args = ap.parse_args()
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    state.quiet = True  # no progress bars inside timed loops

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = clock()
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
    print(f"loaded {name} in {clock() - t0:.1f}s; {model.config.num_hidden_layers} layers, d={model.config.hidden_size}, {torch.get_num_threads()} torch threads, {args.clock} clock")

    contexts = tokenize_contexts(list(builtin_texts()), tok, args.context_size)
    print(f"built-in corpus: {len(contexts)} contexts of {args.context_size} tokens; timing {args.contexts} of them (drawn with seed 0)")
    drawn = torch.randperm(len(contexts), generator=torch.Generator().manual_seed(0))
    timed = contexts.select(drawn[: args.contexts])
    normed = contexts.select(drawn[: args.norm_contexts])
    bc = args.batch_contexts

    # The machine is shared and its load swings within seconds, so measurements are paired: each
    # round runs every variant once on the same chunk (one forward of --batch-contexts contexts),
    # in a shuffled order, and ratios are taken within a round; the median over rounds is reported.
    chunks = [timed.select(slice(s, s + bc)) for s in range(0, len(timed), bc)]
    time_ours(model, tok, chunks[0], args.layers[0])  # warm-up
    rng = random.Random(0)
    times: dict[str, list[float]] = {}
    stats = {layer: HarvestStats() for layer in args.layers}
    for _ in range(args.repeats):
        for chunk in chunks:
            jobs = [("full", lambda c=chunk: time_full(model, c))]
            for layer in args.layers:
                jobs.append((f"bare{layer}", lambda c=chunk, L=layer: time_bare(model, c, L)))
                jobs.append((f"ours{layer}", lambda c=chunk, L=layer: time_ours(model, tok, c, L)))
                jobs.append((f"nostop{layer}", lambda c=chunk, L=layer: time_ours(model, tok, c, L, stop_early=False)[0]))
            rng.shuffle(jobs)
            for key, job in jobs:
                out = job()
                if isinstance(out, tuple):
                    out, store = out
                    layer = int(key[4:])
                    for f in ("tokens_seen", "tokens_kept", "dropped_special", "forwards"):
                        setattr(stats[layer], f, getattr(stats[layer], f) + getattr(store.stats, f))
                times.setdefault(key, []).append(out)
    tokens = [c.n_tokens for c in chunks] * args.repeats

    def rate(key: str) -> float:
        return sum(tokens) / sum(times[key])

    def ratio(num: str, den: str) -> float:  # median over rounds of den_time / num_time: num's speed over den's
        return statistics.median(d / n for n, d in zip(times[num], times[den]))

    print(f"{len(chunks)} chunks x {args.repeats} rounds; aggregate tok/s (all rounds):")
    for key in times:
        print(f"  {key:>8}: {rate(key):,.0f} tok/s  (per-round spread {min(times[key]):.2f}..{max(times[key]):.2f} s)")
    print(f"\nfull CausalLM forward ({model.config.num_hidden_layers} layers + LM head): {rate('full'):,.0f} tok/s")
    rows = []
    for layer in args.layers:
        s = stats[layer]
        r_bare, r_full, r_nostop = ratio(f"ours{layer}", f"bare{layer}"), ratio(f"ours{layer}", "full"), ratio(f"ours{layer}", f"nostop{layer}")
        rows.append((layer, rate(f"ours{layer}"), rate(f"bare{layer}"), r_bare, r_full, r_nostop))
        print(
            f"layer {layer:2d}: ours {rate(f'ours{layer}'):,.0f} tok/s | bare forward to layer {layer} {rate(f'bare{layer}'):,.0f} tok/s "
            f"| ours/bare {r_bare:.3f} | stop-early vs full CausalLM x{r_full:.2f} | vs same store without stop-early x{r_nostop:.2f} "
            f"| dropped {s.dropped_special}/{s.tokens_seen} special positions"
        )

    print(f"\nspecial-token activation norms / median norm of ordinary tokens ({len(normed)} contexts):")
    for layer in args.layers:
        r = special_norms(model, tok, normed, layer, bc)
        print(
            f"layer {layer:2d}: median norm {r['median_norm']:.1f}; BOS@0 x{r['bos_min']:.1f}..x{r['bos_max']:.1f} (median x{r['bos_median']:.1f}, n={r['n_bos']}); "
            f"EOS separators x{r['eos_min']:.1f}..x{r['eos_max']:.1f} (median x{r['eos_median']:.1f}, n={r['n_eos']}); "
            f"ordinary tokens max x{r['content_max']:.1f}, {r['content_over_10x']}/{r['n_content']} above x10"
        )

    print("\n| layer | ours tok/s | bare tok/s | ours/bare (median of paired rounds) | stop-early vs full CausalLM forward | vs same store without stop-early |")
    print("|---|---|---|---|---|---|")
    for layer, ours, bare, ratio, vs_full, vs_nostop in rows:
        print(f"| {layer} | {ours:,.0f} | {bare:,.0f} | {ratio:.3f} | x{vs_full:.2f} | x{vs_nostop:.2f} |")


if __name__ == "__main__":
    main()
