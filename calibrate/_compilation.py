"""Accounting of JAX compilation: how long tracing, lowering and XLA compilation take
inside a block of code (zero when every function it calls is already compiled)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax


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
