"""JAX compilation: what `import calibrate` switches on (the persistent cache and XLA's
faster-compiling CPU emitters), and an account of how long tracing, lowering and XLA
compilation take inside a block of code (zero when every function it calls is already
compiled)."""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import jax
import jaxlib
from jax._src import xla_bridge


def enable_persistent_cache() -> Path | None:
    """Keep compiled executables on disk across processes, so that a second fit of
    data of the same shapes skips XLA's compilation (about half the first call of a
    population evaluation; tracing still runs). The directory is `CALIBRATE_CACHE_DIR`,
    else a directory JAX was already given (`JAX_COMPILATION_CACHE_DIR`), else
    `~/.cache/calibrate/jax` (an executable takes about 1 MB there; JAX's size bound,
    `jax_compilation_cache_max_size`, needs the `filelock` package).
    `CALIBRATE_CACHE_DIR=off` leaves JAX's own settings alone, and so does a home
    directory that cannot be written; a `CALIBRATE_CACHE_DIR` that cannot be created
    does too, with a warning naming it. Returns the directory in use, if any."""
    setting = os.environ.get("CALIBRATE_CACHE_DIR", "").strip()
    if setting.lower() == "off":
        return None
    configured = jax.config.jax_compilation_cache_dir
    if not setting and configured:
        return Path(configured)
    directory = Path(setting) if setting else Path.home() / ".cache" / "calibrate" / "jax"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if setting:
            warnings.warn(f"CALIBRATE_CACHE_DIR={setting!r}: cannot create this directory "
                          f"({error.strerror}); compiling without the persistent cache",
                          stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    return directory


# XLA's CPU compiler emits fused kernels through its MLIR pipeline by default. Its LLVM IR
# emitters, still behind this flag, do XLA's part of compiling calibrate's programs in
# 0.6-0.7 of the time, and the kernels run as fast (benchmarks/RESULTS_compile.md).
CPU_EMITTER_FLAG = "--xla_cpu_use_fusion_emitters=false"
# XLA aborts the process on a flag it does not know, so the flag goes only to the jaxlib
# releases it was measured with.
_RELEASES_WITH_FLAG = ((0, 10),)


def flag_is_known(release: tuple[int, ...] | None = None) -> bool:
    """Whether `CPU_EMITTER_FLAG` was measured with this jaxlib release (major, minor);
    `release` defaults to the installed jaxlib's."""
    if release is None:
        numbers = re.match(r"(\d+)\.(\d+)", jaxlib.__version__)
        release = tuple(map(int, numbers.groups())) if numbers else ()
    return tuple(release[:2]) in _RELEASES_WITH_FLAG


def prefer_fast_cpu_compile(release: tuple[int, ...] | None = None) -> bool:
    """Add `CPU_EMITTER_FLAG` to `XLA_FLAGS` before XLA reads them (at the first
    computation). `CALIBRATE_XLA_FLAGS` is `on` (or unset) or `off`. Left alone:
    `CALIBRATE_XLA_FLAGS=off`, an `XLA_FLAGS` that already sets
    the emitters, a process whose backends are already running (XLA has read its flags)
    and a jaxlib release other than those measured. `release` is jaxlib's (major,
    minor), read from jaxlib when not given. Returns whether the flag was added."""
    setting = os.environ.get("CALIBRATE_XLA_FLAGS", "").strip().lower()
    if setting == "off":
        return False
    if setting not in ("", "on"):
        warnings.warn(f"CALIBRATE_XLA_FLAGS={setting!r}: expected 'on' or 'off'; "
                      "taking 'on'", stacklevel=2)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_use_fusion_emitters" in flags or xla_bridge.backends_are_initialized():
        return False
    if not flag_is_known(release):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_EMITTER_FLAG}".strip()
    return True


_STAGES = ("/jax/core/compile/jaxpr_trace_duration",
           "/jax/core/compile/jaxpr_to_mlir_module_duration",
           "/jax/core/compile/backend_compile_duration")


class CompileLog:
    """Seconds spent in each compilation stage, and how many functions were lowered."""

    def __init__(self):
        self.seconds = 0.0
        self.lowered = 0

    def record(self, event: str, duration: float, **kwargs) -> None:
        if event in _STAGES:
            self.seconds += duration
            self.lowered += event == _STAGES[1]


@contextlib.contextmanager
def compilation() -> Iterator[CompileLog]:
    """`with compilation() as log: ...` then `log.seconds`, `log.lowered`."""
    log = CompileLog()
    jax.monitoring.register_event_duration_secs_listener(log.record)
    try:
        yield log
    finally:
        jax.monitoring.unregister_event_duration_listener(log.record)
