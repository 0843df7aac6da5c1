"""Run-time outcomes of solves and fits, as an enumeration whose items are messages.

`RESULTS` extends diffrax's (and so optimistix's and lineax's) results, so a code
coming out of any layer of the stack is one of ours. Batched code carries these as
integer arrays; `result_name` / `result_message` turn one code back into words.
"""

from __future__ import annotations

import diffrax as dfx


class RESULTS(dfx.RESULTS):  # pyright: ignore[reportGeneralTypeIssues]
    successful = ""
    nonfinite_state = (
        "The ODE solution became non-finite (NaN or inf). The parameters may make the "
        "model blow up; check bounds, or tighten the solver tolerances."
    )
    nonfinite_likelihood = (
        "The likelihood is not finite: a prediction is invalid for the noise model "
        "(e.g. a non-positive prediction under log-normal noise)."
    )
    fit_not_converged = (
        "The optimiser stopped before meeting its tolerance (max_steps reached or no "
        "further progress). Try more steps, other start points, or check identifiability."
    )


def _items():
    return RESULTS._name_to_item.items()  # pyright: ignore


def result_code(item) -> int:
    """Integer code of a `RESULTS` item (or of an array holding one)."""
    return int(item._value) if hasattr(item, "_value") else int(item)


def result_name(code) -> str:
    """Short name (`"successful"`, `"max_steps_reached"`, ...) of a result code."""
    code = result_code(code)
    for name, item in _items():
        if int(item._value) == code:
            return name
    return f"unknown_{code}"


def result_message(code) -> str:
    """The explanation of a result code (`"ok"` on success)."""
    return RESULTS[getattr(RESULTS, result_name(code))] or "ok"
