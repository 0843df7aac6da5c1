"""Which model a problem means: a zoo name or `path/to/file.py:ClassName`."""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ._model import AbstractODEModel
from ._zoo import zoo_module, zoo_names


class ModelSpecError(ValueError):
    """A model specification that names no usable model class."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass
class ResolvedModel:
    model: AbstractODEModel
    module: ModuleType | None  # the zoo module or the user's file, if any
    spec: str  # what the user typed

    @property
    def default_times(self):
        return getattr(self.module, "OBSERVATION_TIMES", None)


def _is_file_spec(spec: str) -> bool:
    return ":" in spec or spec.endswith(".py") or "/" in spec or os.sep in spec


def _import_file(path: Path) -> ModuleType:
    if not path.exists():
        raise ModelSpecError(f"{path}: model file not found")
    if not path.is_file():
        raise ModelSpecError(f"{path}: not a file")
    name = f"calibrate_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    # Let the file import its siblings, as `python file.py` would.
    sys.path.insert(0, str(path.resolve().parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as error:
        sys.modules.pop(name, None)
        where = ""
        if isinstance(error, SyntaxError) and error.lineno:
            where = f", line {error.lineno}"
        else:
            lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
                     if Path(f.filename).resolve() == path.resolve()]
            if lines:
                where = f", line {lines[-1]}"
        raise ModelSpecError(
            f"{path}{where}: importing the model file failed: "
            f"{type(error).__name__}: {error}"
        ) from None
    finally:
        try:
            sys.path.remove(str(path.resolve().parent))
        except ValueError:  # the file removed it itself
            pass
    return module


def _model_classes(module: ModuleType) -> list[str]:
    return sorted(
        name for name, obj in vars(module).items()
        if isinstance(obj, type) and issubclass(obj, AbstractODEModel)
        and obj is not AbstractODEModel and obj.__module__ == module.__name__
    )


def resolve_model(spec: str, base: str | os.PathLike | None = None) -> ResolvedModel:
    """A zoo name, `path/to/file.py:ClassName`, `path/to/file.py` (its `MODEL`), or an
    SBML file (`.xml`/`.sbml`; its species are the observables).

    Relative file paths are taken from `base` (a directory) when given.
    """
    spec = spec.strip()
    if spec.lower().endswith((".xml", ".sbml")):
        from ._sbml import SBMLError, load_sbml

        path = Path(spec)
        if base is not None and not path.is_absolute():
            path = Path(base) / path
        try:
            return ResolvedModel(load_sbml(path), None, spec)
        except SBMLError as error:
            raise ModelSpecError(str(error)) from None
    if not _is_file_spec(spec):
        try:
            module = zoo_module(spec)
        except KeyError as error:  # its message names the available models
            raise ModelSpecError(
                f"{error.args[0]}{did_you_mean(spec, zoo_names())}; or give "
                "path/to/file.py:ClassName"
            ) from None
        return ResolvedModel(module.MODEL(), module, spec)
    path_text, _, class_name = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if ":" in spec and not path_text:
        raise ModelSpecError(f"model {spec!r}: expected path/to/file.py:ClassName")
    path = Path(path_text)
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    module = _import_file(path)
    classes = _model_classes(module)
    if not class_name:
        if isinstance(getattr(module, "MODEL", None), type):
            class_name = module.MODEL.__name__
            cls = module.MODEL
        elif len(classes) == 1:
            class_name = classes[0]
            cls = getattr(module, class_name)
        else:
            found = ", ".join(classes) or "none"
            raise ModelSpecError(
                f"{path}: name the model class as {path}:ClassName (model classes found: "
                f"{found})"
            )
    else:
        if not class_name.isidentifier():
            raise ModelSpecError(f"model {spec!r}: {class_name!r} is not a class name")
        cls = getattr(module, class_name, None)
        if cls is None:
            found = ", ".join(classes) or "none"
            raise ModelSpecError(
                f"{path}: no class {class_name!r}{did_you_mean(class_name, classes)}; "
                f"model classes found: {found}"
            )
    if not (isinstance(cls, type) and issubclass(cls, AbstractODEModel)):
        raise ModelSpecError(
            f"{path}: {class_name} is not a subclass of calibrate.AbstractODEModel"
        )
    try:
        model = cls()
    except Exception as error:
        raise ModelSpecError(
            f"{path}: creating {class_name}() failed: {type(error).__name__}: {error}"
        ) from None
    return ResolvedModel(model, module, spec)
