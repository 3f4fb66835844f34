from pathlib import Path

import pytest

from xsae_cli.core.config import load_config
from xsae_cli.core.errors import XsaeError


def test_defaults_when_nothing_is_set(tmp_path: Path) -> None:
    cfg = load_config(cwd=tmp_path, env={})
    assert cfg.hardware.device == "auto"
    assert cfg.hardware.seed == 0
    assert cfg.file is None
    assert all(src == "default" for *_, src in cfg.rows())


def test_layers_file_env_flag_in_order(tmp_path: Path) -> None:
    (tmp_path / "xsae.toml").write_text('[hardware]\nseed = 7\ndevice = "cpu"\n\n[sae]\nk = 16\n')
    cfg = load_config(cwd=tmp_path, env={"XSAE_HARDWARE_SEED": "9"}, flags={"sae": {"k": 64, "lr": None}})
    assert cfg.hardware.device == "cpu"  # file
    assert cfg.hardware.seed == 9  # env beats file
    assert cfg.sae.k == 64  # flag beats file
    assert cfg.sae.lr is None  # a None flag means not given (None: the optimizer picks its own)
    assert cfg.sources["hardware.device"].endswith("xsae.toml:3")
    assert cfg.sources["hardware.seed"] == "env XSAE_HARDWARE_SEED"
    assert cfg.sources["sae.k"] == "flag --k"
    assert cfg.sources.get("sae.lr", "default") == "default"


def test_explicit_config_file_and_list_values(tmp_path: Path) -> None:
    f = tmp_path / "other.toml"
    f.write_text('[align]\nlayers = ["3", "4"]\n')
    cfg = load_config(f, cwd=tmp_path, env={"XSAE_ZOO_OFFLINE": "yes"})
    assert cfg.align.layers == ["3", "4"]
    assert cfg.zoo.offline is True


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(cwd=tmp_path, env={})
    with pytest.raises(Exception):
        cfg.hardware.seed = 3  # type: ignore[misc]


def test_unknown_key_names_closest_match_and_valid_keys(tmp_path: Path) -> None:
    (tmp_path / "xsae.toml").write_text("[hardware]\n\nsede = 1\n")
    with pytest.raises(XsaeError) as exc:
        load_config(cwd=tmp_path, env={})
    text = exc.value.one_line()
    assert "line 3" in text and "'sede'" in text and "did you mean 'seed'" in text and "device" in text


def test_unknown_section(tmp_path: Path) -> None:
    (tmp_path / "xsae.toml").write_text("[hardwar]\nseed = 1\n")
    with pytest.raises(XsaeError, match="did you mean 'hardware'"):
        load_config(cwd=tmp_path, env={})


def test_wrong_type_names_key_type_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "xsae.toml").write_text('[hardware]\ndevice = "cpu"\nseed = "abc"\n')
    with pytest.raises(XsaeError) as exc:
        load_config(cwd=tmp_path, env={})
    text = exc.value.one_line()
    assert "xsae.toml line 3" in text and "seed must be an integer" in text and "'abc'" in text


def test_bool_is_not_an_int(tmp_path: Path) -> None:
    (tmp_path / "xsae.toml").write_text("[hardware]\nseed = true\n")
    with pytest.raises(XsaeError, match="seed must be an integer"):
        load_config(cwd=tmp_path, env={})


def test_bad_env_value_and_unknown_env_key(tmp_path: Path) -> None:
    with pytest.raises(XsaeError, match="XSAE_HARDWARE_SEED='x'"):
        load_config(cwd=tmp_path, env={"XSAE_HARDWARE_SEED": "x"})
    with pytest.raises(XsaeError, match="did you mean 'seed'"):
        load_config(cwd=tmp_path, env={"XSAE_HARDWARE_SEDE": "1"})
    # Non-config XSAE_ variables are left alone.
    assert load_config(cwd=tmp_path, env={"XSAE_HOME": "/x", "XSAE_FOO": "1"}).hardware.seed == 0


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "xsae.toml").write_text("[hardware\nseed = 1\n")
    with pytest.raises(XsaeError, match="invalid TOML"):
        load_config(cwd=tmp_path, env={})
    with pytest.raises(XsaeError, match="config file not found"):
        load_config(tmp_path / "nope.toml", env={})
