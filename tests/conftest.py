import os
from pathlib import Path

import jax
import pytest


jax.config.update("jax_enable_x64", True)
# Compiled executables persist across test runs (and processes) on this machine.
_CACHE = Path(os.environ.get("CALIBRATE_TEST_CACHE", Path(__file__).parent.parent / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

import calibrate  # noqa: E402


@pytest.fixture(scope="session")
def zoo():
    """Zoo modules by name (imported once per session so compiled functions are shared)."""
    return {name: calibrate.zoo_module(name) for name in calibrate.zoo_names()}
