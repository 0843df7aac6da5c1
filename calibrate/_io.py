"""Atomic file output: text, CSV and JSON written whole or not at all.

Each writer puts the content in a temporary file beside the target (same directory,
so the same file system), flushes it to disk and renames it over the target with
`os.replace`. A reader never sees a half-written file, and an interrupted run leaves
the previous version (or nothing) in place. Parent directories are created as
needed; other files in the directory are never touched.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def write_text_atomic(
    path: str | os.PathLike, text: str, *, encoding: str = "utf-8"
) -> Path:
    """Write `text` to `path` atomically; returns the path written."""
    return write_bytes_atomic(path, text.encode(encoding))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path written."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # os.open with mode 0o666 lets the umask decide the permissions, as for any new
    # file (tempfile.mkstemp would force 0o600).
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    return path


def write_csv_atomic(path: str | os.PathLike, frame: pd.DataFrame, **to_csv: Any) -> Path:
    """Write a DataFrame as CSV (no index unless `index=True` is passed) atomically.

    Floats are written with full (round-trip) precision.
    """
    to_csv.setdefault("index", False)
    to_csv.setdefault("lineterminator", "\n")
    return write_text_atomic(path, frame.to_csv(**to_csv))


def to_jsonable(obj: Any) -> Any:
    """`obj` with numpy/JAX scalars and arrays turned into plain Python values.

    Non-finite floats (NaN, inf: e.g. the standard error of an unidentifiable
    parameter) become `null`, since JSON has no literal for them.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, (str, type(None))):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "__array__"):  # numpy and JAX arrays
        array = np.asarray(obj)
        return to_jsonable(array.item() if array.ndim == 0 else array.tolist())
    raise TypeError(f"cannot write an object of type {type(obj).__name__} as JSON")


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Write `obj` as JSON atomically (see `to_jsonable` for what is accepted)."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + "\n"
    return write_text_atomic(path, text)
