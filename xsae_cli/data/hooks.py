"""The hidden state at a module's boundary: find it, replace it, capture it and stop the forward.

Every group hooks modules of models it does not know: a Llama decoder layer returns a tensor (or,
in older transformers, a tuple ``(hidden, attention weights, cache)``), a BERT encoder returns a
``ModelOutput``, an MLP returns a tensor, a custom model anything. One rule decides what "the hidden
state" of such a value is, for the activation store, the downstream splice, the PEFT tuner and the
restoration model alike, so a module that one of them can hook, all of them can:

- a tensor is the hidden state;
- a mapping (``ModelOutput`` is one): its ``last_hidden_state``, else its ``hidden_states`` when
  that is a tensor, else its first tensor value;
- a tuple or list (a namedtuple too): its first tensor item;
- a module's *input*: its first positional tensor, else the ``hidden_states`` keyword, else the
  first tensor keyword (decoder layers are called with ``hidden_states=`` in recent transformers).

:func:`replace_hidden` puts a new tensor back at the same place, keeping every other item.
:class:`HiddenCapture` records the hidden state of several modules in one forward and, with
``stop=True``, ends the forward right after the last of them ran: a layer-6 capture on a 30-layer
model does not pay for the other 24 layers or the LM head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import torch
from torch import nn
from typing_extensions import Self

from xsae_cli.core.errors import XsaeError

SITES = ("output", "input")

_WHOLE = object()  # the value is the tensor itself


def _slot(value: Any) -> Any:
    """Where the hidden state sits in ``value``: ``_WHOLE``, a key, an index, or None."""
    if isinstance(value, torch.Tensor):
        return _WHOLE
    if isinstance(value, Mapping):
        for key in ("last_hidden_state", "hidden_states"):
            if isinstance(value.get(key), torch.Tensor):
                return key
        return next((key for key, item in value.items() if isinstance(item, torch.Tensor)), None)
    if isinstance(value, (tuple, list)):
        return next((i for i, item in enumerate(value) if isinstance(item, torch.Tensor)), None)
    return None


def find_hidden(value: Any) -> torch.Tensor | None:
    """The hidden-state tensor of a module's output (see the module docstring), or None."""
    slot = _slot(value)
    if slot is None:
        return None
    return value if slot is _WHOLE else value[slot]


def hidden_of(value: Any, where: str = "the module", site: str = "output") -> torch.Tensor:
    """Like :func:`find_hidden`, but a value with no tensor is an error naming ``where``."""
    tensor = find_hidden(value)
    if tensor is None:
        raise XsaeError(
            f"{where} gives {type(value).__name__} with no tensor at its {site}",
            "hook a module that passes hidden states on (a block, an MLP, an attention module)",
        )
    return tensor


def replace_hidden(value: Any, new: torch.Tensor) -> Any:
    """``value`` with its hidden state replaced by ``new`` (a new container; ``value`` is unchanged)."""
    slot = _slot(value)
    if slot is None:
        raise XsaeError(f"cannot put a hidden state into a {type(value).__name__}: it holds no tensor", "hook a module whose output is a tensor, a tuple or a ModelOutput")
    if slot is _WHOLE:
        return new
    if isinstance(value, Mapping):
        merged = {**value, slot: new}
        try:
            return type(value)(**merged)  # ModelOutput, dict and dataclass-like mappings
        except TypeError:
            return merged
    items = list(value)
    items[slot] = new
    kind = type(value)
    return kind(items) if kind in (tuple, list) else kind(*items)  # namedtuples take fields


def input_hidden(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The hidden state among a module's call arguments: first positional tensor, else
    ``hidden_states=``, else the first tensor keyword."""
    for item in args:
        if isinstance(item, torch.Tensor):
            return item
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def replace_input_hidden(args: tuple, kwargs: dict[str, Any], new: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` with the tensor :func:`input_hidden` finds replaced by ``new``."""
    for i, item in enumerate(args):
        if isinstance(item, torch.Tensor):
            return (*args[:i], new, *args[i + 1 :]), kwargs
    key = "hidden_states" if isinstance(kwargs.get("hidden_states"), torch.Tensor) else next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
    if key is None:
        raise XsaeError("cannot replace the input hidden state: the module was called without a tensor", "hook the module's output instead")
    return args, {**kwargs, key: new}


def _check_site(site: str) -> str:
    if site not in SITES:
        raise XsaeError(f"unknown hook site '{site}'", "use 'output' or 'input'")
    return site


@contextmanager
def replacing(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], *, site: str = "output") -> Iterator[None]:
    """While open, ``module``'s hidden state (output or input) is replaced by ``fn(hidden)``."""
    if _check_site(site) == "output":

        def post(_m: nn.Module, _args: Any, output: Any) -> Any:
            return replace_hidden(output, fn(hidden_of(output)))

        handle = module.register_forward_hook(post)
    else:

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> Any:
            return replace_input_hidden(args, kwargs, fn(hidden_of(input_hidden(args, kwargs), site="input")))

        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class StopForward(Exception):
    """Raised by a :class:`HiddenCapture` hook to end a forward early; its own ``with`` swallows it."""

    def __init__(self, owner: HiddenCapture) -> None:
        super().__init__("forward stopped after the last hooked module")
        self.owner = owner


class HiddenCapture:
    """Hidden states of several modules from one forward pass, as ``capture.values[key]``.

    ``modules`` maps a key (what the caller calls the hook) to a module or its ``named_modules()``
    name in ``model``. Each module's first call is kept (a module run twice, e.g. a tied block,
    keeps its first value). With ``stop=True`` the forward ends as soon as every module ran: run it
    inside the ``with`` block, which swallows that stop (and only that one)::

        with HiddenCapture(model, {"l6": "model.layers.6"}) as cap, torch.inference_mode():
            model(input_ids=ids)
        acts = cap.values["l6"]

    A module that gives no tensor is an :class:`XsaeError` naming the key and the module; a module
    that never ran is simply missing from ``values`` (see :meth:`missing`).
    """

    def __init__(self, model: nn.Module, modules: Mapping[str, str | nn.Module], *, site: str = "output", stop: bool = True) -> None:
        self.model = model
        self.site = _check_site(site)
        self.stop = stop
        self.modules = {key: model.get_submodule(m) if isinstance(m, str) else m for key, m in modules.items()}
        self.names = {key: m if isinstance(m, str) else key for key, m in modules.items()}
        self.values: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def missing(self) -> list[str]:
        """Keys whose module did not run in the forward."""
        return [key for key in self.modules if key not in self.values]

    def _keep(self, key: str, value: Any) -> None:
        if key in self.values:
            return
        name = self.names[key]
        where = f"hook {key}" if name == key else f"hook {key} ({name})"
        self.values[key] = hidden_of(value, where, self.site)
        if self.stop and len(self.values) == len(self.modules):
            raise StopForward(self)

    def __enter__(self) -> Self:
        self.values = {}
        for key, module in self.modules.items():
            if self.site == "output":
                self._handles.append(module.register_forward_hook(lambda _m, _a, out, k=key: self._keep(k, out)))
            else:

                def pre(_m: nn.Module, args: tuple, kwargs: dict, k: str = key) -> None:
                    found = input_hidden(args, kwargs)
                    self._keep(k, found if found is not None else (args, kwargs))

                self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return isinstance(exc, StopForward) and exc.owner is self
