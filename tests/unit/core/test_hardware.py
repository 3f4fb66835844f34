import pytest
import torch

from xsae_cli.core import hardware
from xsae_cli.core.errors import XsaeError


def test_auto_and_cpu_resolve() -> None:
    assert hardware.resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else ("mps" if "mps" in hardware.available_devices() else "cpu")
    assert hardware.resolve_device("auto").type == expected
    assert hardware.available_devices()[-1] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_missing_cuda_lists_available_devices() -> None:
    with pytest.raises(XsaeError) as exc:
        hardware.resolve_device("cuda:1")
    assert "available devices: " in exc.value.one_line() and "cpu" in exc.value.one_line()


def test_missing_mps_says_so_and_lists_devices() -> None:
    if "mps" in hardware.available_devices():
        pytest.skip("this machine has MPS")
    with pytest.raises(XsaeError, match="'mps' is not available.*available devices: .*cpu"):
        hardware.resolve_device("mps")


def test_bad_device_and_dtype_names() -> None:
    with pytest.raises(XsaeError, match="unknown device 'tpu'"):
        hardware.resolve_device("tpu")
    with pytest.raises(XsaeError, match="unknown dtype 'float8'"):
        hardware.resolve_dtype("float8", torch.device("cpu"))
    assert hardware.resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert hardware.resolve_dtype("float32", torch.device("cpu")) is torch.float32


def _tiny_run(seed: int) -> torch.Tensor:
    hardware.seed_everything(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        x = torch.randn(32, 8)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_seed_repeats_a_cpu_run_exactly() -> None:
    assert torch.equal(_tiny_run(3), _tiny_run(3))
    assert not torch.equal(_tiny_run(3), _tiny_run(4))


def test_memory_report_and_versions() -> None:
    rep = hardware.memory_report(torch.device("cpu"))
    assert rep["peak_rss_bytes"] >= rep["rss_bytes"] > 0
    versions = hardware.package_versions()
    assert versions["torch"] and versions["python"]
