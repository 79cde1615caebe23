"""The vLLM general plugin (entry point group ``vllm.general_plugins``): what actsteer changes in stock vLLM.

vLLM calls `register` in every process it starts (front end, engine core, workers). Nothing changes unless a
transports folder is configured (``$ACTSTEER_TRANSPORTS`` or ``--additional-config '{"actsteer":
{"transports": DIR}}'``). Then three small wrappers apply:

- ``EngineArgs.create_engine_config``: ``enforce_eager=True``. Forward hooks run Python per call; vLLM's
  ``torch.compile`` (mode ``DYNAMO_TRACE_ONCE``) traces them once and replays the trace without guards, so a
  strength set later would be ignored, and CUDA graphs would freeze it too. On CPU eager costs little (measured
  on SmolLM2: ~5% slower decoding, ~140 s less start-up; benchmarks/RESULTS.md).
- ``InputProcessor.process_inputs`` (front end): a request's actsteer keys are checked before it is queued:
  unknown transport, bad strength or a transport that does not fit the model fail that request alone
  (``VLLMValidationError``: HTTP 400 from the server). A steered request gets a ``cache_salt`` derived from its
  steering, so prefix caching never shares KV blocks between differently steered prompts.
- ``GPUModelRunner._model_forward`` (workers; ``CPUModelRunner`` inherits it): per-token strengths are set
  before each forward (`actsteer.vllm_integration.worker`), and steering is paused after it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any

logger = logging.getLogger(__name__)

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


def _wrap(cls: type, name: str, wrapper: Any) -> None:
    original = getattr(cls, name)
    if getattr(original, "__actsteer__", False):
        return

    @functools.wraps(original)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return wrapper(original, self, *args, **kwargs)

    method.__actsteer__ = True  # type: ignore[attr-defined]
    setattr(cls, name, method)


def _enabled(additional_config: Any) -> bool:
    from .store import transports_dir

    return transports_dir(additional_config) is not None


# front end ------------------------------------------------------------------------------------------------
def _create_engine_config(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    if _enabled(self.additional_config) and not self.enforce_eager:
        logger.info("actsteer: steering is on, so vLLM runs eagerly (enforce_eager=True: no torch.compile/CUDA graphs)")
        self.enforce_eager = True
    return original(self, *args, **kwargs)


def _frontend_store(processor: Any) -> Any:
    """The `TransportStore` of a front end's ``InputProcessor``, kept on it (a new one if its folder or config
    changes)."""
    from .names import ModelShape
    from .store import TransportStore, transports_dir

    vllm_config = processor.vllm_config
    folder = transports_dir(vllm_config.additional_config)
    if folder is None:
        return None
    cached = processor.__dict__.get("_actsteer_store")
    if cached is not None and cached[0] == folder and cached[1] is vllm_config:
        return cached[2]
    shape = ModelShape.from_config(
        vllm_config.model_config.hf_config, tp_size=vllm_config.parallel_config.tensor_parallel_size
    )
    store = TransportStore(folder, shape)
    processor._actsteer_store = (folder, vllm_config, store)
    return store


def _process_inputs(
    original: Any, self: Any, request_id: str, prompt: Any, params: Any, *args: Any, **kwargs: Any
) -> Any:
    from vllm.exceptions import VLLMValidationError

    from .store import parse_request

    salt = None
    extra = getattr(params, "extra_args", None)
    if extra and any(isinstance(k, str) and k.startswith("actsteer_") for k in extra):
        try:
            spec = parse_request(extra)
            store = _frontend_store(self)
            if spec is not None and store is None:
                raise ValueError(
                    "steering is off in this server: start it with ACTSTEER_TRANSPORTS=DIR or "
                    "--additional-config '{\"actsteer\": {\"transports\": \"DIR\"}}'"
                )
            if spec is not None:
                salt = store.check(spec, self.vllm_config.model_config.dtype)
        except (KeyError, ValueError, TypeError, OSError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise VLLMValidationError(f"actsteer: {message}") from None
    request = original(self, request_id, prompt, params, *args, **kwargs)
    if salt is not None:
        # prefix-cache isolation: KV blocks of a steered prompt differ from the unsteered ones of the same tokens
        request.cache_salt = hashlib.sha256(f"{request.cache_salt or ''}|actsteer|{salt}".encode()).hexdigest()[:32]
    return request


# workers --------------------------------------------------------------------------------------------------
def _model_forward(original: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    from .worker import WorkerSteering

    state = WorkerSteering.for_runner(self)
    if state is None:
        return original(self, *args, **kwargs)
    rows = kwargs.get("input_ids")
    rows = kwargs.get("inputs_embeds") if rows is None else rows
    if rows is None or not state.prepare(int(rows.shape[0])):
        return original(self, *args, **kwargs)
    try:
        return original(self, *args, **kwargs)
    finally:
        state.finish()
