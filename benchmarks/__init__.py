"""actsteer's benchmarks: scripts that measure cost and effect, and write what they found (benchmarks/RESULTS.md).

A package, not part of the installed `actsteer`: run each from the repository root as a module,
``python -m benchmarks.NAME [...]`` (each file's docstring gives its command), so that they import one another as
``benchmarks.*`` and the test helpers they share with the tests (tiny pipelines, the ComfyUI harness, the
miniature) as ``tests.support.*``, with no ``sys.path`` edits.
"""
