"""Diffusion evidence in miniature: a procedural shapes dataset, a small text-to-image model trained on it, and judges.

Nothing here is part of the installed `actsteer` package. Tests import it as ``support.miniature``; benchmarks, run
from the repository root as modules, as ``tests.support.miniature`` (``python -m benchmarks.diffusion_style``). See
benchmarks/RESULTS.md, "Diffusion in miniature", for how the committed weights were made and what AcT does to
the model.
"""
