"""Steering inside a vLLM worker: the stacked slots of `actsteer.vllm_integration.bank`, filled per step.

`WorkerSteering.install` runs once, right after vLLM loads the model and before it compiles it: it puts a `Bank`
with one hook per planned site on the model (the plan, `Settings.plan`, is the union of the sites of the
transports the front end found in the folder at start-up; vLLM sends it to every worker in its config). Before
each forward, `WorkerSteering.prepare` reads the batch's request order (``input_batch.req_ids``) and the token
range of each request (``query_start_loc`` of the attention metadata in vLLM's forward context), makes sure each
requested transport is resident in a slot (least recently used slots are reused), and writes one (table row,
``|strength|``) pair per composition position and token. Prefill, chunked prefill, decode and prefix-cached
requests are all just rows of that batch; unsteered requests and padding get row 0 (bit-identical).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..core import Transport, infer_width, iter_site_modules
from .bank import Bank, install
from .names import ModelShape, site_width
from .planning import resolve_graph
from .store import RequestSteering, Settings, TransportStore, parse_request

logger = logging.getLogger("vllm." + __name__)  # under "vllm", so that vLLM's logging config applies

Slot = tuple[str, str]  # (transport name, file version)
_Resolved = tuple[tuple[Slot, ...], tuple[float, ...]]


class WorkerSteering:
    """The steering state of one vLLM model runner.

    Args:
        runner: the worker's model runner (``GPUModelRunner`` or a subclass such as ``CPUModelRunner``), with its
            model loaded.
        settings: the plugin's settings, with the plan of sites.
    """

    def __init__(self, runner: Any, settings: Settings) -> None:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        config = runner.vllm_config
        if getattr(config.parallel_config, "enable_dbo", False):
            raise RuntimeError(
                "actsteer: steering does not support dual-batch overlap (--enable-dbo): the model runs on "
                "micro-batches whose rows differ from the scheduled batch; start vLLM without it"
            )
        self.runner = runner
        self.settings = settings
        self.shape = ModelShape.from_config(
            config.model_config.hf_config,
            tp_rank=get_tensor_model_parallel_rank(),
            tp_size=get_tensor_model_parallel_world_size(),
        )
        # the front end checked each transport's model; the worker only translates and loads
        self.store = TransportStore(settings.folder, self.shape, settings=settings)
        self.model: torch.nn.Module = runner.get_model()
        self.pipeline = config.parallel_config.pipeline_parallel_size > 1
        widths = self._widths(settings.plan or ())
        max_tokens = max(int(config.scheduler_config.max_num_batched_tokens),
                         int(getattr(config.compilation_config, "max_cudagraph_capture_size", 0) or 0))
        device = next(self.model.parameters()).device
        self.bank: Bank | None = None
        if widths:
            # the front end resolved the kind into the plan; "auto" reaches here only for a config planned without it
            kind = resolve_graph(settings.graph, device=device.type, cuda_graphs=False)
            self.bank, self._handles = install(self.model, widths, slots=settings.max_transports,
                                               depth=settings.max_composed, max_tokens=max_tokens, device=device,
                                               kind=kind)
        self.resident: list[Slot | None] = [None] * (settings.max_transports + 1)  # index 0: the identity
        self.last_used = [0] * (settings.max_transports + 1)
        self.step = 0
        self._requests: dict[str, _Resolved | None] = {}
        self._loaded: dict[Slot, Transport] = {}  # the transport of each slot, as read when a request resolved it
        self._last_key: Any = None
        self._used = 0
        logger.info("actsteer: worker steers %d sites with %d transport slots, %d composed per request (%s)",
                    len(widths), settings.max_transports, settings.max_composed,
                    "one op per site" if self.bank is not None and self.bank.kind == "op" else "fused")

    @classmethod
    def for_runner(cls, runner: Any) -> WorkerSteering | None:
        """The runner's steering state (None when steering is off: no folder, or no planned site)."""
        return runner.__dict__.get("_actsteer")

    @classmethod
    def install_on(cls, runner: Any) -> WorkerSteering | None:
        """Create the runner's steering state after its model is loaded (before vLLM compiles the model)."""
        settings = Settings.from_config(runner.vllm_config.additional_config)
        state = cls(runner, settings) if settings.folder is not None and settings.plan else None
        runner._actsteer = state
        return state

    def _widths(self, sites: tuple[str, ...]) -> dict[str, int]:
        """The planned sites that exist on this rank (pipeline stages hold some layers), with their widths."""
        widths = {}
        for site in sites:
            try:
                ((_, _, _, module),) = iter_site_modules(self.model, [site])
            except KeyError:
                if self.pipeline:
                    continue
                raise
            width = site_width(site, self.shape)
            found = infer_width(module)  # the core's one width rule
            if found is not None and found != width:
                raise ValueError(f"actsteer: site {site!r} has {found} units in vLLM's model, {width} expected")
            widths[site] = width
        return widths

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
                    self._loaded.setdefault((name, version), self._local(transport))
                resolved = (tuple((name, version) for name, version, _ in loaded), spec.strengths)
        except (KeyError, ValueError, OSError) as err:
            # The front end checked this request; a file removed or broken since then cannot fail it from here.
            logger.error("actsteer: request %s is NOT steered: %s", req_id, err)
        if len(self._requests) > 2 * len(self.runner.requests) + 64:  # forget finished requests
            self._requests = {k: v for k, v in self._requests.items() if k in self.runner.requests}
            live = {slot for r in self._requests.values() if r for slot in r[0]} | set(self.resident)
            self._loaded = {slot: t for slot, t in self._loaded.items() if slot in live}
        self._requests[req_id] = resolved
        return resolved

    def _local(self, transport: Transport) -> Transport:
        """The sites of a translated transport that live on this rank."""
        assert self.bank is not None
        return transport.select([site for site in transport if site in self.bank.index])

    def _place(self, wanted: set[Slot]) -> dict[Slot, int]:
        """Slot numbers for the transports a batch uses, loading the missing ones into the least recently used
        slots that this batch does not need; transports that find no slot are left out (and logged)."""
        assert self.bank is not None
        where = {slot: k for k, slot in enumerate(self.resident) if slot is not None and slot in wanted}
        for slot in sorted(wanted - set(where)):
            free = [k for k in range(1, len(self.resident)) if self.resident[k] not in wanted]
            if not free:
                logger.error("actsteer: this batch uses more than %d transports (max_transports); requests with %r "
                             "are NOT steered in this step", self.settings.max_transports, slot[0])
                continue
            k = min(free, key=lambda i: (self.resident[i] is not None, self.last_used[i]))
            self.bank.load_slot(k, self._loaded[slot])
            self.resident[k] = slot
            where[slot] = k
        for k in where.values():
            self.last_used[k] = self.step
        return where

    # forward ---------------------------------------------------------------------------------------------
    def prepare(self, num_rows: int) -> None:
        """Write the per-token rows and amounts of the coming forward of ``num_rows`` rows (zeros: unsteered)."""
        if self.bank is None:
            return
        self.step += 1
        req_ids = list(self.runner.input_batch.req_ids)
        resolved = [self._resolve(r) for r in req_ids]
        if not any(resolved):
            self.bank.clear_tokens()
            self._last_key = None
            return
        starts = self._query_start_loc(len(req_ids))
        if starts is None or starts[-1] > num_rows:
            logger.error("actsteer: cannot map the batch's %d rows to its requests; this step is not steered", num_rows)
            self.bank.clear_tokens()
            self._last_key = None
            return
        where = self._place({slot for r in resolved if r for slot in r[0]})
        per_request = []
        for r in resolved:
            pairs: tuple = ()
            if r and all(slot in where for slot in r[0]):
                pairs = tuple((2 * where[slot] - (s > 0), abs(s)) for slot, s in zip(*r) if s != 0.0)
            per_request.append(pairs)
        counts = tuple(b - a for a, b in zip(starts, starts[1:]))
        key = (tuple(per_request), counts)
        if key == self._last_key:  # decode steps of an unchanged batch: the buffers already hold it
            self.bank.used = self._used
            return
        depth = self.bank.depth
        rows = np.zeros((depth, starts[-1]), dtype=np.int64)
        amount = np.zeros((depth, starts[-1]), dtype=np.float32)
        for i, pairs in enumerate(per_request):
            for c, (row, a) in enumerate(pairs):
                rows[c, starts[i]:starts[i + 1]] = row
                amount[c, starts[i]:starts[i + 1]] = a
        used = max((len(p) for p in per_request), default=0)
        self.bank.set_tokens(torch.from_numpy(rows), torch.from_numpy(amount), used)
        self._last_key, self._used = key, used

    def finish(self) -> None:
        """After an eager forward: steer nothing else (vLLM's warm-up and dummy runs call the model directly)."""
        if self.bank is not None:
            self.bank.used = 0  # eager dummy runs skip the hooks; compiled ones read the buffers and are discarded

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
