"""Diffusion evidence in miniature: a procedural shapes dataset, a small text-to-image model trained on it, and judges.

Nothing here is part of the installed `actsteer` package. Benchmarks and tests import it with the repository
root on ``sys.path`` (``from benchmarks.miniature import shapes``). See benchmarks/RESULTS.md, "Diffusion in
miniature", for how the committed weights were made and what AcT does to the model.
"""
