"""Start-up in the front end: which sites the workers prepare for steering, and the log line that says so.

`plan_engine` reads every transport in the folder once, translates it to vLLM's site names and writes their union
into the engine config (``additional_config["actsteer"]["plan"]``). vLLM hands that config to every worker, which
puts the steering slots on exactly those sites before compiling the model, and hashes it into its compile-cache
key (with the slot and composition counts), so a cached graph is reused only for the same plan. A transport that
cannot steer the served model is left out of the plan (and refused when a request names it); one added to the
folder later must steer planned sites only, or the server must be restarted.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from .names import ModelShape
from .store import CONFIG_KEY, PLAN_KEY, Settings, TransportStore

logger = logging.getLogger("vllm." + __name__)  # under "vllm", so that vLLM's logging config applies


def plan_engine(config: Any) -> Settings | None:
    """Plan the steered sites of an engine config in place and log the start-up line; None when steering is off.

    Raises:
        TypeError / ValueError: bad settings in ``additional_config["actsteer"]``, or a model whose vLLM layout
            actsteer does not know (before any worker starts).
    """
    settings = Settings.from_config(config.additional_config)
    if settings.folder is None:
        return None
    model_config = config.model_config
    shape = ModelShape.from_config(model_config.hf_config, tp_size=config.parallel_config.tensor_parallel_size)
    store = TransportStore(settings.folder, shape, served=served_names(model_config), settings=settings)
    sites: dict[str, None] = {}
    found, refused = [], {}
    for name in store.available():
        try:
            _, transport = store.get(name)
        except (KeyError, ValueError, OSError) as err:
            refused[name] = err.args[0] if err.args else str(err)
            continue
        found.append(name)
        sites.update(dict.fromkeys(transport.sites))
    if not isinstance(config.additional_config, MutableMapping):
        raise TypeError("actsteer needs additional_config to be a dict (like {\"actsteer\": {\"transports\": DIR}})")
    compiled = int(config.compilation_config.mode) != 0 and not model_config.enforce_eager
    graphs = str(getattr(config.compilation_config, "cudagraph_mode", "NONE")).rsplit(".", 1)[-1]
    device = str(getattr(config.device_config, "device_type", "") or "cpu")
    graph = resolve_graph(settings.graph, device=device, cuda_graphs=compiled and device != "cpu" and graphs != "NONE")
    section = dict(config.additional_config.get(CONFIG_KEY) or {})
    # everything that shapes the compiled graph goes into the plan, which vLLM hashes into its compile-cache key:
    # the sites, the slot and composition counts (the tables' shapes) and the kind of op, defaults included
    section[PLAN_KEY] = {"sites": list(sites), "slots": settings.max_transports, "depth": settings.max_composed,
                         "graph": graph}
    config.additional_config[CONFIG_KEY] = section
    mode = f"compiled (torch.compile, CUDA graphs {graphs})" if compiled else "eager"
    mode += "; steering as one op per site" if graph == "op" else "; steering fused into the graph"
    if not settings.folder.is_dir():
        logger.warning("actsteer: steering is on but the transports folder %s does not exist: every steering request "
                       "will be refused", settings.folder)
    logger.info("actsteer: steering on; transports from %s: %d found (%s), %d sites prepared; mode %s; up to %d "
                "transports per batch, %d composed per request", settings.folder, len(found),
                ", ".join(found[:20]) + (", ..." if len(found) > 20 else "") or "none", len(sites), mode,
                settings.max_transports, settings.max_composed)
    for name, why in refused.items():
        logger.warning("actsteer: transport %r left out: %s", name, why)
    return Settings.from_config(config.additional_config)


def resolve_graph(requested: str, *, device: str, cuda_graphs: bool) -> str:
    """The kind of steering op a worker puts in the model (`actsteer.vllm_integration.bank`): ``"auto"`` is ``"op"``
    on CPU (vLLM compiles one whole-model graph there, and the fused formula lengthens that compile) and ``"fused"``
    elsewhere (CUDA graphs replay it).

    Raises:
        ValueError: ``"op"`` asked for with CUDA graphs on (a captured graph would freeze the host's plan).

    Example:
        >>> [resolve_graph("auto", device=d, cuda_graphs=d == "cuda") for d in ("cpu", "cuda")]
        ['op', 'fused']
    """
    if requested == "auto":
        return "op" if device == "cpu" else "fused"
    if requested == "op" and cuda_graphs:
        raise ValueError('actsteer: `graph: "op"` reads each batch\'s steering on the host, which a CUDA graph would '
                         'freeze: use "fused" (the default on GPUs) or start vLLM with --enforce-eager')
    return requested


def served_names(model_config: Any) -> tuple[str, ...]:
    """The names the served model goes by: its path or hub id, and ``--served-model-name``."""
    names = [getattr(model_config, "model", None)]
    served = getattr(model_config, "served_model_name", None)
    names.extend(served if isinstance(served, (list, tuple)) else [served])
    return tuple(str(n) for n in names if n)
