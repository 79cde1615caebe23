"""Judges with ground truth: tiny CNN classifiers of style, shape and colour, trained on the procedural shapes.

One small CNN per attribute (3 conv layers, global average pooling, a linear head; about 25 k parameters each)
is trained on freshly rendered images with Gaussian pixel noise (std 0 to 0.15, so that slightly noisy samples of
the diffusion model are still judged) and tested on images it never saw. The held-out accuracies are stored in
the weights file's metadata and reported in benchmarks/RESULTS.md.

Train (13 min wall on 2 CPU cores shared with 4-6 other jobs, one thread; see benchmarks/RESULTS.md):
    nice -n 10 .venv/bin/python -m tests.support.miniature.judges --out tests/support/miniature/weights/judges.safetensors
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

from . import shapes

JUDGES_FILE = Path(__file__).resolve().parent / "weights" / "judges.safetensors"
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "style": shapes.STYLES,
    "shape": shapes.SHAPES,
    "colour": tuple(shapes.COLOURS),
}

logger = logging.getLogger("miniature.judges")


class TinyCNN(nn.Module):
    """``(N, 3, 32, 32)`` images in [-1, 1] -> ``(N, classes)`` logits; `features` gives the pooled ``(N, 64)``."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(64, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Judges:
    """The three attribute classifiers together.

    Example:
        >>> judges = Judges.untrained()
        >>> images, _, attrs = shapes.batch(4, np.random.default_rng(0))
        >>> sorted(judges.predict(images))
        ['colour', 'shape', 'style']
    """

    attributes: dict[str, tuple[str, ...]] = ATTRIBUTES  # attribute -> its labels (a subclass's miniature: its own)
    default_file: Path = JUDGES_FILE
    trainer = "tests.support.miniature.judges"  # the module that trains them (named in the missing-file error)
    feature_judges: tuple[str, ...] | None = None  # the judges whose features make `features` (None: all)

    def __init__(self, nets: dict[str, TinyCNN], metadata: dict[str, str] | None = None) -> None:
        self.nets = nets
        self.metadata = dict(metadata or {})

    @classmethod
    def make_net(cls, name: str) -> TinyCNN:
        return TinyCNN(len(cls.attributes[name]))

    @classmethod
    def untrained(cls, seed: int = 0) -> Judges:
        torch.manual_seed(seed)
        return cls({name: cls.make_net(name).eval() for name in cls.attributes})

    @classmethod
    def load(cls, path: str | Path | None = None) -> Judges:
        """Load trained judges (`default_file` by default).

        Raises:
            FileNotFoundError: the file is missing; train the judges with ``python -m <trainer>``.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(cls.default_file if path is None else path)
        if not path.is_file():
            raise FileNotFoundError(f"No judges at {path}: run `python -m {cls.trainer} --out {path}`")
        state = load_file(path)
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        judges = cls.untrained()
        for name, net in judges.nets.items():
            net.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == name})
        judges.metadata = metadata
        return judges

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        state = {f"{name}.{k}": v.contiguous() for name, net in self.nets.items() for k, v in net.state_dict().items()}
        save_file(state, str(path), metadata=self.metadata)

    @torch.no_grad()
    def probs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Class probabilities per attribute for ``(N, 3, 32, 32)`` images in [-1, 1]."""
        return {name: net(images.float()).softmax(dim=-1) for name, net in self.nets.items()}

    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """The most likely label per attribute, for ``(N, 3, 32, 32)`` images in [-1, 1]."""
        probs = self.probs(images)
        return {name: [self.attributes[name][i] for i in p.argmax(dim=-1).tolist()] for name, p in probs.items()}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """A perceptual embedding ``(N, 192)``: three judges' pooled features (`feature_judges`), each L2-normalised."""
        names = self.feature_judges or tuple(self.nets)
        feats = [nn.functional.normalize(self.nets[n].features(images.float()), dim=-1) for n in names]
        return torch.cat(feats, dim=-1) / len(feats) ** 0.5


def _labels(attrs: list[shapes.Attributes]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([labels.index(getattr(a, name)) for a in attrs]) for name, labels in ATTRIBUTES.items()}


def accuracy(judges: Judges, n: int, seed: int, noise: float = 0.0) -> dict[str, float]:
    """Accuracy per attribute on ``n`` fresh procedural images (``seed``), with Gaussian pixel noise ``noise``."""
    rng = np.random.default_rng(seed)
    images, _, attrs = shapes.batch(n, rng)
    gen = torch.Generator().manual_seed(seed)
    images = images + noise * torch.randn(images.shape, generator=gen)
    truth = _labels(attrs)
    return {name: float((p.argmax(-1) == truth[name]).float().mean()) for name, p in judges.probs(images).items()}


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
        images, _, attrs = shapes.batch(batch_size, rng)
        sigma = 0.15 * torch.rand(batch_size, 1, 1, 1, generator=gen)
        images = images + sigma * torch.randn(images.shape, generator=gen)
        truth = _labels(attrs)
        loss = sum(nn.functional.cross_entropy(net(images), truth[name]) for name, net in judges.nets.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            logger.info("step %d/%d  loss %.4f", step + 1, steps, loss.item())
    for net in judges.nets.values():
        net.eval()
    return judges


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=JUDGES_FILE)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--test-size", type=int, default=3000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    start = time.time()
    judges = train(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    wall = time.time() - start
    # held-out images: a seed the training stream never uses (training draws from `seed`)
    clean = accuracy(judges, args.test_size, seed=10_000 + args.seed)
    noisy = accuracy(judges, args.test_size, seed=20_000 + args.seed, noise=0.1)
    judges.metadata = {
        "heldout_accuracy": json.dumps(clean), "heldout_accuracy_noise0.1": json.dumps(noisy),
        "test_size": str(args.test_size), "train_steps": str(args.steps), "batch_size": str(args.batch_size),
        "seed": str(args.seed), "threads": str(args.threads), "train_wall_s": f"{wall:.0f}",
        "command": " ".join(["python -m tests.support.miniature.judges", *(sys.argv[1:] if argv is None else argv)]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    judges.save(args.out)
    logger.info("held-out accuracy %s; with noise 0.1 %s; %.0f s; saved %s", clean, noisy, wall, args.out)


if __name__ == "__main__":
    main()
