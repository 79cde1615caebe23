"""actsteer in vLLM: per-request AcT steering in continuous batches, as a plugin for stock vLLM.

``pip install actsteer`` registers `register` as a vLLM general plugin (entry point group
``vllm.general_plugins``). With a transports folder configured (``ACTSTEER_TRANSPORTS=DIR``), ``vllm serve MODEL``
and ``vllm.LLM(MODEL)`` steer each request that asks for it::

    SamplingParams(max_tokens=32, extra_args={"actsteer_transport": "ocean", "actsteer_strength": 0.8})

and through the OpenAI-compatible server the same keys go in the request body's ``vllm_xargs``. Transports
fitted with `actsteer.fit_lm` on the Hugging Face model apply without refitting (`names` translates them).

Modules: `names` (HF -> vLLM sites), `store` (request keys, the transports folder), `worker` (per-token
strengths in a worker), `plugin` (the wrappers vLLM gets). Only `plugin` and `worker` import vLLM.
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
