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
    inner_not_stationary = (
        "The inner optimum is not stationary (the gradient of the inner loss is above "
        "tolerance), so the implicit-function hypergradient does not hold there. Tighten "
        "the inner solver's tolerances or raise its max_steps."
    )
    neumann_divergent = (
        "The Neumann series for the inverse Hessian cannot converge: the spectral radius "
        "of I - step_size * H is >= 1. Lower the step size below 2 / (largest Hessian "
        "eigenvalue), or use a direct or conjugate-gradient solve."
    )
    hessian_solve_inaccurate = (
        "The linear system with the inner Hessian was not solved accurately (large "
        "residual, singular or indefinite Hessian). The inner optimum may be a saddle or "
        "poorly identified; try a direct solve, or regularise the inner problem."
    )
    near_kink = (
        "A non-smooth penalty sits at a kink: a component is on the boundary between "
        "zero and non-zero, where the hypergradient is not defined (it depends on the "
        "smoothing width). Move the penalty strength, or treat the value as one-sided."
    )
    no_steady_state = (
        "No steady state was reached: the state still changes at the end of the "
        "pre-equilibration. The model may oscillate or grow without bound at these "
        "parameters, or need more max_steps."
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
