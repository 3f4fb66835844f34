"""The architecture registry: a new architecture is one class and one registration line.

The proof: ``GainTopKSae`` below is defined and registered in this file only, and trains through
``SaeTrainer``, resumes from its checkpoints, saves in SAELens's layout and loads back through
``formats``, and injects as a PEFT adapter, without any other file knowing it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.settings import setting
from xsae_cli.sae.base import (
    SaeConfig,
    SparseAutoencoder,
    create_sae,
    fired_dense,
    mse_loss,
)
from xsae_cli.sae.formats import load_sae, save_sae
from xsae_cli.sae.registry import (
    ExtraTensor,
    arch_names,
    get_arch,
    register_sae_class,
    specs,
    unregister_sae_class,
)
from xsae_cli.sae.settings import SaeTrainSettings
from xsae_cli.sae.train import SaeTrainer

NAME = "gaintopk"


class GainTopKSae(SparseAutoencoder):
    """TopK with a learned per-latent gain on the codes, and an L2 pull of the gains towards 1.

    Dense and simple on purpose: it exercises k, an extra parameter, an option used as a loss
    coefficient and a SAELens name of its own.
    """

    gain: nn.Parameter

    def _dense(self, x_n: Tensor, training: bool = False) -> Tensor:
        pre = F.relu(self._pre(self._centred(x_n), training=training).to(self.dtype))
        vals, idx = pre.topk(int(self.cfg.k), dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals) * self.gain

    def _codes(self, x_n: Tensor) -> Tensor:
        return self._dense(x_n)

    def _train(self, x_n: Tensor, dead_mask: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor], Tensor]:
        codes = self._dense(x_n, training=True)
        x_hat = self._decode_raw(codes)
        mse = mse_loss(x_hat, x_n)
        pull = (self.gain - 1).pow(2).sum()
        loss = mse + self.cfg.setting("gain_decay") * pull
        with torch.no_grad():
            l0 = (codes > 0).sum(-1, dtype=torch.float32).mean()
        return x_hat, loss, {"mse": mse, "l0": l0, "gain_pull": pull}, fired_dense(codes.detach())


def _register() -> None:
    register_sae_class(  # the one registration line
        NAME,
        GainTopKSae,
        uses_k=True,
        saelens="xsae_test_gaintopk",
        coefficients=("gain_decay",),
        options={"gain_decay": 1e-3},
        tensors={"gain": ExtraTensor("parameter", init=1.0)},
    )


@pytest.fixture(autouse=True)
def registered() -> Iterator[None]:
    _register()
    yield
    unregister_sae_class(NAME)


def _data(n: int = 8192, d: int = 16, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    dictionary = F.normalize(torch.randn(64, d, generator=g), dim=-1)
    codes = torch.rand(n, 64, generator=g) * (torch.rand(n, 64, generator=g) < 0.05)
    return codes @ dictionary + 0.01 * torch.randn(n, d, generator=g)


def _batches(x: Tensor, batch: int):
    def make(skip: int) -> Iterator[dict[str, Tensor]]:
        for start in range(skip, x.shape[0], batch):
            yield {"h": x[start : start + batch]}

    return make


@dataclass(frozen=True)
class GainSettings(SaeTrainSettings):
    """An architecture's option as a setting (a [sae] key, an XSAE_SAE_ variable, a flag): one field."""

    gain_decay: float = setting(1e-2, "gaintopk: weight of the pull of the gains towards 1.", ge=0)

    def sae_overrides(self) -> dict:
        return {**super().sae_overrides(), "gain_decay": self.gain_decay}


def _settings(**kw) -> GainSettings:
    base = {"arch": NAME, "k": 4, "expansion": 4, "batch_size": 256, "tokens": 8192, "checkpoint_every": 8, "log_every": 4}
    base.update(kw)
    return GainSettings(**base)


def test_a_test_file_architecture_trains_resumes_saves_and_loads(tmp_path: Path) -> None:
    assert NAME in arch_names()
    x = _data()
    trainer = SaeTrainer(_settings(), {"h": 16}, tmp_path / "run", seed=1)
    logs = trainer.fit(_batches(x, 256))
    w_dec = trainer.states["h"].sae.W_dec.detach()  # before finalize() swaps in schedule-free's average
    assert torch.allclose(w_dec.norm(dim=1), torch.ones(64), atol=1e-4)  # unit_norm_decoder defaults to True
    gain_at_checkpoint = trainer.states["h"].sae.gain.detach().clone()
    sae = trainer.finalize()["h"]
    assert type(sae) is GainTopKSae and sae.cfg.options == {"gain_decay": 1e-2}
    assert logs["h"]["fvu"] < 0.5 and logs["h"]["l0"] <= 4 + 1e-6 and "gain_pull" in logs["h"]
    assert not torch.allclose(sae.gain.detach(), torch.ones(64))  # the extra parameter trained

    resumed = SaeTrainer(_settings(tokens=8192 + 1024), {"h": 16}, tmp_path / "run", seed=1)
    assert resumed.try_resume() and resumed.step == trainer.step
    torch.testing.assert_close(resumed.states["h"].sae.gain.detach(), gain_at_checkpoint)

    folder = save_sae(sae, tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "xsae_test_gaintopk" and cfg["xsae"]["arch"] == NAME
    from safetensors.torch import load_file

    assert set(load_file(folder / "sae_weights.safetensors")) == {"W_enc", "b_enc", "W_dec", "b_dec", "gain"}
    back = load_sae(folder)
    assert type(back) is GainTopKSae and back.cfg.k == 4 and back.cfg.options == {"gain_decay": 1e-2}
    torch.testing.assert_close(back(x[:64]), sae(x[:64]))
    torch.testing.assert_close(back.gain, sae.gain)


def test_a_test_file_architecture_is_a_peft_adapter(tmp_path: Path) -> None:
    from xsae_cli.sae import peft as xpeft

    cls = xpeft.GainTopKSaeConfig
    assert cls is xpeft.sae_adapter_config_class(NAME) and cls().arch == NAME and cls().k == 32
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    peft_model = xpeft.get_peft_sae_model(model, cls(k=2, num_latents=16, target_modules=["0"], init_seed=0))
    x = torch.randn(3, 8)
    sae = peft_model.get_saes()["0"]
    assert type(sae) is GainTopKSae
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), model[2](model[1](sae(model[0].base_layer(x)))))
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = xpeft.PeftSaeModel.from_pretrained(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), tmp_path / "adapter")
    assert isinstance(loaded.peft_config["default"], cls)
    torch.testing.assert_close(loaded.get_saes()["0"].gain, sae.gain)


def test_the_registry_validates_k_and_options_in_one_place() -> None:
    assert SaeTrainSettings(arch=NAME).arch == NAME  # the settings' --arch choices read the registry
    with pytest.raises(XsaeError, match="gaintopq"):
        SaeTrainSettings(arch="gaintopq")
    with pytest.raises(XsaeError, match=f"a {NAME} SAE needs k >= 1"):
        SaeConfig(arch=NAME, d_in=4, d_sae=8)
    with pytest.raises(XsaeError, match="k=9 is larger than d_sae=8"):
        SaeConfig(arch=NAME, d_in=4, d_sae=8, k=9)
    with pytest.raises(XsaeError, match="unknown option"):
        SaeConfig(arch=NAME, d_in=4, d_sae=8, k=2, options={"gain_decy": 1.0})
    with pytest.raises(XsaeError, match="gain_decay must be a finite number >= 0"):
        SaeConfig.from_dict({"arch": NAME, "d_in": 4, "d_sae": 8, "k": 2, "gain_decay": -1.0})
    with pytest.raises(XsaeError, match="unknown SAE architecture 'nope'") as err:
        create_sae(SaeConfig(arch="nope", d_in=4, d_sae=8))
    assert NAME in err.value.one_line() and "relu" in err.value.one_line()


def test_registration_refuses_clashes() -> None:
    class Other(GainTopKSae):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_sae_class(NAME, Other)
    with pytest.raises(ValueError, match="already read as"):
        register_sae_class("other", Other, saelens="standard")
    with pytest.raises(ValueError, match="SaeConfig fields already"):
        register_sae_class("other", Other, options={"l1_coefficient": 1.0})
    with pytest.raises(ValueError, match="neither SaeConfig fields nor its options"):
        register_sae_class("other", Other, coefficients=("l3_coefficient",))
    with pytest.raises(ValueError, match="clash with the base tensors"):
        register_sae_class("other", Other, tensors={"b_dec": ExtraTensor()})
    assert "other" not in arch_names()


def test_builtin_registrations_say_what_the_old_literal_tables_said() -> None:
    """The four built-ins declare exactly what formats.py, models.py and peft.py used to spell out."""
    builtin = {n: s for n, s in specs().items() if n in ("relu", "topk", "batchtopk", "jumprelu")}
    assert {n: s.saelens for n, s in builtin.items()} == {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
    assert {n: s.saelens_read for n, s in builtin.items()} == {"relu": ("standard",), "topk": ("topk",), "jumprelu": ("jumprelu",), "batchtopk": ("batchtopk",)}
    assert {n for n, s in builtin.items() if s.uses_k} == {"topk", "batchtopk"}
    assert {n for n, s in builtin.items() if s.bf16_selection} == {"topk", "batchtopk"}
    assert {n for n, s in builtin.items() if not s.unit_norm_decoder} == {"relu"}
    assert {n: s.sparsify for n, s in builtin.items() if s.sparsify} == {"topk": "topk"}
    assert {n: {t: e.kind for t, e in s.tensors.items()} for n, s in builtin.items()} == {
        "relu": {},
        "topk": {},
        "jumprelu": {"threshold": "parameter"},
        "batchtopk": {"threshold": "buffer"},
    }
    assert get_arch("relu").coefficients == ("l1_coefficient",) and get_arch("jumprelu").coefficients == ("l0_coefficient",)
    jump = create_sae(SaeConfig(arch="jumprelu", d_in=4, d_sae=8, jumprelu_init_threshold=0.25))
    assert torch.equal(jump.threshold.detach(), torch.full((8,), 0.25)) and "threshold" in dict(jump.named_parameters())
    btk = create_sae(SaeConfig(arch="batchtopk", d_in=4, d_sae=8, k=2))
    assert "threshold" in dict(btk.named_buffers()) and "threshold" not in dict(btk.named_parameters())


def test_a_parameter_the_registration_does_not_declare_is_named_at_load(tmp_path: Path) -> None:
    class Undeclared(GainTopKSae):
        def __init__(self, cfg: SaeConfig, generator: torch.Generator | None = None) -> None:
            super().__init__(cfg, generator)
            self.bias2 = nn.Parameter(torch.zeros(int(cfg.d_sae)))

    register_sae_class("undeclared", Undeclared, uses_k=True, options={"gain_decay": 0.0}, tensors={"gain": ExtraTensor("parameter", init=1.0)})
    try:
        folder = save_sae(create_sae(SaeConfig(arch="undeclared", d_in=4, d_sae=8, k=2)), tmp_path / "u")
        with pytest.raises(XsaeError, match="lacks bias2 for a undeclared SAE.*declare it"):
            load_sae(folder)
    finally:
        unregister_sae_class("undeclared")
