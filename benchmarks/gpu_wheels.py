"""The few wheels the GPU machine lacks: fetched beforehand where a package index is reachable, installed
there without one.

The GPU machine this project is lent runs its own Python 3.12 with torch 2.11 (CUDA 13), transformers,
accelerate, peft, safetensors, rich, typer, scikit-learn, scipy, matplotlib, numpy, pyarrow, psutil,
pytest and ~200 more (:data:`GPU_IMAGE`, as read on the machine on 2026-11-17), and reaches no index.
xsae runs there from its source tree (``PYTHONPATH``); of its own dependencies (pyproject.toml) the
machine lacks gguf, datasets, transformer_lens and schedulefree, and of these only schedulefree is
imported by a step of ``gpu_check.sh`` (the default signum optimizer): gguf is read for GGUF models
only, datasets for datasets folders only, transformer_lens by ``restore convert`` / ``--via
transformer-lens`` only, none of which the check runs. The rest comes in groups, each whole or not
at all, so that a peer that cannot be brought is skipped with its reason rather than half-installed:

==========  =====================================================================  ==========
group       wheels (versions: those the CPU tests and benchmarks run with)         for
==========  =====================================================================  ==========
core        schedulefree                                                           sae train
deepspeed   deepspeed (sdist only on PyPI: built here, DS_BUILD_OPS=0, pure        ZeRO-2 test
            Python), hjson, pydantic, pydantic-core, annotated-types,
            typing-inspection
sparsify    eai-sparsify, natsort, simple-parsing, docstring-parser, datasets,     benchmark
            dill, multiprocess
saelens     sae-lens, transformer-lens, better-abc, typeguard, wandb (+ its       benchmark
            opentelemetry exporters, googleapis-common-protos, platformdirs,
            sniffio)
==========  =====================================================================  ==========

Commands (``python benchmarks/gpu_wheels.py ...``):

- ``fetch DIR``: download (build, for deepspeed) every group's wheels for CPython 3.12 on manylinux
  x86_64 into DIR, then drop whole groups from the last while DIR is over ``--limit-mb`` (50 MB;
  the device tool carries 64 MiB with the repository), and write ``DIR/MANIFEST.json``;
- ``install DIR TARGET``: on the GPU machine, ``pip install --no-index --no-deps --target TARGET`` the
  wheels whose distribution the running Python lacks (a package the image has is never shadowed);
- ``simulate``: here, check that the groups are complete: a child Python that can import only what
  :data:`GPU_IMAGE` lists plus the groups' distributions imports every module the check needs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GROUPS: dict[str, list[str]] = {
    "core": ["schedulefree==1.4.1"],
    "deepspeed": ["deepspeed==0.19.8", "hjson==3.1.0", "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5"],
    "sparsify": ["eai-sparsify==1.3.3", "natsort==8.4.0", "simple-parsing==0.1.9", "docstring-parser==0.18.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19"],
    "saelens": [
        "sae-lens==6.54.12",
        "transformer-lens==3.9.0",
        "better-abc==0.0.3",
        "typeguard==4.6.1",
        "wandb==0.31.0",
        "platformdirs==4.14.9",
        "sniffio==1.3.1",
        "googleapis-common-protos==1.76.0",
        "opentelemetry-api==1.45.2",
        "opentelemetry-sdk==1.45.2",
        "opentelemetry-proto==1.45.2",
        "opentelemetry-semantic-conventions==0.66b2",
        "opentelemetry-exporter-otlp-proto-http==1.45.2",
        "opentelemetry-exporter-otlp-proto-common==1.45.2",
        "opentelemetry-exporter-http-transport==0.66b2",
        "opentelemetry-exporter-otlp-common==0.66b2",
    ],
}
#: What the modules of each group are imported as: the import that proves the group works.
PROBES = {"core": "schedulefree", "deepspeed": "deepspeed", "sparsify": "sparsify", "saelens": "sae_lens.training.sae_trainer"}
#: Built from source where PyPI has no wheel (pure Python once built).
BUILD_FROM_SDIST = {"deepspeed"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]

#: The GPU image's Python packages, as read on the machine on 2026-11-17 (update when the image changes).
GPU_IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit
cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq
torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()  # noqa: SIM905 - the image list as written down

#: What gpu_check.sh's steps import, beyond the standard library (for ``simulate``).
NEEDED_IMPORTS = ["xsae_cli.cli", "xsae_cli.sae.train", "xsae_cli.data.activations", "xsae_cli.restore.sae", "xsae_cli.sane.embed", "pytest", "pytest_timeout"]


def norm(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(spec: str) -> str:
    return norm(spec.split("==")[0])


def _wheel_dist(path: Path) -> str:
    return norm(path.name.split("-")[0])


# ----------------------------------------------------------------------------------------------
# fetch (where the index is reachable)
# ----------------------------------------------------------------------------------------------


def _download(spec: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "-d", str(dest), spec]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd, check=True)


def _build(spec: str, dest: Path) -> None:
    """A pure-Python wheel from an sdist (DeepSpeed: its setup.py imports the torch installed here)."""
    env = dict(os.environ, DS_BUILD_OPS="0", DS_BUILD_AIO="0")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), spec], check=True, env=env)
    built = [p for p in dest.glob(f"{spec.split('==')[0]}-*.whl")]
    bad = [p.name for p in built if not p.name.endswith("-none-any.whl")]
    if bad:
        raise SystemExit(f"{bad[0]} is not a pure-Python wheel: it would not run on the GPU machine's Python")


def _size_mb(files: list[Path]) -> float:
    return sum(f.stat().st_size for f in files) / 1e6


def fetch(dest: Path, groups: list[str], limit_mb: float) -> dict:
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    files: dict[str, list[Path]] = {}
    failed: dict[str, str] = {}
    for group in groups:
        with tempfile.TemporaryDirectory() as tmp:
            tmp_dir = Path(tmp)
            try:
                for spec in GROUPS[group]:
                    (_build if _name(spec) in BUILD_FROM_SDIST else _download)(spec, tmp_dir)
            except subprocess.CalledProcessError as exc:
                failed[group] = f"{' '.join(exc.cmd[-1:])}: exit {exc.returncode}"
                print(f"group {group} left out: could not get {exc.cmd[-1]}", file=sys.stderr)
                continue
            files[group] = []
            for whl in sorted(tmp_dir.glob("*.whl")):
                target = dest / whl.name
                whl.replace(target)
                files[group].append(target)
    dropped: dict[str, str] = {}
    while files and _size_mb([f for fs in files.values() for f in fs]) > limit_mb:
        group = list(files)[-1]
        for f in files.pop(group):
            f.unlink()
        dropped[group] = f"over the {limit_mb:g} MB limit"
        print(f"group {group} left out: the folder would exceed {limit_mb:g} MB", file=sys.stderr)
    manifest = {
        "python": "3.12",
        "platforms": PLATFORMS,
        "limit_mb": limit_mb,
        "groups": {g: sorted(f.name for f in fs) for g, fs in files.items()},
        "group_mb": {g: round(_size_mb(fs), 2) for g, fs in files.items()},
        "total_mb": round(_size_mb([f for fs in files.values() for f in fs]), 2),
        "left_out": {**failed, **dropped},
    }
    (dest / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ----------------------------------------------------------------------------------------------
# install (on the GPU machine, no index)
# ----------------------------------------------------------------------------------------------


def installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def install(src: Path, target: Path) -> dict:
    wheels = sorted(src.glob("*.whl"))
    todo = [w for w in wheels if not installed(_wheel_dist(w))]
    present = sorted(_wheel_dist(w) for w in wheels if w not in todo)
    if todo:
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "--upgrade",
                "--target",
                str(target),
                *map(str, todo),
            ],
            check=True,
        )
    return {"installed": sorted(_wheel_dist(w) for w in todo), "already_there": present, "target": str(target)}


def probe() -> dict[str, str]:
    """Each group's state here: the version of its first distribution, or what is missing.

    Found, not imported (importing DeepSpeed, sparsify and SAELens costs ~15 s): the steps that
    use a group import it themselves and skip, saying why, where that fails.
    """
    out = {}
    for group, specs in GROUPS.items():
        missing = [_name(s) for s in specs if not installed(_name(s))]
        out[group] = f"missing {', '.join(missing)}" if missing else metadata.version(_name(specs[0]))
    return out


# ----------------------------------------------------------------------------------------------
# simulate (here: the GPU image's packages plus the groups, nothing else)
# ----------------------------------------------------------------------------------------------

_BLOCKER = """
import importlib.abc, importlib.metadata as md, re, sys
allowed = set({allowed!r})
owner = {{}}
for mod, dists in md.packages_distributions().items():
    owner[mod] = {{re.sub(r"[-_.]+", "-", d).lower() for d in dists}}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        dists = owner.get(top)
        if dists and not (dists & allowed):
            raise ModuleNotFoundError(f"No module named {{top!r}} (not on the GPU machine: {{sorted(dists)}})", name=top)
        return None
sys.meta_path.insert(0, Block())
"""


def _closure(names: set[str]) -> set[str]:
    """``names`` and what they require as installed here, recursively (extras aside)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [norm(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]) for r in reqs if "extra ==" not in r]
    return seen


def simulate(groups: list[str]) -> int:
    """Import what the check needs under a finder that hides every distribution the GPU machine lacks.

    The image is taken to be self-consistent: what its packages require *as installed here* is let
    through (a newer huggingface_hub here needs httpx2; the image's own version has what it needs).
    The groups get no such pass: each must list every distribution its imports reach.
    """
    allowed = _closure({norm(n) for n in GPU_IMAGE}) | {_name(s) for g in groups for s in GROUPS[g]} | {"xsae"}
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "sitecustomize.py").write_text(_BLOCKER.format(allowed=sorted(allowed)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([tmp, str(ROOT)]), SPARSIFY_DISABLE_TRITON="1")
        failures = 0
        for module in NEEDED_IMPORTS + [PROBES[g] for g in groups]:
            proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env, cwd=tmp, check=False)
            ok = proc.returncode == 0
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} import {module}" + ("" if ok else f": {(proc.stderr.strip().splitlines() or ['?'])[-1]}"))
    return failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download the wheels into DIR (needs the package index)")
    f.add_argument("dir", type=Path)
    f.add_argument("--groups", default=",".join(GROUPS))
    f.add_argument("--limit-mb", type=float, default=50.0)
    i = sub.add_parser("install", help="install DIR's wheels that this Python lacks into TARGET (no index)")
    i.add_argument("dir", type=Path)
    i.add_argument("target", type=Path)
    sub.add_parser("probe", help="which groups import here")
    s = sub.add_parser("simulate", help="check the groups are complete against the GPU image's package list")
    s.add_argument("--groups", default=",".join(GROUPS))
    args = ap.parse_args(argv)
    if args.cmd == "fetch":
        manifest = fetch(args.dir, args.groups.split(","), args.limit_mb)
        print(json.dumps({k: manifest[k] for k in ("group_mb", "total_mb", "left_out")}))
        return 0
    if args.cmd == "install":
        print(json.dumps(install(args.dir, args.target)))
        return 0
    if args.cmd == "probe":
        print(json.dumps(probe()))
        return 0
    return 1 if simulate(args.groups.split(",")) else 0


if __name__ == "__main__":
    sys.exit(main())
