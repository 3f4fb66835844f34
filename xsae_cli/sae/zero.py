"""DeepSpeed ZeRO-1/2/3 for SAE training, with checkpoints that do not depend on the world size.

ZeRO splits the Adam moments (stage 1), the gradients (2) and the weights themselves (3) across
ranks, which is what lets SAEs with millions of latents train where one GPU could not hold the
optimizer state. DeepSpeed's own ``save_checkpoint`` writes one pickle per rank that only resumes
on the same world size; xsae instead gathers every tensor in full (DeepSpeed's tensor-fragment
API: ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``) and writes the same
safetensors checkpoint a single-process run writes, in torch Adam's layout. A ZeRO run can
therefore resume on another number of GPUs, or without DeepSpeed on a laptop, and vice versa.

Two things change under ZeRO. The optimizer keeps its own fp32 copy of the weights, so decoder
rows cannot be renormalised after each step: the forward divides by the row norms instead
(``SparseAutoencoder.decoder_weight_norm``), which removes the radial part of the gradient by
construction, and the norms are folded into ``W_dec`` when the run ends. And the optimizer is
torch's Adam handed to DeepSpeed (a schedule-free wrapper would swap weights that DeepSpeed
owns), so ``--optimizer signum`` is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from xsae_cli.core.console import warn
from xsae_cli.core.errors import XsaeError
from xsae_cli.sae.models import SparseAutoencoder, TrainOutput

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def load_zero_config(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON config and adapt it to the SAE trainer, which drives its own batches."""
    p = Path(path)
    if not p.is_file():
        raise XsaeError(f"DeepSpeed config {p} does not exist", "pass a JSON file, e.g. recipes/deepspeed/zero2.json")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise XsaeError(f"DeepSpeed config {p} is not valid JSON (line {exc.lineno}: {exc.msg})", "fix the file; see recipes/deepspeed/") from None
    if not isinstance(cfg, dict):
        raise XsaeError(f"DeepSpeed config {p} must hold a JSON object", "see recipes/deepspeed/zero2.json")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise XsaeError(f"DeepSpeed config {p} has zero_optimization.stage={stage!r}", "use stage 1, 2 or 3 (or drop --deepspeed-config for plain data parallel)")
    for key in ("fp16", "bf16"):
        if cfg.get(key, {}).get("enabled") in (True, "auto"):
            raise XsaeError(
                f"DeepSpeed config {p} enables {key}: xsae keeps SAE weights and Adam state in float32",
                f"remove the {key} section (the encoder matmul already runs in bf16 where the hardware makes that faster)",
            )
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            warn(f"ignoring the '{key}' section of {p}: xsae sets Adam and its learning-rate schedule (--lr)")
            cfg.pop(key)
    # One trainer step is one engine step; the batch size is xsae's --batch-size (tokens), not DeepSpeed's.
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        cfg.pop(key, None)
    cfg["train_micro_batch_size_per_gpu"] = 1
    cfg["gradient_accumulation_steps"] = 1
    cfg["zero_allow_untested_optimizer"] = True
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def zero_config_for(path: str | Path, optimizer: str) -> dict[str, Any]:
    """The engine config for a run, refusing what ZeRO cannot train; cheap, so runs check it first."""
    if optimizer != "adam":
        raise XsaeError(
            f"DeepSpeed ZeRO trains with Adam, not '{optimizer}'",
            "add --optimizer adam (schedule-free signum would swap weights that DeepSpeed owns)",
        )
    return load_zero_config(path)


def zero_stage(cfg: dict[str, Any]) -> int:
    return int(cfg["zero_optimization"]["stage"])


class ZeroSae:
    """One SAE under a DeepSpeed engine: forward, backward + step, and full-state gather/scatter."""

    def __init__(self, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> None:
        import deepspeed

        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            _init_single_process()
        if sae.unit_norm_decoder:
            sae.decoder_weight_norm = True
        self.sae = sae
        self.names = [n for n, _ in sae.named_parameters()]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=sae, optimizer=optimizer, config=dict(config))

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def training_forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None) -> TrainOutput:
        loss, x_hat, fired, terms = self.engine(x, dead_mask, train_step=True)
        return TrainOutput(x_hat=x_hat, loss=loss, terms=terms, fired=fired)

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def _params(self) -> list[torch.nn.Parameter]:
        named = dict(self.engine.module.named_parameters())
        return [named[n] for n in self.names]

    def _base_state(self) -> dict[Any, dict[str, Any]]:
        base = getattr(self.optimizer, "optimizer", self.optimizer)
        return base.state

    def full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Full fp32 weights and Adam state (torch Adam's ``state_dict`` layout). Collective: every rank calls it."""
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_optimizer_state,
        )

        weights: dict[str, torch.Tensor] = {}
        state: dict[int, dict[str, torch.Tensor]] = {}
        steps = [v.get("step") for v in self._base_state().values() if "step" in v]
        step = steps[0].detach().clone().cpu() if steps and torch.is_tensor(steps[0]) else torch.tensor(float(steps[0] or 0) if steps else 0.0)
        for i, (name, p) in enumerate(zip(self.names, self._params())):
            weights[name] = safe_get_full_fp32_param(p).detach().cpu().clone()
            moments = {key: safe_get_full_optimizer_state(p, key) for key in ADAM_KEYS}
            if all(m is not None for m in moments.values()):
                state[i] = {"step": step.clone(), **{k: m.detach().cpu().clone() for k, m in moments.items()}}
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": list(range(len(self.names)))} for g in self.param_groups[:1]]
        return weights, {"state": state, "param_groups": groups}

    def _ensure_state(self) -> None:
        """Zero Adam moments for every partition: DeepSpeed creates them only at the first step."""
        base = getattr(self.optimizer, "optimizer", self.optimizer)
        # Stage 3 keys the state by its flat fp32 partitions and swaps them into the groups per step.
        flat = getattr(self.optimizer, "fp32_partitioned_groups_flat", None)
        params = list(flat) if flat else [p for group in base.param_groups for p in group["params"]]
        for p in params:
            if not base.state[p]:
                base.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def load_full_state(self, optimizer_state: dict[str, Any]) -> None:
        """Scatter a full Adam state (from any world size, or a single-process run) into the partitions."""
        from deepspeed.utils import safe_set_full_optimizer_state

        saved = optimizer_state.get("state", {})
        if not saved:
            return
        self._ensure_state()
        if "exp_avg" not in next(iter(saved.values())):
            raise XsaeError("the checkpoint holds no Adam moments (it was trained with another optimizer)", "resume with the optimizer the run started with, or pass --force")
        for i, p in enumerate(self._params()):
            entry = saved.get(i, saved.get(str(i)))
            if entry is None:
                continue
            for key in ADAM_KEYS:
                safe_set_full_optimizer_state(p, entry[key].to(torch.float32), key)
        step = next(iter(saved.values()))["step"]
        for v in self._base_state().values():
            if "step" in v:
                v["step"] = step.clone() if torch.is_tensor(v["step"]) else float(step)
        groups = optimizer_state.get("param_groups") or []
        for g, s in zip(self.param_groups, groups):
            for k, v in s.items():
                if k != "params" and k in g:
                    g[k] = v


def _init_single_process() -> None:
    """A one-process group, so ZeRO also runs without a launcher (one GPU, or a test)."""
    import os
    import socket

    import deepspeed

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
