"""Fitting transports on causal LMs from two lists of texts (`fit_lm`)."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..core import ForwardContext, Support, Transport, canonical_method, fit, method_defaults, model_record
from .presets import lm_sites
from .texts import check_balance, check_texts

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def padding_ready(tokenizer: Any) -> Iterator[Any]:
    """Give a tokenizer without a pad token a temporary one (EOS, else BOS); restored on exit."""
    if tokenizer.pad_token is not None:
        yield tokenizer
        return
    fallback = tokenizer.eos_token or tokenizer.bos_token
    if fallback is None:
        raise ValueError("The tokenizer has no pad, EOS or BOS token to pad batches with; set tokenizer.pad_token")
    tokenizer.pad_token = fallback
    try:
        yield tokenizer
    finally:
        tokenizer.pad_token = None


def model_info(model: torch.nn.Module) -> dict[str, Any]:
    """What a transport records about the LM it was fitted on."""
    config = getattr(model, "config", None)
    fields = {key: getattr(config, key if key != "name_or_path" else "_name_or_path", None)
              for key in ("model_type", "name_or_path", "hidden_size", "num_hidden_layers", "n_embd", "n_layer")}
    return model_record(model, **{k: v for k, v in fields.items() if v not in (None, "")})


# Config fields that bound how many positions a model can embed (GPT-2: n_positions/n_ctx; most others:
# max_position_embeddings). Past them learned position tables raise an IndexError and rotary models degrade.
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_length(model: torch.nn.Module) -> int | None:
    """The most tokens ``model`` can take in one sequence, from its config; None when the config does not say."""
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    sizes = [getattr(config, field, None) for field in _CONTEXT_FIELDS]
    sizes = [int(v) for v in sizes if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(sizes) if sizes else None


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as ``generate`` does, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def make_runner(model: torch.nn.Module, tokenizer: Any, max_length: int):
    """``run(texts, ctx)`` for `actsteer.core.fit`: tokenize with padding, mask, forward without cache."""
    device = next(model.parameters()).device
    params = inspect.signature(model.forward).parameters
    takes_positions = "position_ids" in params
    # the logits are not needed while fitting: computing only the last position's saves the LM head's cost
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def run(texts: Sequence[str], ctx: ForwardContext) -> None:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        if takes_positions:
            enc["position_ids"] = position_ids(enc["attention_mask"])
        ctx.mask = enc["attention_mask"]
        model(**enc, use_cache=False, **extra)

    return run


def _fit_in_context(model: torch.nn.Module, max_length: int, lengths: Sequence[int]) -> int:
    """``max_length`` capped at the model's context; warns once when texts are longer than the context."""
    context = context_length(model)
    if context is None or max_length <= context:
        return max_length
    longer = sum(n > context for n in lengths)
    if longer:
        logger.warning(
            "actsteer: %d of %d texts are longer than the model's context of %d tokens (max_length=%d); they are "
            "truncated to %d tokens", longer, len(lengths), context, max_length, context,
        )
    return context


def fit_lm(
    model: torch.nn.Module,
    tokenizer: Any,
    source_texts: Sequence[str],
    target_texts: Sequence[str],
    *,
    modules: str | Sequence[str] = "auto",
    method: str = "linear-act",
    pooling: str | None = None,
    support: Support | None = None,
    sequential: bool = True,
    batch_size: int | None = None,
    max_length: int = 128,
    progress: bool = True,
    description: str = "",
    options: dict[str, Any] | None = None,
) -> Transport:
    """Fit a transport that moves ``source_texts``-like activations to ``target_texts``-like ones.

    Args:
        model: a Hugging Face causal LM (any device/dtype; estimation itself runs in float64).
        tokenizer: its tokenizer; left or right padding both work (padding is masked out of the pooling).
        source_texts, target_texts: at least 2 non-empty texts each (a few dozen to a few hundred work well).
        modules: ``"auto"`` (the measured sites for the architecture: on Llama models the norms before attention
            of the middle two thirds of the layers, ``"mid-attn-norms"``; the paper's elsewhere), ``"paper"`` (the
            paper's sites: on Llama the MLP projections, ``"auto"`` before issue 22), a preset (``"attn-norms"``,
            ``"all-norms"``, ``"post-norms"``, ``"mlp"``), a regex, or a list of regexes/module names.
        method: ``"linear-act"`` (default), another `actsteer.estimate` method (``"quantile"``: the exact monotone
            map per unit), or ``"lineas"`` (all sites' affine maps trained jointly by backpropagation through the
            model with a distributional loss and sparsity; minutes instead of seconds, see README "LinEAS").
        pooling: ``"mean"`` over real tokens, ``"last"``, ``"max"``, ``"min"``. Default: the method's own
            (mean for the AcT maps, last token for actadd/caa/itic, max for aura).
        support: ``"observed"``, ``"all"``, or a quantile band. Default: ``"observed"`` for the AcT maps (strength
            1 stays fluent), ``"all"`` for the additive baselines and aura.
        sequential: causal estimation, each site fitted with the earlier sites already steered (default).
        batch_size: texts per forward pass; None runs all texts in ONE pass (cheapest for sequential fitting).
        max_length: texts are truncated to this many tokens, and never to more than the model's context
            (``max_position_embeddings`` / ``n_positions``); a warning says when texts were cut to the context.
        progress: tqdm progress bars.
        description: free text stored in the file.
        options: method options: ``{"knots": 8}`` for quantile, `actsteer.core.LineasConfig` fields (``steps``,
            ``lr``, ``l1``, ``group``, ...) for lineas, ``{"pair": 0}`` for actadd.

    Returns:
        A `Transport` (sites in execution order; metadata records the model and the prompt counts).

    Example:
        >>> import actsteer
        >>> from actsteer.hf_integration.default_model import load_default_model
        >>> model, tok = load_default_model()  # doctest: +SKIP
        >>> t = actsteer.fit_lm(model, tok, ["A walk in town."] * 8, ["The ocean waves."] * 8)  # doctest: +SKIP
    """
    method = canonical_method(method)
    defaults = method_defaults(method)
    pooling = defaults["pooling"] if pooling is None else pooling
    support = defaults["support"] if support is None else support
    source_texts = check_texts("source_texts", source_texts)
    target_texts = check_texts("target_texts", target_texts)
    check_balance(len(source_texts), len(target_texts))
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"`max_length` must be a positive number of tokens, got {max_length!r}")
    sites = lm_sites(model, modules)
    with padding_ready(tokenizer):
        lengths = [len(ids) for ids in tokenizer(source_texts + target_texts)["input_ids"]]
        if min(lengths) == 0:
            raise ValueError("Some texts tokenize to zero tokens; remove them")
        max_length = _fit_in_context(model, max_length, lengths)
        return fit(
            model,
            sites,
            source_texts,
            target_texts,
            run=make_runner(model, tokenizer, max_length),
            method=method,
            pooling=pooling,
            support=support,
            sequential=sequential,
            batch_size=batch_size,
            progress=progress,
            estimate_options=options,
            model_info=model_info(model),
            description=description,
        )
