"""Lineage benchmark on four families no rule in the code names, held out of SANE's training.

``OMP_NUM_THREADS=1 python benchmarks/sane_lineage_unnamed.py /tmp/sane16-bench2`` (about 8 min on a
loaded 2-core CPU); prints nothing but the log, writes ``<out>/lineage.json`` whose
``per_held_out_family`` holds every method's scores (SANE, quantiles, raw cosine, random encoder).
"""

import sys
import time
from pathlib import Path

from xsae_cli.sane.evaluate import evaluate
from xsae_cli.sane.settings import LineageSettings

s = LineageSettings(
    families=("tiny-qwen2", "hf:gptj", "hf:phi", "hf:falcon", "hf:opt"),
    holdout_families=("hf:gptj", "hf:phi", "hf:falcon", "hf:opt"),
    seeds=2,
    real=(),
    tiny_ft=(20, 100, 1e-3),
    folds=1,
    epochs=2,
    steps_per_epoch=20,
    max_windows=8,
)
t = time.time()
r = evaluate(Path(sys.argv[1]), s, force=True, log=lambda m: print(m, flush=True))
print("secs", time.time() - t, flush=True)
