"""The procedural data of the few-step miniature: one shape on a 32x32 canvas in one of seven global styles.

Every image is drawn from five independent attributes (shape, colour, position, size, style). Six styles change
the whole picture, as styles do in text-to-image models; ``plain`` (a flat fill on white) has no style word:

- palette: ``pastel`` (pale colours on a pale pink paper), ``sepia`` (monochrome brown tones on cream: the
  colour is lost), ``dark`` (the colours on a near-black ground);
- texture: ``blurry`` (Gaussian blur, sigma 1.2 px: soft edges);
- rendering: ``halftone`` (dots of the colour on a fixed 4-px grid over a pale tint of it), ``outlined`` (a 2-px
  ink outline, no fill).

Captions name the attributes ("a large red circle on the left, sepia"); size, colour and position are each left
out of some training captions, and some captions are empty (classifier-free guidance). Rendered on the fly.

Example:
    >>> import numpy as np
    >>> a = Attributes(shape="square", colour="blue", position="left", size="large", style="sepia")
    >>> caption(a)
    'a large blue square on the left, sepia'
    >>> render(a, np.random.default_rng(0)).shape
    (32, 32, 3)
    >>> images, captions, attrs = batch(4, np.random.default_rng(0))
    >>> tuple(images.shape), len(captions)
    ((4, 3, 32, 32), 4)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (215, 38, 38),
    "green": (34, 150, 60),
    "blue": (36, 84, 214),
    "yellow": (232, 196, 20),
    "purple": (140, 60, 190),
}
POSITIONS = {"left": 9.0, "center": 16.0, "right": 23.0}  # x of the centre, in pixels
POSITION_WORDS = {"left": "on the left", "center": "in the center", "right": "on the right"}
SIZES = {"small": 6.0, "large": 8.5}  # radius in pixels
STYLES = ("plain", "pastel", "sepia", "dark", "blurry", "halftone", "outlined")
STYLE_PROBS = (0.28, 0.12, 0.12, 0.12, 0.12, 0.12, 0.12)
STYLE_GROUPS = {"palette": ("pastel", "sepia", "dark"), "texture": ("blurry",), "rendering": ("halftone", "outlined")}
COLOUR_STYLES = ("sepia",)  # styles that change the colour: colour is not judged against the twin there
KEEP = {"size": 0.7, "colour": 0.8, "position": 0.7}  # probability that a training caption names the attribute
UNCONDITIONAL = 0.1  # fraction of training captions replaced by "" (classifier-free guidance)
WHITE = np.array((255, 255, 255), dtype=np.float32)
PASTEL_PAPER = np.array((246, 226, 236), dtype=np.float32)
DARK_GROUND = np.array((22, 22, 34), dtype=np.float32)
SEPIA_TONE = np.array((1.0, 0.87, 0.68), dtype=np.float32)  # times the luminance
BLUR_SIGMA = 1.2
# Jitter (pixels) of the centre and radius: small, so that a full caption nearly determines its picture and the
# first step of a few-step sampler (the caption's average picture) already draws it (see model.py)
JITTER = {"x": 1.0, "y": 1.0, "size": 0.3}
HALFTONE_TINT = 0.25  # the paper between the dots: 25% colour, 75% white (the silhouette stays readable)


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What one image shows; each field is one of the module's vocabularies."""

    shape: str
    colour: str
    position: str
    size: str
    style: str = "plain"

    def __post_init__(self) -> None:
        for field, vocab in (("shape", SHAPES), ("colour", COLOURS), ("position", POSITIONS), ("size", SIZES),
                             ("style", STYLES)):
            if getattr(self, field) not in vocab:
                raise ValueError(f"Attributes.{field}={getattr(self, field)!r}; choose one of {list(vocab)}")


def words() -> list[str]:
    """Every word a caption can contain (the tokenizer's vocabulary), in a fixed order."""
    out = ["a", "on", "the", "in", ","]
    out += list(SIZES) + list(COLOURS) + list(SHAPES) + [s for s in STYLES if s != "plain"]
    out += [w for p in POSITION_WORDS.values() for w in p.split() if w not in out]
    return list(dict.fromkeys(out))


def caption(attrs: Attributes, *, size: bool = True, colour: bool = True, position: bool = True,
            style: bool = True) -> str:
    """The caption of ``attrs``; a False flag leaves that attribute out (``style=False``: no style word).

    Example:
        >>> caption(Attributes("circle", "red", "center", "small", "dark"), size=False)
        'a red circle in the center, dark'
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
    return text if attrs.style == "plain" or not style else f"{text}, {attrs.style}"


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
        "position": list(POSITIONS)[rng.integers(len(POSITIONS))],
        "size": list(SIZES)[rng.integers(len(SIZES))],
        "style": STYLES[rng.choice(len(STYLES), p=STYLE_PROBS)],
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
        half = 0.85 * r
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    t = (dy + r) / (1.7 * r)  # triangle pointing up
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= 1.05 * r * t)


_GRID_Y, _GRID_X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
# halftone: plus-shaped 5-pixel dots on a fixed 4-pixel grid (fixed phase, like a printing screen)
_DOTS = ((_GRID_X % 4 - 1.5) ** 2 + (_GRID_Y % 4 - 1.5) ** 2) <= 1.2 ** 2


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    radius = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(k[i] * padded[:, i:i + SIZE] for i in range(len(k)))
    return sum(k[i] * rows[i:i + SIZE] for i in range(len(k)))


def render(attrs: Attributes, rng: np.random.Generator) -> np.ndarray:
    """Draw ``attrs`` as a ``(32, 32, 3)`` uint8 RGB image; ``rng`` jitters the position and size."""
    cx = POSITIONS[attrs.position] + rng.uniform(-JITTER["x"], JITTER["x"])
    cy = SIZE / 2 + rng.uniform(-JITTER["y"], JITTER["y"])
    r = SIZES[attrs.size] + rng.uniform(-JITTER["size"], JITTER["size"])
    mask = _mask(attrs.shape, _GRID_X, _GRID_Y, cx, cy, r)
    colour = np.array(COLOURS[attrs.colour], dtype=np.float32)
    ground = WHITE
    if attrs.style == "outlined":
        inner = _mask(attrs.shape, _GRID_X, _GRID_Y, cx, cy + (0.6 if attrs.shape == "triangle" else 0.0), r - 2.2)
        mask = mask & ~inner
    elif attrs.style == "halftone":
        image = np.broadcast_to(ground, (SIZE, SIZE, 3)).copy()
        image[mask] = HALFTONE_TINT * colour + (1 - HALFTONE_TINT) * ground
        mask = mask & _DOTS
    elif attrs.style == "pastel":
        colour, ground = 0.5 * colour + 0.5 * WHITE, PASTEL_PAPER
    elif attrs.style == "dark":
        ground = DARK_GROUND
    if attrs.style != "halftone":
        image = np.broadcast_to(ground, (SIZE, SIZE, 3)).copy()
    image[mask] = colour
    if attrs.style == "sepia":
        luminance = image @ np.array((0.299, 0.587, 0.114), dtype=np.float32)
        image = luminance[..., None] * SEPIA_TONE
    elif attrs.style == "blurry":
        image = _blur(image, BLUR_SIGMA)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def to_tensor(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 ``(N, 32, 32, 3)`` images -> float ``(N, 3, 32, 32)`` in [-1, 1] (the model's pixel space)."""
    arr = np.stack(list(images)) if not isinstance(images, np.ndarray) else images
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def from_tensor(images: torch.Tensor) -> np.ndarray:
    """float ``(N, 3, H, W)`` in [-1, 1] -> uint8 ``(N, H, W, 3)`` (clamped)."""
    return images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy()


def batch(n: int, rng: np.random.Generator, *, training: bool = False, **fixed: str
          ) -> tuple[torch.Tensor, list[str], list[Attributes]]:
    """``n`` random images ``(n, 3, 32, 32)`` in [-1, 1], their captions and attributes.

    Args:
        n: number of images.
        rng: the random source (attributes, jitter and caption dropout all come from it).
        training: captions with the training dropout (`training_caption`) instead of full captions.
        **fixed: attributes to pin (``style="dark"``).
    """
    attrs = [sample_attributes(rng, **fixed) for _ in range(n)]
    images = to_tensor([render(a, rng) for a in attrs])
    captions = [training_caption(a, rng) if training else caption(a) for a in attrs]
    return images, captions, attrs
