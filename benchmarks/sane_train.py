"""SANE training windows/s and embedding seconds per model, on one CPU thread (or the GPU if any).

Uses the catalogued demo zoo (run `xsae zoo demo` first). Trains the default model
(d_model 128, 2+1 layers, latent 16 per 64-float chunk) for a few steps at the issue's settings
(batch 4, window 1024), then embeds each model with the checkpoint.
Run: ``.venv/bin/python benchmarks/sane_train.py [--steps 20] [--models a,b]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--window-size", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--models", default="tiny-gpt2,tiny-gptneox,tiny-qwen2,tiny-mistral,tiny-gemma,minilm-l6,smollm2-135m")
    ap.add_argument("--embed", default="tiny-gpt2,minilm-l6,smollm2-135m")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from xsae_cli.core.hardware import peak_rss_bytes, resolve_device
    from xsae_cli.sane.dataset import load_or_tokenize
    from xsae_cli.sane.embed import embed_tokenized
    from xsae_cli.sane.settings import SaneTrainSettings
    from xsae_cli.sane.train import load_model, train

    dev = resolve_device(args.device)
    t0 = time.perf_counter()
    tms = {n: load_or_tokenize(n) for n in args.models.split(",")}
    tokenize_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        s = SaneTrainSettings(epochs=1, batch_size=args.batch_size, window_size=args.window_size, steps_per_epoch=args.steps, device=str(dev))
        r = train(list(tms.values()), Path(tmp) / "run", s)
        model, _meta = load_model(r.last_checkpoint)
        model.to(dev)
        embed = {}
        for n in args.embed.split(","):
            t1 = time.perf_counter()
            _, windows = embed_tokenized(model, tms[n], args.window_size, 8, dev)
            secs = time.perf_counter() - t1
            embed[n] = {"seconds": secs, "windows": windows, "n_chunks": tms[n].n_chunks, "windows_per_s": windows / secs}
    print(
        json.dumps(
            {
                "device": str(dev),
                "threads": torch.get_num_threads(),
                "tokenize_or_load_seconds": tokenize_s,
                "train": {"steps": args.steps, "batch_size": args.batch_size, "window_size": args.window_size, **r.history[-1]},
                "embed": embed,
                "peak_rss_bytes": peak_rss_bytes(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
