#!/usr/bin/env bash
# The GPU check of xsae in one short slot on one H100/H200 (issue 22): the GPU tests (tests/gpu), then
# benchmarks/sae_throughput.py on CUDA against sparsify and SAELens at d_in 768 / d_sae 24,576 / k 32
# and d_in 2,048 / d_sae 65,536 / k 64 (batch 8,192): tokens/s, the ratio, held-out FVU, the fraction
# of the encoder-matmul roofline, torch.cuda.max_memory_allocated, and xsae's step phase by phase.
# Budget: under 8 minutes on one H100/H200: the tests are stopped at 200 s (120 s a test), the benchmark
# at 240 s (both are expected to take a minute or two); everything is written under $OUT, and a short
# summary is printed last.
#
#   benchmarks/gpu_check.sh --fetch-wheels DIR   # beforehand, where the package index is reachable:
#                                                # the few wheels the GPU machine lacks (< 50 MB)
#   benchmarks/gpu_check.sh [--wheels DIR]       # on the GPU machine (no index): installs DIR's wheels
#                                                # (default: .whl in the repository) under /tmp
#   benchmarks/gpu_check.sh --dry-run [--quick]  # the same steps at tiny size on the CPU (make test runs
#                                                # --dry-run --quick; --quick leaves out the e2e tests)
#
# The repository runs from its source tree (PYTHONPATH), never installed. Python: $PYTHON, else the
# repository's .venv if there is one, else python3. Exit status: 0 when every step passed, else 1
# (2: bad usage or no CUDA device). Files under $OUT (default: a new folder under /tmp):
#   env.json        Python, torch, CUDA, GPU, which wheel groups are there
#   tests.log       pytest's output; tests.xml its JUnit report
#   throughput.log  the benchmark's output; throughput.json its results; profile.txt the step profile
#   summary.txt     the tables printed at the end
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
QUICK=0
FETCH=""
WHEELS="${WHEELS:-$ROOT/.whl}"
usage() { sed -n '2,/^set -uo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --quick) QUICK=1 ;;
    --wheels) WHEELS="$2"; shift ;;
    --fetch-wheels) FETCH="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

if [ -n "$FETCH" ]; then
  exec "$PYTHON" "$ROOT/benchmarks/gpu_wheels.py" fetch "$FETCH"
fi

OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/xsae-gpu-check.XXXXXX")}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
[ -d "$WHEELS" ] && WHEELS="$(cd "$WHEELS" && pwd)"
cd "$ROOT" || exit 2
WORK="$(mktemp -d "${TMPDIR:-/tmp}/xsae-gpu-work.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export XSAE_CACHE="$WORK/cache" XSAE_HOME="$WORK/home"  # tiny models and harvests built afresh, nothing of a user's touched
export PYTHONPATH="$ROOT"
if [ $DRY = 1 ]; then
  export XSAE_GPU_TESTS_DEVICE=cpu
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny models: thread hand-offs cost more than the arithmetic
  DEVICE=cpu
  TEST_TIMEOUT="${TEST_TIMEOUT:-1200}" BENCH_TIMEOUT="${BENCH_TIMEOUT:-600}" CASE_TIMEOUT=600  # a shared CPU may be slow
else
  DEVICE=cuda
  TEST_TIMEOUT="${TEST_TIMEOUT:-200}" BENCH_TIMEOUT="${BENCH_TIMEOUT:-240}" CASE_TIMEOUT=120  # the 8-minute budget
fi
echo "gpu_check: $([ $DRY = 1 ] && echo 'dry run on the CPU' || echo 'CUDA'); python $PYTHON; results in $OUT"

if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  if ! "$PYTHON" "$ROOT/benchmarks/gpu_wheels.py" install "$WHEELS" "$WORK/site"; then
    echo "error: installing the wheels of $WHEELS failed" >&2
    exit 1
  fi
  export PYTHONPATH="$WORK/site:$ROOT"
else
  echo "no wheels in $WHEELS: what this Python lacks is skipped where it is used (run --fetch-wheels first)"
fi

"$PYTHON" - "$OUT/env.json" "$DEVICE" <<'EOF' || exit 2
import json, platform, subprocess, sys
import torch
sys.path.insert(0, "benchmarks")  # the script runs from the repository root
from gpu_wheels import probe
path, device = sys.argv[1], sys.argv[2]
env = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__, "cuda_build": torch.version.cuda,
       "cuda_available": torch.cuda.is_available(), "groups": probe()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
               bf16=torch.cuda.is_bf16_supported(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,power.limit", "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        env["nvidia_smi"] = f"unavailable: {exc}"
open(path, "w").write(json.dumps(env, indent=2) + "\n")
print(json.dumps(env))
if device == "cuda" and not torch.cuda.is_available():
    sys.exit(f"error: torch {torch.__version__} sees no CUDA device here; on a machine without one run --dry-run")
EOF

FAILED=()
run_step() {  # name, timeout seconds, log file, command...
  local name="$1" limit="$2" log="$3"
  shift 3
  echo "== $name (limit ${limit}s) $(date +%T)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  [ "$rc" = 0 ] || FAILED+=("$name (exit $rc)")
}

MARK="gpu"
[ $QUICK = 1 ] && MARK="gpu and not slow"
run_step tests "$TEST_TIMEOUT" "$OUT/tests.log" \
  "$PYTHON" -m pytest tests/gpu -m "$MARK" -q -rs -p no:cacheprovider --basetemp="$WORK/pytest" --durations=8 -o timeout="$CASE_TIMEOUT" --junitxml="$OUT/tests.xml"

if [ $DRY = 1 ]; then
  BENCH=(--device cpu --shape dry --held-out 512 --threads 1)
else
  BENCH=(--device cuda --shape gpu)
fi
run_step benchmark "$BENCH_TIMEOUT" "$OUT/throughput.log" \
  "$PYTHON" benchmarks/sae_throughput.py "${BENCH[@]}" --roofline --breakdown "$OUT/profile.txt" --json "$OUT/throughput.json"

"$PYTHON" - "$OUT" "${FAILED[@]+"${FAILED[@]}"}" <<'EOF' | tee "$OUT/summary.txt"
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, failed = Path(sys.argv[1]), sys.argv[2:]
env = json.loads((out / "env.json").read_text())
print(f"\n==== summary: {env.get('gpu', 'CPU (dry run)')}, torch {env['torch']}, Python {env['python']}; wheel groups: {env['groups']}")
if (out / "tests.xml").exists():
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    print("tests: " + ", ".join(f"{k} {suite.get(k)}" for k in ("tests", "failures", "errors", "skipped")) + f" in {float(suite.get('time', 0)):.0f}s")
    for case in suite.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            print(f"  FAILED {case.get('name')}: {(bad.get('message') or '').splitlines()[0][:160] if bad.get('message') else ''}")
if (out / "throughput.json").exists():
    data = json.loads((out / "throughput.json").read_text())
    for res in data["results"]:
        if "error" in res:
            print(f"\n{res['shape']}: FAILED {res['error']}")
            continue
        roof = res.get("roofline") or {}
        print(f"\n{res['shape']}: {res['d_in']} x {res['d_sae']}, k {res['k']}, batch {res['batch']}, {res['tokens']:,} tokens; "
              f"roofline {roof.get('tokens_per_s', 0):,.0f} tokens/s ({roof.get('tflops', 0):.0f} TFLOP/s {roof.get('dtype', '')}); "
              f"max_memory_allocated {res.get('max_memory_allocated_bytes', 0) / 2**30:.2f} GiB")
        print(f"  {'impl':<10} {'opt':<7} {'tokens/s':>12} {'xsae/this':>9} {'FVU':>7} {'dead%':>6} {'roof%':>6} {'peak MiB':>9}")
        for r in res["rows"]:
            ratio = f"{r['ours_over_this']:.2f}x" if r.get("ours_over_this") else ""
            print(f"  {r['impl']:<10} {r['optimizer']:<7} {r['tokens_per_s']:>12,.0f} {ratio:>9} {r['fvu']:>7.4f} {r['dead_pct']:>6.1f} "
                  f"{100 * r.get('roofline_fraction', 0):>5.1f}% {r.get('peak_bytes', 0) / 2**20:>9,.0f}")
        for name, why in res.get("failed", {}).items():
            print(f"  FAILED {name}: {why[:200]}")
    for shape in (data.get("breakdown") or {}).get("shapes", []):
        for p in shape["phases"]:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in p["phases_ms"].items())
            print(f"step phases (ms), {p['d_in']}x{p['d_sae']} batch {p['batch']}: {parts}; sum {p['phases_sum_ms']:.2f}, step {p['step_ms']:.2f}")
        best = {}
        for t in shape["topk"]:
            if t["exact"] and (t["dtype"] not in best or t["ms"] < best[t["dtype"]]["ms"]):
                best[t["dtype"]] = t
        plain = {t["dtype"]: t["ms"] for t in shape["topk"] if t["method"] == "torch.topk"}
        if best:
            print(f"top-k {shape['batch']}x{shape['d_sae']}: " + "; ".join(f"{d}: torch.topk {plain.get(d, float('nan')):.3f} ms, fastest exact {b['method']} {b['ms']:.3f} ms" for d, b in best.items()))
    for err in (data.get("breakdown") or {}).get("errors", []) + ([data["breakdown"]["error"]] if "error" in (data.get("breakdown") or {}) else []):
        print(f"profile error: {err}")
print("\nFAILED: " + "; ".join(failed) if failed else "\nall steps passed")
EOF
[ ${#FAILED[@]} = 0 ]
