"""CLIP metrics for steered images (`clip_scores`): the paper's two diffusion metrics, with open_clip.

Needs the ``[clip]`` extra (``open_clip_torch``). No CLIP weights ship offline: pass a model you have, e.g.
``model="ViT-B-32", pretrained="openai"`` (downloaded by open_clip) or an already built
``(model, preprocess, tokenizer)`` triple.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

CONTRAST_PROMPT = "A picture of something."
CONCEPT_PROMPT = "A picture of {concept}."


@dataclasses.dataclass(frozen=True)
class ClipScores:
    """Per-image CLIP metrics (tensors of shape ``(N,)``).

    Attributes:
        presence: zero-shot probability that the image shows ``concept``: softmax over
            ``["A picture of something.", "A picture of {concept}."]`` with CLIP's own logit scale (the reference
            used temperature 1, which keeps scores near 0.5).
        image_similarity: cosine similarity of each image to its reference (unsteered) image; None without references.
    """

    presence: torch.Tensor
    image_similarity: torch.Tensor | None

    def summary(self) -> dict[str, float]:
        out = {"presence": self.presence.mean().item()}
        if self.image_similarity is not None:
            out["image_similarity"] = self.image_similarity.mean().item()
        return out


def _load(model: Any, pretrained: str | None, device: str | torch.device) -> tuple[Any, Any, Any]:
    if isinstance(model, (tuple, list)):
        if len(model) != 3:
            raise ValueError("`model` must be an open_clip model name or a (model, preprocess, tokenizer) triple")
        return tuple(model)  # type: ignore[return-value]
    try:
        import open_clip
    except ImportError:
        raise ImportError("clip_scores needs open_clip: pip install 'actsteer[clip]'") from None
    clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
    return clip.eval(), preprocess, open_clip.get_tokenizer(model)


@torch.no_grad()
def clip_scores(
    images: Sequence[Any],
    reference_images: Sequence[Any] | None,
    concept: str,
    *,
    model: Any = "ViT-B-32",
    pretrained: str | None = "openai",
    device: str | torch.device = "cpu",
    batch_size: int = 16,
) -> ClipScores:
    """Zero-shot presence of ``concept`` in ``images`` and their similarity to ``reference_images``.

    Args:
        images: PIL images (e.g. steered generations).
        reference_images: the unsteered images, one per image (same seed and prompt), or None.
        concept: the style or object, e.g. ``"a watercolor painting"`` or ``"a pink elephant"``.
        model: an open_clip model name (with ``pretrained``) or a ``(model, preprocess, tokenizer)`` triple.
        pretrained: open_clip weights tag for a model name.
        device: where to run CLIP.
        batch_size: images per CLIP forward.

    Returns:
        `ClipScores` with per-image ``presence`` and ``image_similarity``.

    Raises:
        ValueError: empty ``images``, or ``reference_images`` of another length.
        ImportError: open_clip is missing (install the ``[clip]`` extra).

    Example:
        >>> from actsteer.eval import clip_scores
        >>> scores = clip_scores(steered, unsteered, "a watercolor painting")  # doctest: +SKIP
        >>> scores.summary()  # doctest: +SKIP
        {'presence': 0.83, 'image_similarity': 0.71}
    """
    images = list(images)
    if not images:
        raise ValueError("`images` is empty")
    if reference_images is not None and len(reference_images) != len(images):
        raise ValueError(f"{len(images)} images but {len(reference_images)} reference images; give one reference per image")
    clip, preprocess, tokenizer = _load(model, pretrained, device)
    dev = next(clip.parameters()).device

    def embed_images(batch: Sequence[Any]) -> torch.Tensor:
        rows = []
        for i in range(0, len(batch), batch_size):
            pixels = torch.stack([preprocess(img) for img in batch[i : i + batch_size]]).to(dev)
            rows.append(torch.nn.functional.normalize(clip.encode_image(pixels).float(), dim=-1))
        return torch.cat(rows)

    img = embed_images(images)
    text = clip.encode_text(tokenizer([CONTRAST_PROMPT, CONCEPT_PROMPT.format(concept=concept)]).to(dev))
    text = torch.nn.functional.normalize(text.float(), dim=-1)
    scale = clip.logit_scale.exp().float() if hasattr(clip, "logit_scale") else torch.tensor(100.0)
    presence = (scale * img @ text.T).softmax(dim=-1)[:, 1].cpu()
    similarity = None
    if reference_images is not None:
        similarity = (img * embed_images(list(reference_images))).sum(-1).cpu()
    return ClipScores(presence=presence, image_similarity=similarity)
