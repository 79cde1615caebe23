"""Generators that stream steered output: `keep_context` runs every pull of a generator in ONE context.

Request-scoped steering (`actsteer.steer`) lives in a `contextvars.ContextVar`. A generator has no context of its
own: each ``next()`` runs in the context of whoever pulls it. Servers pull a streamed response's generator item by
item in fresh contexts (Starlette's ``StreamingResponse`` runs each ``next()`` of a plain generator in a thread
pool, each in a new copy of the request's context; ``asyncio.wait_for(agen.__anext__(), t)`` runs each step in a
new task), so a ``with steer(...)`` opened inside the generator holds for its first item only. `keep_context` gives
the generator one context for all its items, wherever they are pulled.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Generator, Iterable, Iterator
from typing import Any, TypeVar, overload

T = TypeVar("T")


@overload
def keep_context(items: AsyncIterable[T]) -> AsyncIterator[T]: ...
@overload
def keep_context(items: Iterable[T]) -> Iterator[T]: ...


def keep_context(items: Iterable[T] | AsyncIterable[T]) -> Iterator[T] | AsyncIterator[T]:
    """``items`` (a generator or async generator) pulled in one context of its own, a copy of the caller's.

    Wrap a streamed response's generator with it when the generator opens ``with actsteer.steer(...)`` (or sets
    any context variable) and a server pulls its items one by one: every item is then steered, not only the first.
    Closing the wrapper closes the generator in the same context (its ``with`` blocks exit there).

    Example:
        >>> import contextvars
        >>> var = contextvars.ContextVar("var", default="unset")
        >>> def numbers():
        ...     var.set("set by the first item")
        ...     for i in range(3):
        ...         yield f"{i}: {var.get()}"
        >>> stream = numbers()
        >>> [contextvars.copy_context().run(next, stream) for _ in range(2)]  # each pull in a fresh context
        ['0: set by the first item', '1: unset']
        >>> stream = keep_context(numbers())
        >>> [contextvars.copy_context().run(next, stream) for _ in range(3)]
        ['0: set by the first item', '1: set by the first item', '2: set by the first item']
    """
    ctx = contextvars.copy_context()
    if hasattr(items, "__aiter__"):
        return _keep_async(aiter(items), ctx)
    if not hasattr(items, "__iter__"):
        raise TypeError(f"keep_context() takes a generator or an async generator, got {type(items).__name__}")
    return _keep_sync(iter(items), ctx)


_END = object()


def _keep_sync(it: Iterator[T], ctx: contextvars.Context) -> Generator[T, None, None]:
    try:
        while True:
            item = ctx.run(next, it, _END)
            if item is _END:
                return
            yield item
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            ctx.run(close)


async def _keep_async(it: AsyncIterator[T], ctx: contextvars.Context) -> AsyncIterator[T]:
    try:
        while True:
            try:
                item = await _InContext(ctx, it.__anext__())
            except StopAsyncIteration:
                return
            yield item
    finally:
        close = getattr(it, "aclose", None)
        if close is not None:
            await _InContext(ctx, close())


class _InContext:
    """Await ``coro`` with each of its steps run in ``ctx`` (what ``asyncio.create_task(coro, context=ctx)`` does
    on Python 3.11, without a task, on every Python and event loop): the awaitables it yields pass through."""

    def __init__(self, ctx: contextvars.Context, coro: Awaitable[Any]) -> None:
        self.ctx, self.coro = ctx, coro

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self.coro.__await__() if not hasattr(self.coro, "send") else self.coro
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                if error is None:
                    yielded = self.ctx.run(coro.send, value)
                else:
                    yielded = self.ctx.run(coro.throw, error)
            except StopIteration as stop:
                return stop.value
            try:
                value, error = (yield yielded), None
            except BaseException as err:  # thrown in by the event loop (e.g. cancellation): pass it on
                value, error = None, err
