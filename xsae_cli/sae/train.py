"""Train one or several SAEs over a stream of activation batches.

A compact trainer in the spirit of sparsify's: Adam with linear warm-up and a linear decay over
the last part of the run, dead-latent tracking by tokens since last fired (feeding AuxK), decoder
rows kept unit-norm where the architecture asks, numbered checkpoints holding everything a resume
needs (SAE weights, optimizer state, counters) in safetensors + JSON. Several hooks train in one
pass over the same batches. In a multi-process launch (accelerate / torchrun) every rank reads
its own slice of batches and gradients are averaged with one all-reduce per step.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from xsae_cli.core.console import info, progress
from xsae_cli.core.errors import Interrupted, XsaeError
from xsae_cli.core.io import Checkpoints
from xsae_cli.sae.metrics import FiringTracker
from xsae_cli.sae.models import SaeConfig, SparseAutoencoder, create_sae
from xsae_cli.sae.registry import get_arch
from xsae_cli.sae.settings import OPTIMIZERS, SaeTrainSettings

Batches = Callable[[int], Iterator[dict[str, torch.Tensor]]]  # skip_tokens -> batches


def total_steps(settings: SaeTrainSettings) -> int:
    return max(1, math.ceil(settings.tokens / settings.batch_size))


def sae_config_for(settings: SaeTrainSettings, d_in: int, metadata: dict[str, Any]) -> SaeConfig:
    """The SAE that ``settings`` train on inputs of width ``d_in`` (``metadata`` goes into cfg.json)."""
    d_sae = settings.d_sae or d_in * settings.expansion
    k = settings.k if get_arch(settings.arch).uses_k else None
    if k is not None and k > d_sae:
        raise XsaeError(f"k={k} is larger than d_sae={d_sae} (d_in {d_in} x expansion {settings.expansion})", "lower --k or raise --expansion / --d-sae")
    # from_dict: the architecture's own options may come flat among the overrides
    return SaeConfig.from_dict({"arch": settings.arch, "d_in": d_in, "d_sae": d_sae, "k": k, "metadata": dict(metadata), **settings.sae_overrides()})


class SignSGD(torch.optim.Optimizer):
    """Steps by the sign of the gradient (sparsify's base optimizer under its schedule-free wrapper)."""

    def __init__(self, params: Any, lr: float = 1e-3) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]  # torch's stub returns the closure's loss; this optimizer takes none
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def base_lr(settings: SaeTrainSettings, d_sae: int) -> float:
    if settings.lr is not None:
        return settings.lr
    return 5e-3 / (d_sae / 2**14) ** 0.5 if settings.optimizer == "signum" else 3e-4


def make_optimizer(settings: SaeTrainSettings, params: Any, lr: float) -> Any:
    """Adam, or schedule-free signum: the weights the run ends with are the schedule-free average."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=settings.betas)
    if settings.optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper

        opt = ScheduleFreeWrapper(SignSGD(params, lr=lr), momentum=0.95)
        opt.train()  # before any state is loaded: train() on a resumed state would move the weights
        return opt
    raise XsaeError(f"unknown optimizer '{settings.optimizer}'", f"use one of {', '.join(OPTIMIZERS)}")


def lr_factor(step: int, settings: SaeTrainSettings) -> float:
    """Linear warm-up, flat, then (Adam) linear decay to zero: robust for short and long runs alike.

    Schedule-free signum needs no decay: its averaging plays that part.
    """
    total = total_steps(settings)
    warm = max(1, int(total * settings.warmup_fraction))
    if step < warm:
        return (step + 1) / warm
    decay_start = int(total * (1 - settings.decay_fraction))
    if settings.optimizer == "adam" and settings.decay_fraction > 0 and step >= decay_start:
        return max(0.0, (total - step) / max(1, total - decay_start))
    return 1.0


@dataclass
class HookState:
    sae: SparseAutoencoder
    optimizer: Any
    lr: float
    firing: FiringTracker  # tokens since each latent last fired
    zero: Any = None  # a ZeroSae once DeepSpeed has taken the SAE over


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SaeTrainer:
    """Trains one SAE per hook on shared batches, with checkpoints that resume exactly."""

    def __init__(
        self,
        settings: SaeTrainSettings,
        d_in: dict[str, int],
        run_dir: Path,
        *,
        seed: int = 0,
        deepspeed_config: str | None = None,
        metadata: dict[str, dict[str, Any]] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.settings = settings
        self.seed = int(seed)
        self.deepspeed_config = deepspeed_config or None
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.hooks = list(d_in)
        self.rank, self.world = _dist()
        self.checkpoints = Checkpoints(self.run_dir, keep=settings.keep_checkpoints)
        self.zero_config: dict[str, Any] | None = None
        if self.deepspeed_config:
            from xsae_cli.sae.zero import zero_config_for

            self.zero_config = zero_config_for(self.deepspeed_config, settings.optimizer)
        self.states: dict[str, HookState] = {}
        for i, hook in enumerate(self.hooks):
            cfg = sae_config_for(settings, d_in[hook], (metadata or {}).get(hook, {"hook_name": hook}))
            sae = create_sae(cfg, device=self.device, seed=self.seed + i)
            lr = base_lr(settings, cfg.d_sae)
            opt = make_optimizer(settings, sae.parameters(), lr)
            self.states[hook] = HookState(sae, opt, lr, FiringTracker(cfg.d_sae, device=self.device))
        self.step = 0
        self.tokens = 0
        self.initialised = False
        self.log_path = self.run_dir / "train_log.jsonl"
        self.tracker: Any = None
        # A streaming source's position in this rank's shard (every rank's goes into the checkpoint).
        self.stream_position: Any = None

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs. Under ZeRO every rank must call it (the full state is gathered)."""
        state: dict[str, Any] = {}
        for hook, st in self.states.items():
            if st.zero is not None:
                weights, optim = st.zero.full_state()
                state[hook] = {"sae": weights, "optimizer": optim, "firing": st.firing.state_dict()}
            else:
                state[hook] = {"sae": st.sae.state_dict(), "optimizer": st.optimizer.state_dict(), "firing": st.firing.state_dict()}
        return state

    def save_checkpoint(self, *, collective: bool = True) -> Path | None:
        positions = None
        if self.stream_position is not None:
            positions = [self.stream_position()]
            if self.world > 1 and collective:  # every rank calls this at the same steps
                positions = [None] * self.world
                torch.distributed.all_gather_object(positions, self.stream_position())
        if self.rank != 0 and self.zero_config is None:
            return None
        state = self.state_dict()
        if self.rank != 0:
            return None
        meta = {
            "tokens": self.tokens,
            "hooks": self.hooks,
            "settings": _jsonable(asdict(self.settings)),
            "seed": self.seed,
            "configs": {h: st.sae.cfg.to_dict() for h, st in self.states.items()},
            "decoder_weight_norm": {h: st.sae.decoder_weight_norm for h, st in self.states.items()},
            "world_size": self.world,
        }
        if positions is not None:
            meta["stream_positions"] = positions
        return self.checkpoints.save(self.step, state, meta)

    def _ensure_engines(self) -> None:
        """Hand the SAEs to DeepSpeed, after their initialisation (ZeRO-3 partitions the weights)."""
        if self.zero_config is None or all(st.zero is not None for st in self.states.values()):
            return
        from xsae_cli.sae.zero import ZeroSae

        for st in self.states.values():
            st.zero = ZeroSae(st.sae, st.optimizer, self.zero_config)

    def _check_resume_settings(self, step: int, meta: dict[str, Any]) -> None:
        """Refuse a resume whose settings change the result (each field's ``resume`` policy); a grown
        budget (more tokens) is allowed, said, and recorded under ``resumes`` in run.json."""
        from xsae_cli.core.io import atomic_write_json, read_json
        from xsae_cli.core.settings import refuse_changed_resume, resume_changes

        refused, grown = resume_changes(meta.get("settings") or {}, self.settings)
        refuse_changed_resume(self.run_dir, refused, ["--tokens"])
        if grown and self.rank == 0:
            info("resuming with a larger budget: " + ", ".join(f"{k} {a:,} -> {b:,}" for k, (a, b) in grown.items()))
            run_json = self.run_dir / "run.json"
            if run_json.exists():
                desc = read_json(run_json, "run description")
                desc.setdefault("resumes", []).append({"step": step, "tokens": meta.get("tokens"), "grown": grown})
                atomic_write_json(run_json, desc)

    def try_resume(self) -> bool:
        latest = self.checkpoints.latest()
        if latest is None:
            return False
        step, state, meta = latest
        if sorted(meta.get("hooks", [])) != sorted(self.hooks):
            raise XsaeError(
                f"checkpoints in {self.run_dir} are for hooks {meta.get('hooks')}, not {self.hooks}",
                "use another --out, or pass --force to start over",
            )
        self._check_resume_settings(step, meta)
        for hook, st in self.states.items():
            saved = state[hook]
            cfg = meta["configs"][hook]
            if cfg["d_sae"] != st.sae.cfg.d_sae or cfg["arch"] != st.sae.cfg.arch:
                raise XsaeError(
                    f"checkpoint in {self.run_dir} is a {cfg['arch']} SAE with d_sae={cfg['d_sae']}, not {st.sae.cfg.arch} with d_sae={st.sae.cfg.d_sae}",
                    "use another --out, or pass --force to start over",
                )
            if cfg.get("norm_scaling_factor") is not None:
                st.sae.cfg.norm_scaling_factor = cfg["norm_scaling_factor"]
            st.sae.load_state_dict(saved["sae"])
            if meta.get("decoder_weight_norm", {}).get(hook) and self.zero_config is None:
                st.sae.set_decoder_norm_to_unit_norm()  # a ZeRO run's decoder, as its forward used it
            if self.zero_config is None:
                st.optimizer.load_state_dict(saved["optimizer"])
            st.firing.load_state_dict(saved["firing"])
        if self.zero_config is not None:
            self._ensure_engines()
            for hook, st in self.states.items():
                st.zero.load_full_state(state[hook]["optimizer"])
        self.step, self.tokens, self.initialised = step, int(meta["tokens"]), True
        return True

    # ------------------------------------------------------------------ training

    def _initialise(self, batch: dict[str, torch.Tensor]) -> None:
        """b_dec from the geometric median (or mean) and the normalisation scale, from a first batch."""
        for hook, st in self.states.items():
            x = batch[hook].to(self.device, torch.float32)
            st.sae.fit_normalization(x)
            st.sae.init_b_dec(x, method=self.settings.init_b_dec)
        if self.world > 1:  # every rank starts from rank 0's initialisation
            for st in self.states.values():
                for p in st.sae.parameters():
                    torch.distributed.broadcast(p.data, src=0)
        self.initialised = True

    def _check_finite(self, hook: str, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).any(dim=-1).sum())
            raise XsaeError(
                f"non-finite activations (NaN/Inf in {bad} tokens) at step {self.step} in hook {hook}",
                f"training stopped; the last good checkpoint in {self.checkpoints.root} is kept. Check the model's dtype (try --dtype float32) or drop outliers",
            )

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        if not self.initialised:
            self._initialise(batch)
        self._ensure_engines()
        factor = lr_factor(self.step, self.settings)
        logs: dict[str, dict[str, float]] = {}
        rows = int(next(iter(batch.values())).shape[0])
        if self.world > 1:  # batches can differ in size (the end of a pass): count the real total
            count = torch.tensor([rows], dtype=torch.long, device=self.device)
            torch.distributed.all_reduce(count)
            rows = int(count.item())
        for hook, st in self.states.items():
            x = batch[hook].to(self.device, torch.float32, non_blocking=True)
            self._check_finite(hook, x)
            dead_mask = st.firing.dead_mask(st.sae.cfg.dead_tokens_threshold)
            out = st.zero.training_forward(x, dead_mask) if st.zero is not None else st.sae.training_forward(x, dead_mask=dead_mask)
            if not torch.isfinite(out.loss):
                raise XsaeError(
                    f"the loss became non-finite at step {self.step} in hook {hook}",
                    f"training stopped; the last good checkpoint in {self.checkpoints.root} is kept. Lower --lr",
                )
            if st.zero is not None:  # DeepSpeed reduces (and partitions) the gradients and steps Adam
                for group in st.zero.param_groups:
                    group["lr"] = st.lr * factor
                st.zero.step(out.loss)
                self._after_update(hook, st, out, rows, factor, logs)
                continue
            st.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if self.world > 1:
                for p in st.sae.parameters():
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= self.world
            if st.sae.unit_norm_decoder:
                st.sae.remove_gradient_parallel_to_decoder_directions()
            for group in st.optimizer.param_groups:
                group["lr"] = st.lr * factor
            st.optimizer.step()
            if st.sae.unit_norm_decoder:
                st.sae.set_decoder_norm_to_unit_norm()
            self._after_update(hook, st, out, rows, factor, logs)
        self.step += 1
        self.tokens += rows
        return logs

    def _after_update(self, hook: str, st: HookState, out: Any, rows: int, factor: float, logs: dict[str, dict[str, float]]) -> None:
        fired = out.fired.to(self.device)
        if self.world > 1:
            torch.distributed.all_reduce(fired)
        st.firing.update(fired, rows)
        logs[hook] = {k: float(v) for k, v in out.terms.items()}
        logs[hook]["loss"] = float(out.loss.detach())
        logs[hook]["dead_pct"] = 100.0 * float(st.firing.dead_mask(st.sae.cfg.dead_tokens_threshold).float().mean())
        logs[hook]["lr"] = st.lr * factor

    def fit(self, batches: Batches, *, resume: bool = True) -> dict[str, Any]:
        """Train until ``settings.tokens`` tokens were seen; return the last logs per hook."""
        if resume and self.try_resume() and self.rank == 0:
            info(f"resuming from step {self.step} ({self.tokens:,} tokens) in {self.checkpoints.root}")
        self._start_tracker()
        total = self.settings.tokens
        last: dict[str, dict[str, float]] = {}
        start = time.perf_counter()
        start_tokens = self.tokens
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_fh = open(self.log_path, "a", encoding="utf-8") if self.rank == 0 else None
        crash_at = int(os.environ.get("XSAE_CRASH_AT_STEP", "0") or 0)
        try:
            with progress(disable=self.rank != 0) as bar:
                task = bar.add_task("training SAE" + ("s" if len(self.hooks) > 1 else ""), total=total, completed=self.tokens, unit="tokens")
                for batch in batches(self.tokens):
                    if self.tokens >= total:
                        break
                    last = self.train_step(batch)
                    bar.update(task, completed=min(self.tokens, total))
                    if self.step % self.settings.log_every == 0 or self.tokens >= total:
                        rate = (self.tokens - start_tokens) / max(1e-9, time.perf_counter() - start)
                        self._log(log_fh, last, rate)
                    if self.step % self.settings.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self.step == crash_at:  # fault injection for the crash-recovery tests
                        os.kill(os.getpid(), signal.SIGKILL)
        except KeyboardInterrupt:
            self.save_checkpoint(collective=False)
            raise Interrupted(f"at step {self.step}; checkpoint saved in {self.checkpoints.root}", "run the same command again to resume") from None
        finally:
            if log_fh:
                log_fh.close()
        if self.tokens < total:
            info(f"the activation stream ended after {self.tokens:,} of {total:,} tokens")
        self.save_checkpoint()
        seconds = time.perf_counter() - start
        self.seconds = seconds
        self.tokens_per_second = (self.tokens - start_tokens) / max(seconds, 1e-9)
        if self.tracker is not None:
            self.tracker.end_training()
        return last

    def _log(self, fh: Any, logs: dict[str, dict[str, float]], rate: float) -> None:
        if fh is None:
            return
        for hook, terms in logs.items():
            row = {"step": self.step, "tokens": self.tokens, "hook": hook, "tokens_per_s": rate, **terms}
            fh.write(json.dumps(row) + "\n")
        fh.flush()
        if self.tracker is not None:
            flat = {f"{h}/{k}": v for h, t in logs.items() for k, v in t.items()}
            self.tracker.log(flat, step=self.step)

    def _start_tracker(self) -> None:
        if not self.settings.log_with or self.rank != 0:
            return
        from accelerate import Accelerator
        from accelerate.utils import is_tensorboard_available, is_wandb_available

        available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
        if self.settings.log_with not in available:
            raise XsaeError(f"unknown tracker '{self.settings.log_with}'", f"use one of {', '.join(available)}")
        if not available[self.settings.log_with]():
            raise XsaeError(f"--log-with {self.settings.log_with} needs the {self.settings.log_with} package", f"pip install {self.settings.log_with}")
        acc = Accelerator(log_with=self.settings.log_with, project_dir=str(self.run_dir / "logs"), cpu=self.device.type == "cpu")
        acc.init_trackers("xsae-sae", config={k: v for k, v in _jsonable(asdict(self.settings)).items() if isinstance(v, (int, float, str, bool))})
        self.tracker = acc

    def saes(self) -> dict[str, SparseAutoencoder]:
        return {h: st.sae for h, st in self.states.items()}

    @torch.no_grad()
    def finalize(self) -> dict[str, SparseAutoencoder]:
        """The weights to keep: schedule-free optimizers hold their average apart until eval()."""
        if self.zero_config is not None:  # gather the partitions (every rank takes part) into plain SAEs
            saes = {}
            for hook, st in self.states.items():
                weights, _ = st.zero.full_state() if st.zero is not None else (st.sae.state_dict(), None)
                sae = create_sae(st.sae.cfg, device=self.device)
                sae.load_state_dict(weights)
                sae.decoder_weight_norm = st.sae.decoder_weight_norm
                sae.fold_decoder_weight_norm()
                saes[hook] = sae
            return saes
        for st in self.states.values():
            if hasattr(st.optimizer, "eval"):
                st.optimizer.eval()
        return self.saes()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
