"""Settings as data: every field of every section is reachable from TOML, the environment and flags,
its rules are checked where the value is written, and the CLI's options come from the fields."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from xsae_cli.core.config import load_config, sections
from xsae_cli.core.errors import XsaeError
from xsae_cli.core.settings import InvalidSetting, base_type, field_types, meta_of


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _env_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _each_setting():
    for name, sec in sections().items():
        for f in sec.fields():
            value = sec.default_of(f)
            if value is not None:
                yield name, f.name, value


def test_every_setting_is_reachable_from_the_file_and_the_environment(tmp_path: Path) -> None:
    settings = list(_each_setting())
    assert len(settings) > 150  # every group's settings, not only [hardware]
    lines: dict[str, list[str]] = {}
    for name, key, value in settings:
        lines.setdefault(name, []).append(f"{key} = {_toml_value(value)}")
    (tmp_path / "xsae.toml").write_text("\n".join(f"[{name}]\n" + "\n".join(rows) for name, rows in lines.items()) + "\n")
    cfg = load_config(cwd=tmp_path, env={})
    for name, key, value in settings:
        assert cfg.sources[f"{name}.{key}"].startswith("file "), (name, key)
        assert getattr(cfg.section(name), key) == value, (name, key)
    env = {sections()[name].env_prefix + key.upper(): _env_value(value) for name, key, value in settings}
    cfg = load_config(cwd=tmp_path / "nowhere", env=env)
    for name, key, value in settings:
        assert cfg.sources[f"{name}.{key}"] == f"env {sections()[name].env_prefix}{key.upper()}", (name, key)
        assert getattr(cfg.section(name), key) == value, (name, key)


def test_every_cli_setting_is_an_option_of_some_command() -> None:
    """Settings marked for the command line appear as a flag of at least one command."""
    from typer.main import get_command

    from xsae_cli.cli import app
    from xsae_cli.core.config import flag_name

    spellings: set[str] = set()
    stack = [get_command(app)]
    while stack:
        cmd = stack.pop()
        stack.extend(getattr(cmd, "commands", {}).values())
        for p in cmd.params:
            if getattr(p, "param_type_name", "") == "option":
                spellings.update(p.opts)
    missing = [f"[{name}] {f.name}" for name, sec in sections().items() for f in sec.fields() if meta_of(f).cli and flag_name(f) not in spellings]
    assert not missing, missing


def test_one_definition_per_setting_with_per_section_defaults() -> None:
    cfg = load_config(env={}, cwd="/nonexistent")
    assert cfg.sae.k == 32 and cfg.sae.expansion == 8 and cfg.sae.tokens == 2_000_000
    align_sae = cfg.section("align.sae")
    assert type(align_sae).__name__ == "SaeTrainSettings" and align_sae.expansion == 4 and align_sae.tokens == 200_000
    assert cfg.section("restore.sae").batch_size == 1024
    # the SAE fields are declared once: the three sections share the dataclass fields
    secs = sections()
    k_fields = {id(next(f for f in dataclasses.fields(secs[n].cls) if f.name == "k").metadata) for n in ("sae", "align.sae", "restore.sae")}
    assert len(k_fields) == 1


@pytest.mark.parametrize(
    ("toml", "needles"),
    [
        ("[sae]\nk = 0\n", ["line 2", "[sae] k = 0", ">= 1"]),
        ("[sae]\nexpansion = 0\n", ["[sae] expansion = 0", ">= 1"]),
        ("[sae]\nlr = -1.0\n", ["[sae] lr = -1.0", "> 0"]),
        ("[sae]\nlr = nan\n", ["finite"]),
        ("[sae]\ncheckpoint_every = 0\n", ["checkpoint_every", ">= 1"]),
        ("[sae]\nbatch_size = 0\n", ["batch_size", ">= 1"]),
        ("[sae]\ncontext_size = -4\n", ["context_size = -4", ">= 2"]),
        ('[sae]\narch = "topkk"\n', ["arch = 'topkk'", "did you mean 'topk'"]),
        ("[align.sae]\nk = 0\n", ["[align.sae] k = 0"]),
        ("[restore]\nseq_len = 100000\n", ["seq_len = 100000", "<= 16384"]),
        ("[restore.predict]\nbeam = 0\n", ["beam = 0"]),
        ("[restore.evaluate]\norder = 0\n", ["order = 0"]),
        ("[sane]\nlr = nan\n", ["finite"]),
        ("[viz]\npage_size = 0\n", ["page_size = 0"]),
    ],
)
def test_invalid_values_name_the_key_line_and_range(tmp_path: Path, toml: str, needles: list[str]) -> None:
    (tmp_path / "xsae.toml").write_text(toml)
    with pytest.raises(XsaeError) as exc:
        load_config(cwd=tmp_path, env={})
    text = exc.value.one_line()
    for needle in needles:
        assert needle in text, (needle, text)


def test_invalid_flag_and_env_values_name_the_flag_and_the_variable(tmp_path: Path) -> None:
    with pytest.raises(XsaeError, match=r"^--k 0: must be >= 1"):
        load_config(cwd=tmp_path, env={}, flags={"sae": {"k": 0}})
    with pytest.raises(XsaeError, match="environment variable XSAE_ALIGN_SAE_K"):
        load_config(cwd=tmp_path, env={"XSAE_ALIGN_SAE_K": "-3"})
    with pytest.raises(XsaeError, match="--tokens: must be"):
        load_config(cwd=tmp_path, env={}, flags={"sae": {"tokens": "lots"}})


def test_cross_field_rules(tmp_path: Path) -> None:
    with pytest.raises(XsaeError, match="warmup_fraction"):
        load_config(cwd=tmp_path, env={}, flags={"sae": {"warmup_fraction": 0.6, "decay_fraction": 0.6}})
    with pytest.raises(XsaeError, match="min_len"):
        load_config(cwd=tmp_path, env={}, flags={"restore.predict": {"min_len": 5, "max_len": 2}})
    with pytest.raises(XsaeError, match="--latent-dim 64: must be smaller than chunk_size"):
        load_config(cwd=tmp_path, env={}, flags={"sane": {"latent_dim": 64, "chunk_size": 64}})


def test_python_construction_checks_the_same_rules() -> None:
    from xsae_cli.sae.settings import SaeTrainSettings

    with pytest.raises(InvalidSetting, match="k = 0"):
        SaeTrainSettings(k=0)
    assert SaeTrainSettings(k=4).replace(tokens=10).tokens == 10


def test_renamed_keys_keep_working_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "xsae.toml").write_text('[align]\nsae_tokens = "50k"\nhypernet_epochs = 7\n\n[restore]\nbeam = 3\n')
    cfg = load_config(cwd=tmp_path, env={})
    assert cfg.section("align.sae").tokens == 50_000 and cfg.section("align.mlp").max_epochs == 7 and cfg.section("restore.predict").beam == 3
    err = capsys.readouterr().err
    assert "[align] sae_tokens is now [align.sae] tokens" in " ".join(err.split())


def test_fixed_fields_are_not_settable(tmp_path: Path) -> None:
    (tmp_path / "xsae.toml").write_text("[restore.sae]\ntokens = 100\n")
    with pytest.raises(XsaeError, match="set by the command itself"):
        load_config(cwd=tmp_path, env={})


def test_config_file_that_is_not_utf8_or_a_directory(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[sae]\nk = 3 # \xff\xfe\n")
    with pytest.raises(XsaeError, match="not UTF-8"):
        load_config(bad, env={})
    with pytest.raises(XsaeError, match="is a directory"):
        load_config(tmp_path, env={})


def test_settings_types_are_ones_the_loader_understands() -> None:
    allowed = {int, float, str, bool}
    for name, sec in sections().items():
        for key, tp in field_types(sec.cls).items():
            inner, _ = base_type(tp)
            origin = typing.get_origin(inner)
            ok = inner in allowed or (origin in (list, tuple) and all(a in allowed or a is Ellipsis for a in typing.get_args(inner)))
            assert ok, (name, key, tp)


def test_resume_policy_comes_from_the_fields() -> None:
    from xsae_cli.core.settings import resume_changes
    from xsae_cli.sae.settings import SaeRunSettings

    saved = dataclasses.asdict(SaeRunSettings())
    refused, grown = resume_changes(saved, SaeRunSettings(k=4, corpus="other.txt", tokens=4_000_000, eval_tokens=10, betas=(0.9, 0.999)))
    assert refused == ["--k 32 -> 4", "--corpus builtin -> other.txt"]
    assert grown == {"tokens": [2_000_000, 4_000_000]}
    assert resume_changes({"k": 32}, SaeRunSettings()) == ([], {})  # an older checkpoint's missing fields are not compared
