"""Argument types and pre-flight checks of the ``actsteer`` command, and its one-line error messages.

Everything here runs before a model is loaded, so a bad argument, an unreadable input or an unwritable output
fails in a second rather than after a fit of several minutes.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from ..core import check_strength, shorten
from .texts import check_texts, read_texts


class CliError(Exception):
    """A user-facing failure: its message is one line that names the file or argument and the cause."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage errors exit 2, like every other failure of the command)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def finite_float(value: str) -> float:
    """A strength from the command line: a finite number (``nan``/``inf`` would corrupt every activation) within
    the core's bound (`actsteer.core.steering.MAX_STRENGTH`).

    Example:
        >>> finite_float("0.5")
        0.5
        >>> finite_float("nan")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: a strength must be a finite number, got 'nan'
    """
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.5, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"a strength must be a finite number, got {value!r}")
    try:
        return check_strength(number)  # the core's rules (e.g. its magnitude bound), before any model loads
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_floats(value: str) -> list[float]:
    """Comma-separated finite numbers (``0,0.5,1``), at least one."""
    numbers = [finite_float(v.strip()) for v in value.split(",") if v.strip()]
    if not numbers:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0,0.5,1, got {value!r}")
    return numbers


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def parse_support(value: str) -> Any:
    if value in ("observed", "all"):
        return value
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"support must be 'observed', 'all' or 'q_lo,q_hi' (e.g. 0.01,0.99), got {value!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise argparse.ArgumentTypeError(f"a quantile band needs 0 <= q_lo < q_hi <= 1, got {value!r}")
    return (lo, hi)


def parse_option(value: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of a method option: the value as an int, else a float, else the text (``steps=60``)."""
    key, sep, raw = value.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. steps=60 or knots=16), got {value!r}")
    for kind in (int, float):
        try:
            return key.strip(), kind(raw)
        except ValueError:
            pass
    return key.strip(), raw.strip()


def check_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Method options checked before any model loads (``knots`` for quantile, `LineasConfig` fields for lineas)."""
    from ..core import lineas_config

    if method == "lineas":
        try:
            lineas_config(options)
        except (TypeError, ValueError) as err:
            raise CliError(f"--option: {err}") from None
    elif method == "quantile":
        unknown = sorted(set(options) - {"knots"})
        knots = options.get("knots", 2)
        if unknown or isinstance(knots, bool) or not isinstance(knots, int) or knots < 2:
            raise CliError(f"--option: method quantile takes knots=N (an integer >= 2), got {options}")
    return options


def check_output(output: str | Path, *, overwrite: bool) -> Path:
    """The transport file ``-o`` names, checked before any model is loaded: a ``.safetensors`` name (added when
    there is no suffix), not a directory, not an existing file unless ``overwrite``, in a writable folder."""
    path = Path(output).expanduser()
    if path.name in ("", ".", ".."):
        raise CliError(f"{output}: give a file name such as ocean.safetensors")
    if path.is_dir():
        raise CliError(f"{path} is a directory; give a file name such as {path / 'ocean.safetensors'}")
    if not path.suffix:
        path = path.with_name(path.name + ".safetensors")
    elif path.suffix != ".safetensors":
        raise CliError(f"{path}: transport files are .safetensors files; use -o {path.with_suffix('.safetensors')}")
    if path.is_dir():
        raise CliError(f"{path} is a directory; give a file name such as {path / 'ocean.safetensors'}")
    if path.exists() and not overwrite:
        raise CliError(f"{path} exists; pass --overwrite to replace it, or choose another name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CliError(f"{path}: {folder} is a file, not a folder")
    try:  # the one reliable test of writability (os.access lies for root and on network file systems)
        fd, probe = tempfile.mkstemp(prefix=".actsteer-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CliError(f"{path}: cannot write to {folder} ({err.strerror or err})") from None
    return path


def read_examples(path: str, what: str) -> list[str]:
    """The texts of ``--source``/``--target``, checked like fit_lm checks them (the message names the file)."""
    texts = read_texts(path)
    try:
        return check_texts(path, texts)
    except (TypeError, ValueError) as err:
        raise CliError(f"{what}: {err}") from None


def one_line(err: BaseException) -> str:
    """An exception as one line: an OS error as ``file: cause``, anything else as its message, whitespace
    collapsed and cut to a readable length."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        text = f"{err.filename}: {err.strerror}"
    elif isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    else:
        text = str(err) or type(err).__name__
    if not isinstance(err, (CliError, ValueError, KeyError, TypeError, OSError, ImportError)):
        text = f"{type(err).__name__}: {text}"
    return shorten(" ".join(text.split()), 400)
