"""Example texts and prompts: reading them from files and the checks every fitting entry point applies.

`fit_lm`, `fit_pipeline` and the ``actsteer fit`` command refuse the same bad input with the same messages:
a bare string instead of a list, non-strings, empty texts, fewer than 2 a side, very unbalanced sides.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# More than this ratio between the two list sizes is almost always a mistake (a wrong file, a truncated list).
MAX_IMBALANCE = 10.0


def check_texts(name: str, texts: Sequence[str]) -> list[str]:
    """Validate one list of texts (or prompts): a list of non-empty strings, at least 2 of them.

    Args:
        name: the argument's name, used in the messages (``"source_texts"``, ``"target_prompts"``).
        texts: the list.

    Returns:
        The texts as a new list.

    Raises:
        TypeError: a single string (it would be read one character per text), or an item that is not a string.
        ValueError: empty or whitespace-only texts, or fewer than 2.

    Example:
        >>> check_texts("source_prompts", "a photo of a cat")
        Traceback (most recent call last):
        ...
        TypeError: `source_prompts` must be a list of texts, got a single string; wrap it in a list, or split it into lines
    """
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"`{name}` must be a list of texts, got a single string; wrap it in a list, or split it into lines")
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"`{name}` must be a list of texts, got {type(texts).__name__}") from None
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"`{name}` must contain strings; item {bad[0]} is a {type(texts[bad[0]]).__name__}")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"`{name}` has {len(empty)} empty text(s) (first at index {empty[0]}); remove them")
    if len(texts) < 2:
        raise ValueError(f"`{name}` needs at least 2 texts to estimate a distribution, got {len(texts)}; a few dozen work well")
    return texts


def check_balance(n_source: int, n_target: int) -> None:
    """Refuse source/target lists whose sizes differ by more than `MAX_IMBALANCE` times.

    Raises:
        ValueError: naming both sizes.
    """
    ratio = max(n_source, n_target) / min(n_source, n_target)
    if ratio > MAX_IMBALANCE:
        raise ValueError(
            f"The text lists are very unbalanced ({n_source} source vs {n_target} target, {ratio:.0f}x); "
            f"give each side a similar number of examples (within {MAX_IMBALANCE:.0f}x)"
        )


def _text_of(item: Any, where: str) -> str:
    text = item.get("text") if isinstance(item, dict) else item
    if not isinstance(text, str):
        raise ValueError(f"{where} must be a JSON string or an object with a 'text' string")
    return text


def read_texts(path: str | Path) -> list[str]:
    """Texts from a UTF-8 file.

    - ``.json``: one JSON array (pretty-printed or not) of strings or ``{"text": ...}`` objects;
    - ``.jsonl``: one JSON string or ``{"text": ...}`` object per line (blank lines skipped);
    - anything else: one example per line (blank lines skipped).

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError: the file cannot be opened (the message names it).
        ValueError: not UTF-8 text, or invalid JSON (the message names the file and the line).

    Example:
        >>> import json, pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "ocean.json"
        >>> _ = path.write_text(json.dumps(["The waves.", {"text": "A reef."}], indent=2))
        >>> read_texts(path)
        ['The waves.', 'A reef.']
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a text file")
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        content = path.read_text(encoding="utf-8-sig")  # -sig: a BOM written by some editors is not text
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); save it as UTF-8"
        ) from None
    except PermissionError:
        raise PermissionError(f"{path}: permission denied; check the file's permissions") from None
    except OSError as err:
        raise OSError(f"{path}: cannot be read ({err.strerror or err})") from None
    if path.suffix.lower() == ".json":
        try:
            items = json.loads(content)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno} is not valid JSON ({err.msg}); a .json file holds one array of texts") from None
        if not isinstance(items, list):
            raise ValueError(f"{path} must hold a JSON array of texts, got a JSON {type(items).__name__}")
        return [_text_of(item, f"{path}: item {i}") for i, item in enumerate(items)]
    lines = [(i, line) for i, line in enumerate(content.splitlines(), 1) if line.strip()]
    if path.suffix.lower() != ".jsonl":
        return [line for _, line in lines]
    texts = []
    for i, line in lines:
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{i} is not valid JSON ({err.msg}); a .jsonl file holds one JSON text per line") from None
        texts.append(_text_of(item, f"{path}:{i}"))
    return texts
