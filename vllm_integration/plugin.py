"""The vLLM general plugin (entry point group ``vllm.general_plugins``): what actsteer changes in stock vLLM.

vLLM calls `register` in every process it starts (front end, engine core, workers). Nothing changes unless a
transports folder is configured (``$ACTSTEER_TRANSPORTS`` or ``--additional-config '{"actsteer":
{"transports": DIR}}'``). Then small wrappers apply, and vLLM keeps its mode (compiled or eager, CUDA graphs):

- ``EngineArgs.create_engine_config`` (front end): reads the transports in the folder and writes the union of
  their vLLM sites into the config (``additional_config["actsteer"]["plan"]``), which vLLM hands to every worker
  and hashes into its compile-cache key; logs one line with the folder, the transports found and the mode.
- ``GPUModelRunner.load_model`` / ``CPUModelRunner.load_model`` (workers): after the model is loaded and before
  vLLM compiles it, puts the stacked steering slots on the planned sites (`actsteer.vllm_integration.bank`).
- ``GPUModelRunner._model_forward`` (workers): writes each token's slot rows and strengths in place before each
  forward (`actsteer.vllm_integration.worker`).
- ``InputProcessor.process_inputs`` (front end): a request's actsteer keys are checked before it is queued
  (``VLLMValidationError``: HTTP 400); a steered request gets a ``cache_salt`` derived from its steering, so prefix
  caching never shares KV blocks between differently steered prompts. Counted in the metrics (`metrics`).
- The OpenAI server's completion and chat handlers check the same keys before a stream starts (a streamed
  request is refused with HTTP 400, not an error event inside a 200 stream), on the request's raw JSON (so a
  boolean strength is refused, not read as 1); ``/v1/models`` lists the transport names (`Settings`).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
from typing import Any

from . import metrics

logger = logging.getLogger("vllm." + __name__)  # under "vllm", so that vLLM's logging config applies

_REGISTERED = False


def register() -> None:
    """Install actsteer into vLLM (idempotent; vLLM may call it several times per process).

    Example:
        >>> from actsteer.vllm_integration import plugin
        >>> plugin.register()  # doctest: +SKIP
    """
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.input_processor import InputProcessor
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError as err:  # a vLLM whose layout this version does not know: say so, change nothing
        logger.warning("actsteer: vLLM plugin not installed, this vLLM version is not supported (%s)", err)
        return
    _REGISTERED = True
    _wrap(EngineArgs, "create_engine_config", _create_engine_config)
    _wrap(InputProcessor, "process_inputs", _process_inputs)
    _wrap(GPUModelRunner, "_model_forward", _model_forward)
    _wrap(GPUModelRunner, "load_model", _load_model)
    try:  # the CPU build's runner loads its model itself
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        _wrap(CPUModelRunner, "load_model", _load_model)
    except ImportError:
        pass
    _wrap_server()


def _wrap(cls: type, name: str, wrapper: Any) -> None:
    original = cls.__dict__.get(name) or getattr(cls, name)
    if getattr(original, "__actsteer__", False):
        return
    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return await wrapper(original, self, *args, **kwargs)
    else:

        @functools.wraps(original)
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            return wrapper(original, self, *args, **kwargs)

    method.__actsteer__ = True  # type: ignore[attr-defined]
    setattr(cls, name, method)


def _wrap_server() -> None:
    """The OpenAI server's handlers (absent from some builds: then only the engine-side checks apply)."""
    try:
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    except ImportError as err:
        logger.debug("actsteer: OpenAI server not wrapped (%s)", err)
        return
    _wrap(OpenAIServingCompletion, "create_completion", _serving_precheck)
    _wrap(OpenAIServingChat, "create_chat_completion", _serving_precheck)
    _wrap(OpenAIServingModels, "show_available_models", _show_available_models)


# front end: start-up ----------------------------------------------------------------------------------------
def _create_engine_config(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    config = original(self, *args, **kwargs)
    from .planning import plan_engine

    plan_engine(config)
    return config


def _frontend_store(processor: Any) -> Any:
    """The `TransportStore` of a front end's ``InputProcessor``, kept on it (a new one if its config changes)."""
    from .names import ModelShape
    from .planning import served_names
    from .store import Settings, TransportStore

    vllm_config = processor.vllm_config
    cached = processor.__dict__.get("_actsteer_store")
    if cached is not None and cached[0] is vllm_config:
        return cached[1]
    settings = Settings.from_config(vllm_config.additional_config)
    store = None
    if settings.folder is not None:
        model_config = vllm_config.model_config
        shape = ModelShape.from_config(model_config.hf_config, tp_size=vllm_config.parallel_config.tensor_parallel_size)
        store = TransportStore(settings.folder, shape, served=served_names(model_config), settings=settings)
    processor._actsteer_store = (vllm_config, store)
    return store


def check_request(processor: Any, extra_args: Any) -> str | None:
    """Check a request's actsteer keys against the front end's store; the steering's salt, or None (unsteered).

    Raises:
        VLLMValidationError: anything wrong, with the reason (HTTP 400 from the server); counted in the metrics.
    """
    from vllm.exceptions import VLLMValidationError

    from .store import asks_for_steering, parse_request

    if not asks_for_steering(extra_args):
        return None
    reason = "bad_request"
    try:
        store = _frontend_store(processor)
        spec = parse_request(extra_args, max_composed=store.settings.max_composed if store else None)
        if spec is not None and store is None:
            reason = "steering_off"
            raise ValueError(
                "steering is off in this server: start it with ACTSTEER_TRANSPORTS=DIR or "
                "--additional-config '{\"actsteer\": {\"transports\": \"DIR\"}}'"
            )
        if spec is None:
            return None
        if store.settings.plan is None:  # the workers put steering only on planned sites: without a plan, none
            reason = "steering_off"
            raise ValueError("steering is not prepared in this engine: the actsteer plugin was not loaded when vLLM "
                             "made its engine config (is actsteer installed in the server's environment?)")
        reason = "transport"
        return store.check(spec, processor.vllm_config.model_config.dtype)
    except (KeyError, ValueError, TypeError, OSError) as err:
        metrics.refused(reason if not isinstance(err, KeyError) else "unknown_transport")
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise VLLMValidationError(f"actsteer: {message}", parameter="vllm_xargs") from None


def _process_inputs(
    original: Any, self: Any, request_id: str, prompt: Any, params: Any, *args: Any, **kwargs: Any
) -> Any:
    salt = check_request(self, getattr(params, "extra_args", None))
    request = original(self, request_id, prompt, params, *args, **kwargs)
    if salt is not None:
        metrics.steered()
        # prefix-cache isolation: KV blocks of a steered prompt differ from the unsteered ones of the same tokens
        request.cache_salt = hashlib.sha256(f"{request.cache_salt or ''}|actsteer|{salt}".encode()).hexdigest()[:32]
    return request


# front end: the OpenAI server ------------------------------------------------------------------------------
async def _raw_xargs(raw_request: Any) -> Any:
    """The request's ``vllm_xargs`` as the client sent them (pydantic has turned ``true`` into 1 by now)."""
    if raw_request is None:
        return None
    try:
        body = json.loads(await raw_request.body())
    except (ValueError, TypeError, RuntimeError):
        return None
    return body.get("vllm_xargs") if isinstance(body, dict) else None


async def _serving_precheck(original: Any, self: Any, request: Any, raw_request: Any = None, *args: Any,
                            **kwargs: Any) -> Any:
    xargs = getattr(request, "vllm_xargs", None)
    if xargs:
        raw = await _raw_xargs(raw_request)
        check_request(self.input_processor, raw if isinstance(raw, dict) else xargs)
    return await original(self, request, raw_request, *args, **kwargs)


async def _show_available_models(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    listing = await original(self, *args, **kwargs)
    store = _frontend_store(self.input_processor)
    if store is None:
        return listing
    info: dict[str, Any] = {"steering": True}
    if store.settings.list_transports:
        info["transports"] = store.available()
    base = {p.name for p in getattr(self, "base_model_paths", [])}
    for card in listing.data:
        if card.id in base:
            card.actsteer = info
    return listing


# workers --------------------------------------------------------------------------------------------------
def _load_model(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    result = original(self, *args, **kwargs)
    if "_actsteer" not in self.__dict__:  # CPUModelRunner.load_model does not call GPUModelRunner's
        from .worker import WorkerSteering

        WorkerSteering.install_on(self)
    return result


def _model_forward(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    from .worker import WorkerSteering

    state = WorkerSteering.for_runner(self)
    if state is None:
        return original(self, *args, **kwargs)
    rows = kwargs.get("input_ids")
    rows = kwargs.get("inputs_embeds") if rows is None else rows
    if rows is None:
        return original(self, *args, **kwargs)
    state.prepare(int(rows.shape[0]))
    try:
        return original(self, *args, **kwargs)
    finally:
        state.finish()
