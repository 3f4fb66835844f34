import pytest

from xsae_cli.core import launch
from xsae_cli.core.errors import XsaeError


def test_strip_launch_args_removes_only_launch_options() -> None:
    argv = ["--launcher", "accelerate", "--num-processes=2", "--device", "cpu", "sae", "train", "--num-machines", "1", "--k", "4"]
    assert launch.strip_launch_args(argv) == ["--device", "cpu", "sae", "train", "--k", "4"]


def test_misspelt_launcher_lists_valid_ones() -> None:
    with pytest.raises(XsaeError) as exc:
        launch.check_launcher("acelerate")
    text = exc.value.one_line()
    assert "did you mean 'accelerate'" in text and "deepspeed" in text and "torchrun" in text


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("accelerate", ["launch", "--num_processes", "4", "--num_machines", "2", "--multi_gpu", "-m", "xsae_cli", "doctor"]),
        ("torchrun", ["--nproc-per-node=2", "--nnodes=2", "--node-rank=1", "-m", "xsae_cli", "doctor"]),
        ("deepspeed", ["--num_nodes", "2", "--no_local_rank", "--module", "xsae_cli", "doctor"]),
    ],
)
def test_build_command_uses_the_engines_own_launcher(name: str, expected: list[str]) -> None:
    spec = launch.LaunchSpec(launcher=name, num_processes=2, num_machines=2, machine_rank=1, cpu=True)
    cmd = launch.build_command(spec, ["--launcher", name, "doctor"])
    joined = " ".join(cmd)
    for token in expected:
        assert token in cmd or token in joined, (token, cmd)
    assert "--launcher" not in cmd


def test_zero_processes_is_refused() -> None:
    with pytest.raises(XsaeError, match="must be at least 1"):
        launch.build_command(launch.LaunchSpec("torchrun", num_processes=0), ["doctor"])
