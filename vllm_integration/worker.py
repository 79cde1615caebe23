"""Steering inside a vLLM worker: one model-wide `SteeringHandle` on the worker's model, with per-token strengths.

vLLM flattens the tokens of every scheduled request into one ``(num_tokens, D)`` batch. Before each forward,
`WorkerSteering.prepare` reads the batch's request order (``input_batch.req_ids``) and the token range of each
request (``query_start_loc`` of the attention metadata in vLLM's forward context), and gives every composed
transport a 1-D strength with one value per token: the request's strength for that transport, 0 (untouched,
bit-identical) for requests that did not ask for it and for padding. Prefill, chunked prefill, decode and
prefix-cached requests are all just rows of that batch.

The handle composes a *layout*: a list of ``(name, version)`` slots such that every steered request's list of
transports is a subsequence of it, so each request gets its own transports in its own order. The layout grows
when a request needs a combination it cannot express, and is rebuilt from the live requests when it gets long.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..core import Steering, SteeringHandle, Transport, attach, present_sites, validate
from .names import ModelShape
from .store import RequestSteering, TransportStore, parse_request, transports_dir

logger = logging.getLogger(__name__)

MAX_SLOTS = 8  # past this many composed slots the layout is rebuilt from the live requests only

Slot = tuple[str, str]  # (transport name, file version)
_Resolved = tuple[tuple[Slot, ...], tuple[float, ...]]


def _subsequence(wanted: tuple[Slot, ...], layout: list[Slot]) -> list[int] | None:
    """Slot indices of ``layout`` that hold ``wanted`` in order (first fit), or None."""
    found, j = [], 0
    for slot in wanted:
        while j < len(layout) and layout[j] != slot:
            j += 1
        if j == len(layout):
            return None
        found.append(j)
        j += 1
    return found


class WorkerSteering:
    """The steering state of one vLLM model runner (created on its first forward).

    Args:
        runner: the worker's model runner (``GPUModelRunner`` or a subclass such as ``CPUModelRunner``).
        folder: the transports folder.
    """

    def __init__(self, runner: Any, folder: Any) -> None:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        config = runner.vllm_config
        if getattr(config.parallel_config, "enable_dbo", False):
            raise RuntimeError(
                "actsteer: steering does not support dual-batch overlap (--enable-dbo): the model runs on "
                "micro-batches whose rows differ from the scheduled batch; start vLLM without it"
            )
        self.runner = runner
        self.shape = ModelShape.from_config(
            config.model_config.hf_config,
            tp_rank=get_tensor_model_parallel_rank(),
            tp_size=get_tensor_model_parallel_world_size(),
        )
        self.store = TransportStore(folder, self.shape)
        self.model: torch.nn.Module = runner.get_model()
        self.pipeline = config.parallel_config.pipeline_parallel_size > 1
        self.handle: SteeringHandle | None = None
        self.layout: list[Slot] = []
        self._last: list[float | torch.Tensor] = []
        self._last_key: list[Any] = []  # per slot, what `_last` was built from (`_set`)
        self._requests: dict[str, _Resolved | None] = {}
        self._loaded: dict[Slot, Transport] = {}  # the transport of each slot, as read when a request resolved it
        logger.info("actsteer: steering enabled in this worker (transports from %s)", folder)

    @classmethod
    def for_runner(cls, runner: Any) -> WorkerSteering | None:
        """The runner's steering state, created once; None when no transports folder is configured."""
        state = runner.__dict__.get("_actsteer", False)
        if state is False:
            folder = transports_dir(runner.vllm_config.additional_config)
            state = cls(runner, folder) if folder is not None else None
            runner._actsteer = state
        return state

    # requests ------------------------------------------------------------------------------------------
    def _resolve(self, req_id: str) -> _Resolved | None:
        """A request's slots and strengths, read once per request; None when it asked for no steering."""
        if req_id in self._requests:
            return self._requests[req_id]
        state = self.runner.requests.get(req_id)
        params = getattr(state, "sampling_params", None)
        resolved = None
        try:
            spec: RequestSteering | None = parse_request(getattr(params, "extra_args", None))
            if spec is not None and any(s != 0.0 for s in spec.strengths):
                loaded = [(name, *self.store.get(name)) for name in spec.names]
                for name, version, transport in loaded:
                    self._loaded.setdefault((name, version), transport)
                resolved = (tuple((name, version) for name, version, _ in loaded), spec.strengths)
        except (KeyError, ValueError, OSError) as err:
            # The front end checked this request; a file removed or broken since then cannot fail it from here.
            logger.error("actsteer: request %s is NOT steered: %s", req_id, err)
        if len(self._requests) > 2 * len(self.runner.requests) + 64:  # forget finished requests
            self._requests = {k: v for k, v in self._requests.items() if k in self.runner.requests}
        self._requests[req_id] = resolved
        return resolved

    def _relayout(self, wanted: list[tuple[Slot, ...]]) -> None:
        """Compose a layout in which every wanted list is a subsequence, and attach a handle for it."""
        layout = list(self.layout)
        for slots in wanted:
            if _subsequence(slots, layout) is None:
                layout.extend(slots)
        if len(layout) > MAX_SLOTS:
            layout = []
            for slots in wanted:
                if _subsequence(slots, layout) is None:
                    layout.extend(slots)
        # each slot holds the file version its requests resolved, even if the file has changed since
        transports = [self._local(self._loaded[slot]) for slot in layout]
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.layout, self._last, self._last_key = [], [], []
        handle = attach(self.model, [Steering(t, strength=0.0) for t in transports])
        handle.active = False
        self.handle, self.layout = handle, layout
        self._last, self._last_key = [0.0] * len(layout), [0.0] * len(layout)
        live = set(layout).union(*(r[0] for r in self._requests.values() if r))
        self._loaded = {slot: t for slot, t in self._loaded.items() if slot in live}
        logger.info("actsteer: steering layout is now %s", [name for name, _ in layout])

    def _local(self, transport: Transport) -> Transport:
        """The sites of a translated transport that live on this rank, checked against the real modules (the core's
        `validate`: another pipeline stage holds the missing layers)."""
        local = transport.select(present_sites(self.model, transport)) if self.pipeline else transport
        validate(self.model, local)
        return local

    # forward ---------------------------------------------------------------------------------------------
    def prepare(self, num_rows: int) -> bool:
        """Set per-token strengths for the coming forward of ``num_rows`` rows; True when anything is steered."""
        req_ids = list(self.runner.input_batch.req_ids)
        resolved = [self._resolve(r) for r in req_ids]
        if not any(resolved):
            return False
        starts = self._query_start_loc(len(req_ids))
        if starts is None or starts[-1] > num_rows:
            logger.error("actsteer: cannot map the batch's %d rows to its requests; this step is not steered", num_rows)
            return False
        steered = [(i, r) for i, r in enumerate(resolved) if r]
        matches = [_subsequence(r[0], self.layout) for _, r in steered]
        if any(m is None for m in matches) or self.handle is None:
            self._relayout(list(dict.fromkeys(r[0] for _, r in steered)))
            matches = [_subsequence(r[0], self.layout) for _, r in steered]
        per_slot = [[0.0] * len(req_ids) for _ in self.layout]
        for (i, r), match in zip(steered, matches):
            for j, s in zip(match, r[1]):
                per_slot[j][i] = s
        counts = tuple(b - a for a, b in zip(starts, starts[1:]))
        for j, values in enumerate(per_slot):
            self._set(j, values, counts, num_rows)
        self.handle.active = True
        return True

    def finish(self) -> None:
        """After the forward: steer nothing else (vLLM's warm-up and dummy runs call the model directly)."""
        if self.handle is not None:
            self.handle.active = False

    def _set(self, j: int, values: list[float], counts: tuple[int, ...], num_rows: int) -> None:
        uniform = all(v == values[0] for v in values)
        key = values[0] if uniform else (tuple(values), counts, num_rows)
        if key == self._last_key[j]:  # decode steps of an unchanged batch: the strengths set last, nothing to build
            return
        # vLLM runs the model under torch.inference_mode; the handle keeps this strength across calls, so it is
        # built as an ordinary tensor (inference tensors cannot be updated or versioned outside that mode).
        with torch.inference_mode(False):
            if uniform:
                value: float | torch.Tensor = values[0]  # one strength for every row: the engine's scalar path
            else:
                per_token = torch.repeat_interleave(
                    torch.tensor(values, dtype=torch.float32), torch.tensor(counts, dtype=torch.long)
                )
                value = torch.zeros(num_rows, dtype=torch.float32)
                value[: per_token.shape[0]] = per_token
            last = self._last[j]
            same = (
                (not isinstance(value, torch.Tensor) and not isinstance(last, torch.Tensor) and value == last)
                or (isinstance(value, torch.Tensor) and isinstance(last, torch.Tensor) and torch.equal(value, last))
            )
            if not same:  # an unchanged per-token strength (a new batch of the same rows) keeps its folds
                self.handle.set_strength(value, index=j)
                self._last[j] = value
        self._last_key[j] = key

    @staticmethod
    def _query_start_loc(num_reqs: int) -> list[int] | None:
        """Token offsets of the batch's requests, from vLLM's forward context (its attention metadata)."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return None
        metadata = get_forward_context().attn_metadata
        if not isinstance(metadata, dict):
            return None
        for md in metadata.values():
            loc = getattr(md, "query_start_loc_cpu", None)
            loc = getattr(md, "query_start_loc", None) if loc is None else loc
            if isinstance(loc, torch.Tensor) and loc.numel() >= num_reqs + 1:
                return loc[: num_reqs + 1].tolist()
        return None
