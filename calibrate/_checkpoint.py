"""Checkpoints of the outer loop, so an interrupted calibration resumes where it was.

A checkpoint is one file, replaced atomically after every `every` outer steps. It
holds the position (θ and the inner solutions that warm-start the next fits), the
outer optimiser's full state (BFGS's inverse-Hessian estimate, optax's moments) and
the history so far, so a resumed run takes exactly the steps the uninterrupted run
would have taken and reaches the same result. A `fingerprint` of the problem (data,
settings) is stored with it; resuming a different problem is refused.

Layout: one JSON line (metadata and the byte lengths of the parts), then the
position, the optimiser state and any attachment (the population fit's warm-start
records) as equinox-serialised leaves.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import equinox as eqx

from ._io import to_jsonable, write_bytes_atomic


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of another problem."""


def _serialise(tree) -> bytes:
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, tree)
    return buffer.getvalue()


class Checkpoint:
    """Where and how often the outer loop saves itself.

    **Arguments:**

    - `path`: the checkpoint file.
    - `every`: save after every `every` accepted outer steps.
    - `fingerprint`: identifies the problem (e.g. a hash of data and settings).
    """

    def __init__(self, path: str | Path, every: int = 1, fingerprint: str = ""):
        if every < 1:
            raise ValueError(f"checkpoint every must be a positive integer, got {every}")
        self.path = Path(path)
        self.every = int(every)
        self.fingerprint = fingerprint
        self._extra: Callable[[], Mapping[str, Any]] | None = None
        self._attached: Callable[[], Any] | None = None

    def _copy(self) -> Checkpoint:
        copy = Checkpoint(self.path, self.every, self.fingerprint)
        copy._extra, copy._attached = self._extra, self._attached
        return copy

    def with_meta(self, extra: Callable[[], Mapping[str, Any]]) -> Checkpoint:
        """A copy that adds `extra()` to the metadata of every save."""
        copy = self._copy()
        copy._extra = extra
        return copy

    def with_attachment(self, attached: Callable[[], Any]) -> Checkpoint:
        """A copy that also saves the arrays `attached()` (read back by `attachment`)."""
        copy = self._copy()
        copy._attached = attached
        return copy

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, position, optimiser_state, meta: Mapping[str, Any]) -> None:
        blobs = [_serialise(position), _serialise(optimiser_state)]
        if self._attached is not None:
            blobs.append(_serialise(self._attached()))
        extra = dict(self._extra()) if self._extra is not None else {}
        header = {"format": "calibrate-checkpoint-1", "fingerprint": self.fingerprint,
                  "step": int(step), "sizes": [len(b) for b in blobs],
                  **to_jsonable({**extra, **meta})}
        data = json.dumps(header).encode() + b"\n" + b"".join(blobs)
        write_bytes_atomic(self.path, data)

    def _read(self) -> tuple[dict, bytes]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no checkpoint to resume from") from None
        line, _, rest = raw.partition(b"\n")
        try:
            header = json.loads(line)
        except ValueError:
            raise CheckpointError(f"{self.path}: not a calibrate checkpoint") from None
        if header.get("format") != "calibrate-checkpoint-1":
            raise CheckpointError(f"{self.path}: not a calibrate checkpoint")
        if header.get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"{self.path}: the checkpoint belongs to another problem (its data or "
                "settings differ); remove it or run without --resume")
        if sum(header["sizes"]) != len(rest):
            raise CheckpointError(f"{self.path}: the checkpoint is truncated")
        return header, rest

    def meta(self) -> dict:
        """The metadata (step, history, ...) of the saved checkpoint."""
        return self._read()[0]

    def _part(self, index: int, template):
        header, rest = self._read()
        sizes = header["sizes"]
        if index >= len(sizes):
            return None
        start = sum(sizes[:index])
        return eqx.tree_deserialise_leaves(
            io.BytesIO(rest[start: start + sizes[index]]), template)

    def position(self, template):
        return self._part(0, template)

    def optimiser_state(self, template):
        return self._part(1, template)

    def attachment(self, template):
        """What `with_attachment` saved, shaped like `template`; None if nothing was."""
        return self._part(2, template)
