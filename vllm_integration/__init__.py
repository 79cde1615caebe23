"""actsteer in vLLM: per-request AcT steering in continuous batches, as a plugin for stock vLLM.

``pip install actsteer`` registers `register` as a vLLM general plugin (entry point group
``vllm.general_plugins``). With a transports folder configured (``ACTSTEER_TRANSPORTS=DIR``), ``vllm serve MODEL``
and ``vllm.LLM(MODEL)`` steer each request that asks for it::

    SamplingParams(max_tokens=32, extra_args={"actsteer_transport": "ocean", "actsteer_strength": 0.8})

and through the OpenAI-compatible server the same keys go in the request body's ``vllm_xargs``. Transports
fitted with `actsteer.fit_lm` on the Hugging Face model apply without refitting (`names` translates them).
Steering runs inside vLLM's compiled graph (and its CUDA graphs): vLLM keeps its mode.

Modules: `names` (HF -> vLLM sites), `store` (settings, request keys, the transports folder), `planning` (the
sites prepared at start-up, the start-up log line), `bank` (the buffers and hooks that run the core's per-token
formula over stacked transports in the model), `worker` (per-token slots and strengths in a worker), `metrics`
(Prometheus counters), `plugin` (the wrappers vLLM gets). Only `plugin` and `worker` import vLLM.
"""

from __future__ import annotations

from .names import SUPPORTED_ARCHITECTURES, ModelShape, to_vllm
from .store import ENV_VAR, KEY_STRENGTH, KEY_TRANSPORT, RequestSteering, Settings, TransportStore, parse_request


def register() -> None:
    """The vLLM general-plugin entry point (see `actsteer.vllm_integration.plugin.register`)."""
    from .plugin import register as _register

    _register()


__all__ = [
    "ENV_VAR",
    "KEY_STRENGTH",
    "KEY_TRANSPORT",
    "SUPPORTED_ARCHITECTURES",
    "ModelShape",
    "RequestSteering",
    "Settings",
    "TransportStore",
    "parse_request",
    "register",
    "to_vllm",
]
