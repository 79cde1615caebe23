"""The peers, run from their own code (PyPI releases, installed with ``--no-deps`` beside actsteer's stack).

- **steering-vectors 0.12.2** (CAA): ``train_steering_vector(model, tok, pairs, layers=...)`` with its defaults
  (``layer_type="decoder_block"``, last token, mean aggregator, ``batch_size=1``), applied with
  ``with vector.apply(model, multiplier=m)`` (every token, prompt and generated).
- **repeng 0.4.0**: ``ControlModel(model, range(-5, -18, -1))`` (its README's layers), ``ControlVector.train(...,
  method=...)`` (default ``pca_diff``; ``pca_center`` too), ``set_control(vector, c)``. Under numpy 2 its import
  fails on ``np.float_`` (used in type hints only): the alias is set before importing. It needs a pad token.
  ``ControlModel`` wraps the model's layers in place: every use here unwraps it again.

Install (a separate venv that shares the project's torch/transformers is enough):
    pip install --no-deps steering-vectors==0.12.2 repeng==0.4.0 scikit-learn joblib threadpoolctl
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from benchmarks.frontier_cells import padded

REPENG_LAYERS = list(range(-5, -18, -1))  # repeng README: layers 13..25 of a 30-layer model
VERSIONS = {"steering_vectors": "0.12.2", "repeng": "0.4.0"}


def available() -> dict[str, str | None]:
    """Installed peer versions (None when missing)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for module, dist in (("steering_vectors", "steering-vectors"), ("repeng", "repeng")):
        try:
            out[module] = version(dist) if importlib.util.find_spec(module) else None
        except PackageNotFoundError:
            out[module] = None
    return out


class SteeringVectorsPeer:
    """steering-vectors (CAA) trained on ``pairs``; ``applied(m)`` steers every token with multiplier ``m``."""

    def __init__(self, model, tokenizer, pairs: Sequence[tuple[str, str]], layers: list[int] | None) -> None:
        from steering_vectors import train_steering_vector

        self.model = model
        self.vector = train_steering_vector(model, tokenizer, list(pairs), layers=layers)

    def state(self) -> dict[str, Any]:
        return {str(k): v.float().tolist() for k, v in self.vector.layer_activations.items()}

    @classmethod
    def from_state(cls, model, state: dict[str, Any]) -> "SteeringVectorsPeer":
        from steering_vectors import SteeringVector

        peer = cls.__new__(cls)
        peer.model = model
        peer.vector = SteeringVector({int(k): torch.tensor(v) for k, v in state.items()})
        return peer

    @contextlib.contextmanager
    def applied(self, multiplier: float) -> Iterator[Any]:
        with self.vector.apply(self.model, multiplier=multiplier):
            yield self.model.generate


def _import_repeng():
    if not hasattr(np, "float_"):
        np.float_ = np.float64  # repeng 0.4.0 annotates with np.float_, removed in numpy 2
    import repeng

    return repeng


class RepengPeer:
    """repeng trained on ``pairs`` with ``method``; ``applied(c)`` sets control ``c`` on its README's layers."""

    def __init__(self, model, tokenizer, pairs: Sequence[tuple[str, str]], method: str = "pca_diff") -> None:
        repeng = _import_repeng()
        self.model = model
        dataset = [repeng.DatasetEntry(positive=p, negative=n) for p, n in pairs]
        cmodel = repeng.ControlModel(model, REPENG_LAYERS)
        try:
            with padded(tokenizer, side=tokenizer.padding_side):
                self.vector = repeng.ControlVector.train(cmodel, tokenizer, dataset, method=method)
        finally:
            cmodel.unwrap()

    def state(self) -> dict[str, Any]:
        return {"model_type": self.vector.model_type,
                "directions": {str(k): v.tolist() for k, v in self.vector.directions.items()}}

    @classmethod
    def from_state(cls, model, state: dict[str, Any]) -> "RepengPeer":
        repeng = _import_repeng()
        peer = cls.__new__(cls)
        peer.model = model
        peer.vector = repeng.ControlVector(
            state["model_type"], {int(k): np.asarray(v, dtype=np.float32) for k, v in state["directions"].items()})
        return peer

    @contextlib.contextmanager
    def applied(self, coeff: float) -> Iterator[Any]:
        repeng = _import_repeng()
        cmodel = repeng.ControlModel(self.model, REPENG_LAYERS)
        try:
            cmodel.set_control(self.vector, coeff)
            yield cmodel.generate
        finally:
            cmodel.reset()
            cmodel.unwrap()
