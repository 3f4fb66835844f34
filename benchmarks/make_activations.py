"""Harvest real activations into one safetensors file (tensor ``acts``) for the SAE benchmarks.

`.venv/bin/python benchmarks/make_activations.py --model smollm2-135m --hook model.layers.6 --tokens 65536 --out /tmp/smol_l6.safetensors`
then `XSAE_BENCH_ACTS=/tmp/smol_l6.safetensors .venv/bin/python benchmarks/sae_throughput.py --shape small`.
Uses the built-in corpus, special tokens dropped, as `xsae sae train` does.
"""

from __future__ import annotations

import argparse

from xsae_cli.core.io import save_safetensors
from xsae_cli.data.activations import ActivationStore
from xsae_cli.data.corpus import load_contexts
from xsae_cli.zoo.registry import resolve_entry
from xsae_cli.zoo.sources import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hook", default="model.layers.6")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--outlier-factor", type=float, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model, tok = load_model(resolve_entry(args.model))
    ctx, _ = load_contexts("builtin", tok, args.context_size)
    store = ActivationStore(model, tok, [args.hook], ctx, outlier_factor=args.outlier_factor, model_name=args.model)
    acts = store.harvest(args.tokens)[args.hook]
    save_safetensors({"acts": acts}, args.out, metadata={"model": args.model, "hook": args.hook, "corpus": "builtin"})
    print(f"{acts.shape[0]} x {acts.shape[1]} activations -> {args.out}")


if __name__ == "__main__":
    main()
