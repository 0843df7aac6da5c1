"""The model zoo: ready models in `models/` (shipped inside the package).

Each zoo file defines one model class and, at module level, `MODEL` (the class),
`TRUE_PARAMETERS` (ground truth for synthetic data), `OBSERVATION_TIMES` and
`synthetic_data(key, n_individuals=1, variability=0.0)`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from ._model import AbstractODEModel


def zoo_directory() -> Path:
    """`calibrate/_models` in an installed wheel, else `models/` beside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_models", here.parent / "models"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("the model zoo is missing from this installation")


def zoo_names() -> list[str]:
    return sorted(
        p.stem for p in zoo_directory().glob("*.py") if not p.stem.startswith("_")
    )


def zoo_module(name: str) -> ModuleType:
    """Import a zoo model file once (cached so its classes keep their identity)."""
    names = zoo_names()
    if name not in names:
        raise KeyError(f"no zoo model {name!r}; available: {', '.join(names)}")
    module_name = f"calibrate.zoo.{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = zoo_directory() / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def zoo_model(name: str) -> AbstractODEModel:
    """An instance of the zoo model `name` (see `zoo_names()`)."""
    return zoo_module(name).MODEL()


def zoo_catalogue() -> list[tuple[str, str]]:
    """(name, one-line description) of every zoo model."""
    return [(name, zoo_model(name).describe()) for name in zoo_names()]
