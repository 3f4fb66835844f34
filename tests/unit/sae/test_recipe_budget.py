"""Each GPU recipe's header states its GPU memory per rank and disk, as recipe_budget computes them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from xsae_cli.sae.budget import budget_line, recipe_budget

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
# The models' parameter counts and hooked widths (the recipes' defaults)
MODELS = {"mistralai/Mistral-7B-v0.1": (7.24e9, 4096), "Qwen/Qwen2-72B": (72.7e9, 8192)}
MODES = {
    "sae_7b_ddp.sh": {},
    "sae_7b_zero2.sh": {"zero_stage": 2},
    "sae_72b_zero3_8gpu.sh": {"zero_stage": 3, "streaming": False, "model_split": True},
}


def _default(text: str, name: str) -> str:
    match = re.search(rf"^{name}=\$\{{{name}:-([^}}]+)\}}", text, re.M)
    assert match, name
    return match.group(1)


@pytest.mark.parametrize("script", sorted(MODES))
def test_the_recipe_header_states_the_formulas_budget(script: str) -> None:
    from xsae_cli.sae.settings import parse_tokens

    text = (RECIPES / script).read_text()
    params, d_in = MODELS[_default(text, "MODEL")]
    budget = recipe_budget(
        params=params,
        model_bytes=2,
        d_in=d_in,
        expansion=int(_default(text, "EXPANSION")),
        batch=int(_default(text, "BATCH")),
        tokens=parse_tokens(_default(text, "TOKENS")),
        world=int(_default(text, "GPUS")),
        optimizer_states=2 if "--optimizer adam" in text else 1,
        **MODES[script],
    )
    assert budget_line(budget) in text.splitlines()


def test_zero_stages_split_what_they_promise() -> None:
    base = {"params": 1e9, "model_bytes": 2, "d_in": 1024, "expansion": 8, "batch": 1024, "tokens": 10**6, "world": 4, "optimizer_states": 2}
    ddp, z1, z2, z3 = (recipe_budget(**base, zero_stage=s) for s in range(4))
    w = (2 * 1024 * 8192 + 8192 + 1024) * 4
    assert ddp.sae == 4 * w and z1.sae == 2 * w + 2 * w // 4 and z2.sae == w + w // 4 + 2 * w // 4 and z3.sae == w // 4 + w // 4 + 2 * w // 4
    assert recipe_budget(**base, streaming=False, cache_item_bytes=4).disk == 10**6 * 1024 * 4 + 16 * 512
    assert recipe_budget(**base).disk == 0 and recipe_budget(**base, model_split=True).model == 5 * 10**8
