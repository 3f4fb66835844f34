"""Run folders end to end: every writer that takes --out refuses a folder another live process holds
(one line naming the owner) or an --out that is a file, before any model load; nothing of the owner's is touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import assert_user_error, run_xsae

ATF = Path(__file__).parents[1] / "unit" / "restore" / "fixtures" / "letters.atf"
HOLD = "import sys, time\nfrom xsae_cli.core.runlock import owned\nwith owned(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n"

#: Every trainer / writer with --out, with arguments that would otherwise start real work.
WRITERS = {
    "sae train": ["sae", "train", "--model", "no-such-model", "--hook", "0"],
    "sane train": ["sane", "train", "--models", "no-such-model"],
    "restore train": ["restore", "train", "--corpus", str(ATF), "--steps", "2"],
    "restore sae": ["restore", "sae", "-m", "no-such-model"],
    "align transfer": ["align", "transfer", "--a", "no-such-a", "--b", "no-such-b"],
}


@pytest.fixture()
def held(tmp_path: Path):  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_log.jsonl").write_text('{"step": 1}\n')
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    yield run, proc
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _in_process(args: list[str]) -> tuple[int, str]:
    """The real app in this process (a subprocess costs seconds of imports per case on a loaded machine)."""
    from xsae_cli.cli import app

    with pytest.raises(SystemExit) as ex:
        app(args, prog_name="xsae")
    return int(ex.value.code or 0), ""


def test_a_held_folder_is_refused_in_a_subprocess(held: tuple[Path, subprocess.Popen[str]]) -> None:
    run, proc = held
    line = assert_user_error(run_xsae(*WRITERS["sae train"], "--out", str(run)), str(run), f"pid {proc.pid}", "choose another --out")
    assert "is in use by" in line
    assert (run / "train_log.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_writer_refuses_a_held_folder(name: str, held: tuple[Path, subprocess.Popen[str]], capsys: pytest.CaptureFixture[str]) -> None:
    run, proc = held
    assert _in_process([*WRITERS[name], "--out", str(run)])[0] == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and f"pid {proc.pid}" in err and "is in use by" in err and "\n" not in err, err
    assert (run / "train_log.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_writer_refuses_an_out_that_is_a_file(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    assert _in_process([*WRITERS[name], "--out", str(f)])[0] == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and f"--out {f} is a file, not a folder" in err and "\n" not in err, err
    assert f.read_text() == "keep me"


def test_sae_train_refuses_a_resume_with_other_settings_before_the_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint trained at k=8: `--k 4` (and another hook) is refused listing both, before 'no-such-model' is even looked up."""
    import dataclasses
    import json

    from xsae_cli.sae.settings import SaeRunSettings

    step = tmp_path / "run" / "checkpoints" / "step_000000008"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 8, "hooks": ["0"], "settings": dataclasses.asdict(SaeRunSettings(k=8)), "skeleton": {}}))
    assert _in_process(["sae", "train", "--model", "no-such-model", "--hook", "1", "--k", "4", "--out", str(tmp_path / "run")])[0] == 2
    err = capsys.readouterr().err.strip()
    assert "other settings: --hook 0 -> 1; --k 8 -> 4" in err and "--force" in err and "\n" not in err, err
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["checkpoints", "meta.json", "step_000000008"]
