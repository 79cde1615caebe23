"""Dispatch for the steering engine: ONE hook object per steered module, and the context that says who steers a call.

- `CURRENT` (a `contextvars.ContextVar`) holds the `Frame` of the running thread/task: module -> request-scoped
  handle (sites) and module -> handles with per-call callbacks.
- `Dispatcher` (one per module, kept in `DISPATCHERS`) holds the module's model-wide handle and installs the
  `Hook` (a forward hook, and a forward pre-hook when a callback needs it) while any binding uses the module.
- Deep copies share the hook object, which ignores them (dispatch is by module identity) and removes itself (and
  only itself: a copy steered in its own right keeps its own dispatcher) from a copy at the copy's first call or when
  the original's last binding leaves, with the compile marker the copy inherited. A pickled hook is a
  standard-library no-op; binding a module drops the no-ops an earlier pickle left there, so they never pile up.

Internal to `actsteer.core.engine`; hosts use `bind`/`attach`/`steer` and `SteeringHandle`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import types
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.torch_version import TorchVersion

if TYPE_CHECKING:
    from .engine import SteeringHandle


logger = logging.getLogger(__name__)


class Frame:
    """The request-scoped steering of one context: module -> handle (sites), module -> handles (callbacks)."""

    __slots__ = ("sites", "calls")

    def __init__(self, sites: dict | None = None, calls: dict | None = None) -> None:
        self.sites: dict[torch.nn.Module, SteeringHandle] = sites or {}
        self.calls: dict[torch.nn.Module, tuple[SteeringHandle, ...]] = calls or {}


EMPTY = Frame()
CURRENT: contextvars.ContextVar[Frame] = contextvars.ContextVar("actsteer_steering", default=EMPTY)
# torch.compile traces ``ContextVar.get`` (guarding on what it returns) from torch 2.14 on; before, every read of
# CURRENT in a compiled model breaks the graph there (`current`)
_TRACES_CONTEXTVARS = TorchVersion(torch.__version__) >= "2.14"
_WARNED: list[bool] = [False]
# Per context: a handle's key -> ids of its modules paused for the calls made there (`SteeringHandle.set_active`
# with ``under``: a pipeline call's step window). Copied on write, never changed in place.
PAUSED: contextvars.ContextVar[dict[object, frozenset[int]]] = contextvars.ContextVar("actsteer_paused", default={})
LOCK = threading.RLock()  # guards dispatcher installation and model-wide bindings


def read(var: contextvars.ContextVar[Any]) -> Any:
    """``var.get()`` on the per-call path (`CURRENT`, `PAUSED`).

    Read only where a binding may need it (a model steered only model-wide, without step windows, never reads a
    context variable). Under torch.compile on a torch before 2.14, whose dynamo cannot trace ``ContextVar.get``,
    this read breaks the compiled graph at every steered module: outputs stay right, the speed-up is lost; a
    warning says so once.
    """
    if not _TRACES_CONTEXTVARS and torch.compiler.is_compiling():
        _warn_graph_breaks()
    return var.get()


def _warn_graph_breaks() -> None:
    if not _WARNED[0]:
        _WARNED[0] = True
        logger.warning(
            "actsteer: steering that depends on the calling thread or task (steer(), generate(steering=...), "
            "pipeline step windows) of a torch.compile'd model needs torch >= 2.14 to compile whole: torch %s "
            "cannot trace ContextVar.get, so every steered module breaks the graph (outputs are still right, the "
            "compiled speed-up is lost). Upgrade torch, or steer compiled models model-wide with attach() and no "
            "step window, which compiles whole on this torch.", torch.__version__,
        )


class Hook:
    """The object registered in a module's hook dict; calls back into its `Dispatcher` for that module only."""

    __slots__ = ("dispatcher", "pre", "__weakref__")

    def __init__(self, dispatcher: Dispatcher, pre: bool) -> None:
        self.dispatcher = dispatcher
        self.pre = pre

    def __call__(self, module: torch.nn.Module, args: Any, third: Any) -> Any:
        d = self.dispatcher
        if module is not d.module_ref():  # a deep copy of the module: never steered, clean it up
            d.forget_copy(module)
            return None
        return d.before(module, args, third) if self.pre else d.after(module, third)

    def __deepcopy__(self, memo: dict) -> Hook:
        copy = memo.get(id(self.dispatcher.module_ref()))
        if isinstance(copy, torch.nn.Module):
            self.dispatcher.copies.add(copy)
        return self

    def __reduce__(self) -> tuple:
        # pickled as a no-op hook from the standard library (``nullcontext().__exit__`` returns None for any
        # arguments): the file holds no actsteer state and loads without actsteer
        return (getattr, (contextlib.nullcontext(), "__exit__"))


class Dispatcher:
    """The one dispatcher of one module: its model-wide handle, and the hooks while any binding needs them."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module_ref = weakref.ref(module)
        self.model_handle: SteeringHandle | None = None  # model-wide handle steering this module's output
        self.model_calls: tuple[SteeringHandle, ...] = ()  # model-wide handles with a per-call callback here
        self.users = {"site": 0, "call": 0}
        self.requests = 0  # request-scoped bindings (sites or callbacks) of this module, in any context
        self.handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self.copies: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self.marker: Callable[..., Any] | None = None  # see _mark_for_compile

    def after(self, module: torch.nn.Module, output: Any) -> Any:
        out = output
        handle = self.model_handle
        if handle is not None:
            out = handle._run(module, out)
        if self.requests:  # else no context can hold a binding of this module: never read it (see `read`)
            handle = read(CURRENT).sites.get(module)
            if handle is not None:
                handle.seen = True  # its binding saw a call (`SteeringHandle.close_request`)
                out = handle._run(module, out)
        return None if out is output else out

    def before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        for handle in self.model_calls + (read(CURRENT).calls.get(module, ()) if self.requests else ()):
            handle._before(module, args, kwargs)

    def acquire(self, kind: str, *, request: bool = False) -> None:
        self.requests += request
        module = self.module_ref()
        if self.users[kind] == 0:
            if not self.handles:
                _drop_pickled(module)
                self.marker = _mark_for_compile(module)
            if kind == "site":
                self.handles[kind] = module.register_forward_hook(Hook(self, pre=False))
            else:
                self.handles[kind] = module.register_forward_pre_hook(Hook(self, pre=True), with_kwargs=True)
        self.users[kind] += 1

    def release(self, kind: str, *, request: bool = False) -> None:
        self.requests -= request
        self.users[kind] -= 1
        if self.users[kind] == 0:
            hook_id = self.handles.pop(kind).id
            module = self.module_ref()
            if module is not None:
                _drop(module, hook_id)
            for copy in list(self.copies):
                _drop(copy, hook_id)
            if not self.handles:
                for copy in list(self.copies):
                    _forget_marker(copy)
                self.copies.clear()
                if module is not None and module.__dict__.get("forward") is self.marker is not None:
                    del module.__dict__["forward"]
                self.marker = None

    def forget_copy(self, copy: torch.nn.Module) -> None:
        """Remove this dispatcher's hooks (only these) and the compile marker it left from a deep copy of its module.

        The copy may be steered in its own right (its own `Dispatcher`, whose hooks and marker stay)."""
        for hook_id in [i for i, h in (*copy._forward_hooks.items(), *copy._forward_pre_hooks.items())
                        if isinstance(h, Hook) and h.dispatcher is self]:
            _drop(copy, hook_id)
        self.copies.discard(copy)
        _forget_marker(copy)


def _mark_for_compile(module: torch.nn.Module) -> Callable[..., Any] | None:
    """Put the class's own ``forward``, bound to ``module``, in its instance dict while a dispatcher is installed.

    Calls behave exactly as before; the point is torch.compile: dynamo does not guard on a module's EMPTY hook dicts
    (``torch._dynamo.config.skip_nnmodule_hook_guards``), so a graph compiled before steering began would keep
    running without the dispatcher, silently unsteered. Dynamo does guard that no instance ``forward`` exists; this
    marker fails that guard, so the graph is recompiled once with the dispatcher traced (then cached). A module that
    already has another instance ``forward`` (e.g. from accelerate) is left alone.
    """
    if "forward" in module.__dict__ and not _is_marker(module):
        return None
    marker = module.__dict__["forward"] = types.MethodType(type(module).forward, module)
    return marker


def _is_marker(module: torch.nn.Module) -> bool:
    """True when ``module``'s instance ``forward`` is its class's own, bound to it (a marker, maybe one that a deep
    copy or a pickle of a steered model carried over)."""
    f = module.__dict__.get("forward")
    return isinstance(f, types.MethodType) and f.__self__ is module and f.__func__ is type(module).forward


def _forget_marker(copy: torch.nn.Module) -> None:
    """Delete the compile marker a deep copy inherited, unless the copy's own dispatcher put one there since."""
    own = DISPATCHERS.get(copy)
    if _is_marker(copy) and (own is None or own.marker is not copy.__dict__["forward"]):
        del copy.__dict__["forward"]


def _is_pickled(hook: object) -> bool:
    """True for what `Hook.__reduce__` unpickles to: ``nullcontext().__exit__``, a standard-library no-op."""
    return (isinstance(hook, types.MethodType) and isinstance(hook.__self__, contextlib.nullcontext)
            and hook.__func__ is contextlib.nullcontext.__exit__)


def _drop_pickled(module: torch.nn.Module) -> None:
    """Remove the no-op hooks that a pickle of a steered model left on ``module``."""
    for hook_id in [i for i, h in (*module._forward_hooks.items(), *module._forward_pre_hooks.items()) if _is_pickled(h)]:
        _drop(module, hook_id)


def _drop(module: torch.nn.Module, hook_id: int) -> None:
    for d in (module._forward_hooks, module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs):
        d.pop(hook_id, None)


DISPATCHERS: weakref.WeakKeyDictionary[torch.nn.Module, Dispatcher] = weakref.WeakKeyDictionary()


def dispatcher_of(module: torch.nn.Module) -> Dispatcher:
    d = DISPATCHERS.get(module)
    if d is None:
        d = DISPATCHERS[module] = Dispatcher(module)
    return d
