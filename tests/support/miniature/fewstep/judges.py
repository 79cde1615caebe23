"""Judges with ground truth for the few-step miniature: small CNN classifiers of style, shape, colour and position.

One CNN per attribute (3 conv layers and a linear head; style, shape and colour pool globally, position keeps the
8x8 map, since pooling would throw away where the shape is), trained on freshly rendered `styles` images with
Gaussian pixel noise (std 0 to 0.15) and tested on images they never saw. Colour is learned and judged on the
styles that keep it (not ``sepia``: its monochrome tones leave the colour undefined). Held-out accuracies are
stored in the weights file's metadata and reported in benchmarks/RESULTS.md.

Train (one thread):
    nice -n 10 python -m tests.support.miniature.fewstep.judges \
        --out tests/support/miniature/fewstep/weights/judges.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..judges import Judges as BaseJudges
from ..judges import TinyCNN
from . import styles

JUDGES_FILE = Path(__file__).resolve().parent / "weights" / "judges.safetensors"
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "style": styles.STYLES,
    "shape": styles.SHAPES,
    "colour": tuple(styles.COLOURS),
    "position": tuple(styles.POSITIONS),
}
FEATURES = ("style", "shape", "colour")  # the judges whose pooled features make the similarity embedding

logger = logging.getLogger("miniature.fewstep.judges")


class PositionCNN(TinyCNN):
    """`TinyCNN` whose head reads the whole 8x8 map (``(N, 64 * 8 * 8)``), not its spatial mean."""

    def __init__(self, classes: int) -> None:
        super().__init__(classes)
        self.head = nn.Linear(64 * (styles.SIZE // 4) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


def colour_defined(attrs: styles.Attributes | str) -> bool:
    """Whether an image of this style (or attributes) shows its colour (every style but ``sepia``)."""
    style = attrs if isinstance(attrs, str) else attrs.style
    return style not in styles.COLOUR_STYLES


class Judges(BaseJudges):
    """The four attribute classifiers together (the first miniature's `Judges` with this miniature's attributes, a
    position judge that reads the whole feature map, and its own weights file).

    Example:
        >>> judges = Judges.untrained()
        >>> images, _, attrs = styles.batch(4, np.random.default_rng(0))
        >>> sorted(judges.predict(images))
        ['colour', 'position', 'shape', 'style']
    """

    attributes = ATTRIBUTES
    default_file = JUDGES_FILE
    trainer = "tests.support.miniature.fewstep.judges"
    feature_judges = FEATURES

    @classmethod
    def make_net(cls, name: str) -> TinyCNN:
        return (PositionCNN if name == "position" else TinyCNN)(len(cls.attributes[name]))


def _labels(attrs: list[styles.Attributes]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([labels.index(getattr(a, name)) for a in attrs]) for name, labels in ATTRIBUTES.items()}


def accuracy(judges: Judges, n: int, seed: int, noise: float = 0.0, **fixed: str) -> dict[str, float]:
    """Accuracy per attribute on ``n`` fresh images (``seed``, pixel noise ``noise``); colour where defined."""
    rng = np.random.default_rng(seed)
    images, _, attrs = styles.batch(n, rng, **fixed)
    images = images + noise * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    truth = _labels(attrs)
    defined = torch.tensor([colour_defined(a) for a in attrs])
    out = {}
    for name, p in judges.probs(images).items():
        right = p.argmax(-1) == truth[name]
        if name == "colour":
            right = right[defined]
        out[name] = float(right.float().mean()) if right.numel() else float("nan")
    return out


def train(*, steps: int, batch_size: int, seed: int, lr: float = 3e-3) -> Judges:
    judges = Judges.untrained(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    params = [p for net in judges.nets.values() for p in net.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for net in judges.nets.values():
        net.train()
    for step in range(steps):
        images, _, attrs = styles.batch(batch_size, rng)
        sigma = 0.15 * torch.rand(batch_size, 1, 1, 1, generator=gen)
        images = images + sigma * torch.randn(images.shape, generator=gen)
        truth = _labels(attrs)
        defined = torch.tensor([colour_defined(a) for a in attrs])
        loss = 0.0
        for name, net in judges.nets.items():
            logits = net(images)
            if name == "colour":
                loss = loss + nn.functional.cross_entropy(logits[defined], truth[name][defined])
            else:
                loss = loss + nn.functional.cross_entropy(logits, truth[name])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            logger.info("step %d/%d  loss %.4f", step + 1, steps, float(loss))
    for net in judges.nets.values():
        net.eval()
    return judges


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=JUDGES_FILE)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--test-size", type=int, default=4000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    start, cpu = time.time(), time.process_time()
    judges = train(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    wall, cpu = time.time() - start, time.process_time() - cpu
    clean = accuracy(judges, args.test_size, seed=10_000 + args.seed)
    noisy = accuracy(judges, args.test_size, seed=20_000 + args.seed, noise=0.1)
    per_style = {s: accuracy(judges, 500, seed=30_000 + i, style=s) for i, s in enumerate(styles.STYLES)}
    judges.metadata = {
        "heldout_accuracy": json.dumps(clean), "heldout_accuracy_noise0.1": json.dumps(noisy),
        "heldout_accuracy_per_style": json.dumps(per_style),
        "test_size": str(args.test_size), "train_steps": str(args.steps), "batch_size": str(args.batch_size),
        "seed": str(args.seed), "threads": str(args.threads), "train_wall_s": f"{wall:.0f}",
        "train_cpu_s": f"{cpu:.0f}",
        "command": " ".join(["python -m tests.support.miniature.fewstep.judges",
                             *(sys.argv[1:] if argv is None else argv)]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    judges.save(args.out)
    logger.info("held-out accuracy %s; with noise 0.1 %s; per style %s; %.0f s; saved %s", clean, noisy, per_style,
                wall, args.out)


if __name__ == "__main__":
    main()
