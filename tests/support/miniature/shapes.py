"""The procedural dataset: 32x32 images of one shape with independent attributes, and their captions.

Every image is drawn from five independent attributes (shape, colour, style, position, size) on a white
background, so the ground truth of any generated image's intended content is known exactly. Captions name the
attributes ("a large red circle on the left, striped"); a flat fill has no style word, every other style always
has one, and size, colour and position are each left out of some captions so that the model also learns
prompts that leave them open ("a circle"). Nothing is downloaded or stored: images are rendered on the fly.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a = Attributes(shape="square", colour="blue", style="striped", position="left", size="large")
    >>> caption(a)
    'a large blue square on the left, striped'
    >>> render(a, rng).shape
    (32, 32, 3)
    >>> images, captions, attrs = batch(4, rng)
    >>> tuple(images.shape), len(captions)
    ((4, 3, 32, 32), 4)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

SIZE = 32  # image height and width in pixels
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (215, 38, 38),
    "green": (34, 150, 60),
    "blue": (36, 84, 214),
    "yellow": (232, 196, 20),
    "purple": (140, 60, 190),
}
STYLES = ("flat", "striped", "outlined", "speckled")
STYLE_PROBS = (0.4, 0.2, 0.2, 0.2)
POSITIONS = {"left": 9.0, "center": 16.0, "right": 23.0}  # x of the centre, in pixels
POSITION_WORDS = {"left": "on the left", "center": "in the center", "right": "on the right"}
SIZES = {"small": 6.0, "large": 8.5}  # radius in pixels
# Probability that a caption names the attribute (shape and non-flat styles are always named).
KEEP = {"size": 0.7, "colour": 0.8, "position": 0.7}
UNCONDITIONAL = 0.1  # fraction of training captions replaced by "" (classifier-free guidance)
BACKGROUND = 255
TINT = 0.35  # the pale second colour of striped and speckled shapes: 35% colour, 65% background


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What one image shows; each field is one of the module's vocabularies (``SHAPES``, ``COLOURS``, ...)."""

    shape: str
    colour: str
    style: str
    position: str
    size: str

    def __post_init__(self) -> None:
        for field, vocab in (("shape", SHAPES), ("colour", COLOURS), ("style", STYLES), ("position", POSITIONS),
                             ("size", SIZES)):
            if getattr(self, field) not in vocab:
                raise ValueError(f"Attributes.{field}={getattr(self, field)!r}; choose one of {list(vocab)}")


def words() -> list[str]:
    """Every word a caption can contain (the tokenizer's vocabulary), in a fixed order."""
    out = ["a", "on", "the", "in", ","]
    out += list(SIZES) + list(COLOURS) + list(SHAPES) + [s for s in STYLES if s != "flat"]
    out += [w for p in POSITION_WORDS.values() for w in p.split() if w not in out]
    return list(dict.fromkeys(out))


def caption(attrs: Attributes, *, size: bool = True, colour: bool = True, position: bool = True) -> str:
    """The caption of ``attrs``; ``size``/``colour``/``position`` False leave that attribute out.

    Example:
        >>> caption(Attributes("circle", "red", "flat", "center", "small"), size=False)
        'a red circle in the center'
    """
    parts = ["a"]
    if size:
        parts.append(attrs.size)
    if colour:
        parts.append(attrs.colour)
    parts.append(attrs.shape)
    if position:
        parts.append(POSITION_WORDS[attrs.position])
    text = " ".join(parts)
    return text if attrs.style == "flat" else f"{text}, {attrs.style}"


def training_caption(attrs: Attributes, rng: np.random.Generator) -> str:
    """A caption with the training-time dropout: attributes left out at random (``KEEP``), or ``""``."""
    if rng.random() < UNCONDITIONAL:
        return ""
    keep = {k: bool(rng.random() < p) for k, p in KEEP.items()}
    return caption(attrs, **keep)


def sample_attributes(rng: np.random.Generator, **fixed: str) -> Attributes:
    """Random attributes, independent and uniform except the style (``STYLE_PROBS``); ``fixed`` pins some."""
    values = {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": list(COLOURS)[rng.integers(len(COLOURS))],
        "style": STYLES[rng.choice(len(STYLES), p=STYLE_PROBS)],
        "position": list(POSITIONS)[rng.integers(len(POSITIONS))],
        "size": list(SIZES)[rng.integers(len(SIZES))],
    }
    unknown = set(fixed) - set(values)
    if unknown:
        raise ValueError(f"Unknown attribute(s) {sorted(unknown)}; choose from {list(values)}")
    return Attributes(**{**values, **fixed})


def _mask(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        half = 0.85 * r  # about the circle's area
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # triangle pointing up: apex at cy - r, base at cy + 0.7 r, half-width growing linearly to 1.05 r
    t = (dy + r) / (1.7 * r)
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= 1.05 * r * t)


_GRID_Y, _GRID_X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5  # pixel centres


def render(attrs: Attributes, rng: np.random.Generator) -> np.ndarray:
    """Draw ``attrs`` as a ``(32, 32, 3)`` uint8 RGB image; ``rng`` jitters position and size, and speckles.

    Styles: ``flat`` fills the shape; ``striped`` alternates 2-pixel horizontal bands of the colour and a pale
    tint of it (so the silhouette stays visible), on image rows 4k, 4k+1 (a fixed phase, so that the stripes
    show in the average image of a caption, which is what a diffusion model predicts at its noisiest step);
    ``outlined`` draws a 2-pixel border only; ``speckled`` gives each pixel of the shape the colour or the tint
    with probability 1/2 (a random texture: its average image is a flat tint).
    """
    cx = POSITIONS[attrs.position] + rng.uniform(-1.5, 1.5)
    cy = SIZE / 2 + rng.uniform(-3.0, 3.0)
    r = SIZES[attrs.size] + rng.uniform(-0.5, 0.5)
    shape = _mask(attrs.shape, _GRID_X, _GRID_Y, cx, cy, r)
    full = shape.copy()
    if attrs.style == "striped":
        full &= (_GRID_Y.astype(np.int64) // 2) % 2 == 0
    elif attrs.style == "outlined":
        shape &= ~_mask(attrs.shape, _GRID_X, _GRID_Y, cx, cy + (0.6 if attrs.shape == "triangle" else 0.0), r - 2.2)
        full = shape
    elif attrs.style == "speckled":
        full &= rng.random((SIZE, SIZE)) < 0.5
    colour = np.array(COLOURS[attrs.colour], dtype=np.float32)
    image = np.full((SIZE, SIZE, 3), BACKGROUND, dtype=np.uint8)
    image[shape] = np.round(TINT * colour + (1 - TINT) * BACKGROUND).astype(np.uint8)
    image[full] = colour.astype(np.uint8)
    return image


def to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 ``(N, 32, 32, 3)`` images -> float ``(N, 3, 32, 32)`` in [-1, 1] (the model's pixel space)."""
    arr = np.stack(list(images)) if not isinstance(images, np.ndarray) else images
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def from_tensor(images: torch.Tensor) -> np.ndarray:
    """float ``(N, 3, H, W)`` in [-1, 1] -> uint8 ``(N, H, W, 3)`` (clamped)."""
    return images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()


def batch(
    n: int, rng: np.random.Generator, *, training: bool = False, **fixed: str
) -> tuple[torch.Tensor, list[str], list[Attributes]]:
    """``n`` random images ``(n, 3, 32, 32)`` in [-1, 1], their captions and attributes.

    Args:
        n: number of images.
        rng: the random source (attributes, jitter, textures and caption dropout all come from it).
        training: captions with the training dropout (`training_caption`) instead of full captions.
        **fixed: attributes to pin (``style="striped"``).
    """
    attrs = [sample_attributes(rng, **fixed) for _ in range(n)]
    images = to_tensor([render(a, rng) for a in attrs])
    captions = [training_caption(a, rng) if training else caption(a) for a in attrs]
    return images, captions, attrs
