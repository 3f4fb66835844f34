"""Downstream metrics: a perfect reconstruction recovers all CE loss, zero-ablation none."""

import torch

from xsae_cli.sae.evaluate import downstream_metrics


class _Identity(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()


def test_identity_splice_recovers_everything_and_zero_ablation_hurts() -> None:
    model = _model()
    ids = torch.randint(1, 50, (4, 16))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    m = downstream_metrics(model, "transformer.h.0", _Identity(16), ids, special)
    assert m is not None
    assert abs(m["ce_spliced"] - m["ce_clean"]) < 1e-5 and m["kl"] < 1e-6
    assert abs(m["ce_loss_recovered"] - 1.0) < 1e-4
    assert m["ce_zero"] != m["ce_clean"]
    assert m["tokens"] == 4 * 14  # predictions from and of the special BOS position are not scored


def test_bad_reconstruction_recovers_less() -> None:
    model = _model()
    ids = torch.randint(1, 50, (4, 16))
    special = torch.zeros_like(ids, dtype=torch.bool)
    noisy = _Identity(16)
    with torch.no_grad():
        noisy.scale.fill_(0.3)
    m = downstream_metrics(model, "transformer.h.0", noisy, ids, special)
    assert m["kl"] > 1e-5 and abs(m["ce_spliced"] - m["ce_clean"]) > 1e-6


def test_encoder_without_lm_head_gives_none() -> None:
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).eval()
    ids = torch.randint(1, 50, (2, 8))
    assert downstream_metrics(model, "encoder.layer.0", _Identity(16), ids, torch.zeros_like(ids, dtype=torch.bool)) is None
