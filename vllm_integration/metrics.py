"""Prometheus counters of the vLLM plugin, in vLLM's metrics (``/metrics`` of the OpenAI server).

``actsteer:steered_requests_total`` counts the requests accepted with steering, ``actsteer:refused_requests_total``
the requests refused, by ``reason`` (``bad_request``: keys, strengths or names; ``unknown_transport``;
``transport``: a transport that cannot steer the served model; ``steering_off``: no transports folder). They live
in the front end's default registry, which vLLM's ``/metrics`` serves. Without ``prometheus_client`` (a
dependency of vLLM) they are no-ops.
"""

from __future__ import annotations

import threading
from typing import Any

_LOCK = threading.Lock()
_COUNTERS: dict[str, Any] = {}


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
    with _LOCK:
        if name not in _COUNTERS:
            try:
                from prometheus_client import Counter
            except ImportError:
                _COUNTERS[name] = None
            else:
                _COUNTERS[name] = Counter(name, doc, labelnames=labels)
        return _COUNTERS[name]


def steered() -> None:
    """Count one request accepted with steering."""
    counter = _counter("actsteer:steered_requests", "Requests accepted with actsteer steering")
    if counter is not None:
        counter.inc()


def refused(reason: str) -> None:
    """Count one request refused by actsteer's checks, by ``reason``."""
    counter = _counter("actsteer:refused_requests", "Requests refused by actsteer's checks", ("reason",))
    if counter is not None:
        counter.labels(reason=reason).inc()
