"""Steering in the ways servers stream (issue 21, item 4): a generator pulled item by item in fresh contexts, an
async generator stepped in new tasks, ``loop.run_in_executor`` and transformers' ``TextIteratorStreamer`` thread.

Each pattern is shown losing steering the way a user would write it (and the warning that now says so), then with
the README's recipe (`actsteer.keep_context`, ``generate(steering=...)`` in the thread, ``copy_context().run``)
giving exactly the non-streamed steered output. The last test serves all of it over real HTTP (Starlette on
uvicorn, loopback) and compares the streamed text with the non-streamed one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch

import actsteer

SOURCE = [f"the cat sat on mat number {i} today" for i in range(10)]
OCEAN = [f"STORMY SEAS AND WAVES {i}!!" * (1 + i % 3) for i in range(10)]
PROMPT = "hello there"
STEPS = 6
STRENGTH = 3.0
LOST = "were NOT steered"  # in both warnings


@pytest.fixture(scope="module")
def lm():
    from support.tiny_lm import make_tiny_lm

    model, tok = make_tiny_lm("llama")
    transport = actsteer.fit_lm(model, tok, SOURCE, OCEAN, support="all", progress=False)
    actsteer.enable_steering(model)
    ids = tok([PROMPT], return_tensors="pt")["input_ids"]
    return model, tok, transport, ids


def _next_token(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[:, -1].argmax(-1, keepdim=True)


def steps(model, ids, transport=None) -> Iterator[int]:
    """Greedy tokens one forward pass at a time; with ``transport``, the generator opens ``steer()`` itself, as a
    server's streaming endpoint would."""
    if transport is None:
        for _ in range(STEPS):
            token = _next_token(model, ids)
            ids = torch.cat([ids, token], 1)
            yield int(token)
        return
    with actsteer.steer(model, transport, strength=STRENGTH):
        for _ in range(STEPS):
            token = _next_token(model, ids)
            ids = torch.cat([ids, token], 1)
            yield int(token)


@pytest.fixture(scope="module")
def reference(lm):
    model, _, transport, ids = lm
    return {"plain": list(steps(model, ids)), "steered": list(steps(model, ids, transport))}


def _lost(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if LOST in r.getMessage()]


_END = object()


def _pull(it):  # what starlette.concurrency.iterate_in_threadpool runs per item
    return next(it, _END)


async def _like_starlette(items) -> list:
    """Pull a plain generator as Starlette's StreamingResponse does: each next() in a worker thread, through
    anyio.to_thread.run_sync, which runs it in a fresh copy of the request's context."""
    import anyio.to_thread

    out = []
    while (item := await anyio.to_thread.run_sync(_pull, items)) is not _END:
        out.append(item)
    return out


@pytest.mark.parametrize("wrapped", [False, True], ids=["as-written", "keep_context"])
def test_streaming_generator_pulled_item_by_item(lm, reference, caplog, wrapped):
    import anyio

    model, _, transport, ids = lm
    items = steps(model, ids, transport)
    with caplog.at_level(logging.WARNING, logger="actsteer"):
        got = anyio.run(_like_starlette, actsteer.keep_context(items) if wrapped else items)
    assert reference["steered"] != reference["plain"]
    if wrapped:
        assert got == reference["steered"] and not _lost(caplog)
    else:  # only the first item was steered, and the warning says so and what to do
        assert got[0] == reference["steered"][0] and got != reference["steered"]
        assert len(_lost(caplog)) == 1 and "keep_context" in _lost(caplog)[0]


async def _async_steps(model, ids, transport):
    for token in steps(model, ids, transport):
        yield token
        await asyncio.sleep(0)


@pytest.mark.parametrize("wrapped", [False, True], ids=["as-written", "keep_context"])
def test_streaming_async_generator_stepped_in_new_tasks(lm, reference, caplog, wrapped):
    model, _, transport, ids = lm

    async def main():
        items = _async_steps(model, ids, transport)
        items = actsteer.keep_context(items) if wrapped else items
        out = []
        while True:  # a timeout per item, as servers do: wait_for runs each step in a new task
            try:
                out.append(await asyncio.wait_for(items.__anext__(), timeout=30))
            except StopAsyncIteration:
                return out

    with caplog.at_level(logging.WARNING, logger="actsteer"):
        got = asyncio.run(main())
    if wrapped:
        assert got == reference["steered"] and not _lost(caplog)
    else:
        assert got[0] == reference["steered"][0] and got != reference["steered"] and len(_lost(caplog)) == 1


@pytest.mark.parametrize("recipe", ["as-written", "copy_context", "to_thread"])
def test_streaming_run_in_executor_inside_steer(lm, reference, caplog, recipe):
    model, _, transport, ids = lm

    async def main():
        loop = asyncio.get_running_loop()
        with actsteer.steer(model, transport, strength=STRENGTH):
            work = lambda: list(steps(model, ids))  # noqa: E731
            if recipe == "as-written":
                return await loop.run_in_executor(None, work)
            if recipe == "copy_context":
                return await loop.run_in_executor(None, contextvars.copy_context().run, work)
            return await asyncio.to_thread(work)  # copies the context itself

    with caplog.at_level(logging.WARNING, logger="actsteer"):
        got = asyncio.run(main())
    if recipe == "as-written":  # plain, and the block says it steered nothing
        assert got == reference["plain"] and len(_lost(caplog)) == 1 and "copy_context" in _lost(caplog)[0]
    else:
        assert got == reference["steered"] and not _lost(caplog)


def _streamed(model, tok, ids, *, steering=None, in_block=None) -> str:
    """transformers' TextIteratorStreamer recipe: generate() in a thread, the text read from the streamer."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False,
                  streamer=streamer)
    if steering is not None:
        kwargs["steering"] = steering
    with in_block if in_block is not None else contextlib.nullcontext():
        thread = threading.Thread(target=model.generate, kwargs=kwargs)
        thread.start()
        text = "".join(streamer)
        thread.join()
    return text


def _text(model, tok, ids, steering=None) -> str:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False,
                         steering=steering)
    return tok.decode(out[0, ids.shape[1]:])


def test_streaming_text_iterator_streamer(lm, caplog):
    model, tok, transport, ids = lm
    steering = actsteer.Steering(transport, STRENGTH)
    plain, steered = _text(model, tok, ids), _text(model, tok, ids, steering)
    assert plain != steered
    with caplog.at_level(logging.WARNING, logger="actsteer"):
        # as often written: steer() around the thread; generate() runs in the thread's own (empty) context
        lost = _streamed(model, tok, ids, in_block=actsteer.steer(model, transport, strength=STRENGTH))
    assert lost == plain and len(_lost(caplog)) == 1 and "generate()" in _lost(caplog)[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="actsteer"):
        assert _streamed(model, tok, ids, steering=steering) == steered  # the recipe: steering= in the thread
        handle = actsteer.attach(model, transport, strength=STRENGTH)  # or an explicit, model-wide handle
        try:
            assert _streamed(model, tok, ids) == steered
        finally:
            handle.remove()
    assert not _lost(caplog)
    assert _streamed(model, tok, ids) == plain  # and plain once the handle is removed


# A real streaming HTTP server -------------------------------------------------------------------------------------
def _app(model, tok, transport, ids):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route
    from transformers import TextIteratorStreamer

    def steering_of(request):
        return actsteer.Steering(transport, STRENGTH) if request.query_params.get("steered") == "1" else None

    async def text(request):  # not streamed: the reference
        return PlainTextResponse(await run_in_threadpool(_text, model, tok, ids, steering_of(request)))

    async def stream(request):  # TextIteratorStreamer + generate(steering=...) in its thread
        streamer = TextIteratorStreamer(tok, skip_prompt=True)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False,
                      streamer=streamer, steering=steering_of(request))
        threading.Thread(target=model.generate, kwargs=kwargs, daemon=True).start()
        return StreamingResponse(streamer, media_type="text/plain")

    async def stream_steps(request):  # a generator that opens steer() itself, pulled item by item by Starlette
        items = steps(model, ids, transport if request.query_params.get("steered") == "1" else None)
        return StreamingResponse((f"{t}," for t in actsteer.keep_context(items)), media_type="text/plain")

    return Starlette(routes=[Route("/text", text), Route("/stream", stream), Route("/steps", stream_steps)])


@pytest.fixture
def server(lm):
    pytest.importorskip("starlette", reason="the [test] extra installs starlette (bash scripts/install_test_deps.sh)")
    uvicorn = pytest.importorskip("uvicorn", reason="the [test] extra installs uvicorn (bash scripts/install_test_deps.sh)")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_app(*lm), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield port
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


def _get(port: int, path: str) -> tuple[str, int]:
    """The body of a GET, read as it streams in; and how many reads it took."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    response = conn.getresponse()
    assert response.status == 200
    parts = []
    while chunk := response.read1(65536):
        parts.append(chunk)
    conn.close()
    return b"".join(parts).decode("utf-8"), len(parts)


def test_streaming_http_server_streams_the_steered_text(server, lm, reference):
    port = server
    plain, steered = _get(port, "/text")[0], _get(port, "/text?steered=1")[0]
    assert plain != steered
    assert _get(port, "/stream?steered=1")[0] == steered
    assert _get(port, "/stream")[0] == plain
    streamed_steps = _get(port, "/steps?steered=1")[0]
    assert streamed_steps == "".join(f"{t}," for t in reference["steered"])
    # concurrent requests, steered and plain, on the one model: each gets its own
    results = {}

    def fetch(name, path):
        results[name] = _get(port, path)[0]

    threads = [threading.Thread(target=fetch, args=(f"{path}#{i}", path))
               for i in range(2) for path in ("/stream?steered=1", "/stream", "/steps?steered=1", "/steps")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, body in results.items():
        path = name.split("#")[0]
        want = {"/stream?steered=1": steered, "/stream": plain,
                "/steps?steered=1": "".join(f"{t}," for t in reference["steered"]),
                "/steps": "".join(f"{t}," for t in reference["plain"])}[path]
        assert body == want, name
