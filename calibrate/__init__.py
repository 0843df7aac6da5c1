"""calibrate: calibrate ODE models of biological systems to data, with JAX.

Float64 is switched on at import: stiff kinetics and their sensitivities need it.

Runtime checks inside equinox/lineax/optimistix return NaN instead of raising
(`EQX_ON_ERROR=nan`) unless the user set `EQX_ON_ERROR`: in a vmapped batch, lanes
that have already finished keep executing solver bodies on frozen, sometimes
non-finite, values, and a raising check there would abort every individual for
garbage that is discarded anyway. Failures are reported through `RESULTS` codes.

Compiled executables are kept on disk across processes (`~/.cache/calibrate/jax`;
`CALIBRATE_CACHE_DIR` moves it, `off` disables it; a directory JAX was already given
is used as it is).
"""

import os


__version__ = "0.1.0"


if "EQX_ON_ERROR" not in os.environ:
    os.environ["EQX_ON_ERROR"] = "nan"
    import equinox._config
    import equinox._errors

    # equinox reads the variable once at import; match it if that already happened.
    equinox._config.EQX_ON_ERROR = "nan"
    equinox._errors.EQX_ON_ERROR = "nan"

import jax  # noqa: E402


jax.config.update("jax_enable_x64", True)

from ._compilation import enable_persistent_cache, prefer_fast_cpu_compile  # noqa: E402


enable_persistent_cache()
prefer_fast_cpu_compile()

from ._data import (  # noqa: E402
    DataError as DataError,
    Dataset as Dataset,
    Issue as Issue,
    Measurements as Measurements,
    dataset_for_model as dataset_for_model,
    dataset_from_frame as dataset_from_frame,
    load_measurements as load_measurements,
    read_table as read_table,
)
from ._checkpoint import Checkpoint as Checkpoint, CheckpointError as CheckpointError  # noqa: E402
from ._conditions import (  # noqa: E402
    conditions_from_frame as conditions_from_frame,
    with_conditions as with_conditions,
)
from ._fit import (  # noqa: E402
    AbstractStarts as AbstractStarts,
    FitResult as FitResult,
    LatinHypercubeStarts as LatinHypercubeStarts,
    SobolStarts as SobolStarts,
    fit as fit,
)
from ._termination import NewtonStepTermination as NewtonStepTermination  # noqa: E402
from ._hypergrad import (  # noqa: E402
    AbstractCurvature as AbstractCurvature,
    AbstractHypergradient as AbstractHypergradient,
    AbstractLinearSolve as AbstractLinearSolve,
    AbstractSchedule as AbstractSchedule,
    AbstractUnrolledOptimiser as AbstractUnrolledOptimiser,
    Adam as Adam,
    BilevelProblem as BilevelProblem,
    ConjugateGradient as ConjugateGradient,
    DirectSolve as DirectSolve,
    ExactHessian as ExactHessian,
    ExponentialDecay as ExponentialDecay,
    FiniteDifferences as FiniteDifferences,
    ForwardHessian as ForwardHessian,
    GaussNewton as GaussNewton,
    GradientDescent as GradientDescent,
    Hypergradient as Hypergradient,
    HypergradientError as HypergradientError,
    HypergradientWarning as HypergradientWarning,
    Implicit as Implicit,
    InverseTimeDecay as InverseTimeDecay,
    Momentum as Momentum,
    NeumannSeries as NeumannSeries,
    Unrolled as Unrolled,
    check_supported as check_supported,
    hypergradient as hypergradient,
)
from ._inputs import (  # noqa: E402
    AbstractInput as AbstractInput,
    Constant as Constant,
    Interpolated as Interpolated,
    PiecewiseConstant as PiecewiseConstant,
)
from ._model import AbstractODEModel as AbstractODEModel, Observable as Observable  # noqa: E402
from ._modelspec import (  # noqa: E402
    ModelSpecError as ModelSpecError,
    ResolvedModel as ResolvedModel,
    resolve_model as resolve_model,
)
from ._noise import (  # noqa: E402
    AbstractNoiseModel as AbstractNoiseModel,
    Gaussian as Gaussian,
    LogNormal as LogNormal,
    Proportional as Proportional,
)
from ._objective import Objective as Objective  # noqa: E402
from ._penalty import (  # noqa: E402
    AbstractPenalty as AbstractPenalty,
    ElasticNet as ElasticNet,
    L2 as L2,
    SmoothedL1 as SmoothedL1,
)
from ._parameters import (  # noqa: E402
    Parameter as Parameter,
    ParameterError as ParameterError,
    ParameterSpace as ParameterSpace,
)
from ._population import (  # noqa: E402
    AbstractCovariance as AbstractCovariance,
    AbstractOuterOptimiser as AbstractOuterOptimiser,
    AbstractPopulationObjective as AbstractPopulationObjective,
    BHHH as BHHH,
    DiagonalCovariance as DiagonalCovariance,
    FirstOrder as FirstOrder,
    FullCovariance as FullCovariance,
    Hierarchy as Hierarchy,
    Laplace as Laplace,
    PopulationProblem as PopulationProblem,
    PopulationResult as PopulationResult,
    QuasiNewton as QuasiNewton,
    ValidationLoss as ValidationLoss,
    calibrate_population as calibrate_population,
    holdout_split as holdout_split,
    PopulationSetup as PopulationSetup,
    population_hypergradient as population_hypergradient,
    population_setup as population_setup,
)
from ._petab import (  # noqa: E402
    PEtabError as PEtabError,
    PEtabProblem as PEtabProblem,
    load_petab as load_petab,
)
from ._petab_fit import PEtabFitResult as PEtabFitResult, fit_petab as fit_petab  # noqa: E402
from ._petab_population import (  # noqa: E402
    PEtabLikelihood as PEtabLikelihood,
    population_roles as petab_population_roles,
    population_space as petab_population_space,
)
from ._predictions import predictions_frame as predictions_frame  # noqa: E402
from ._rosenbrock import Rodas5 as Rodas5  # noqa: E402
from ._problem import (  # noqa: E402
    Problem as Problem,
    ProblemError as ProblemError,
    check_problem as check_problem,
    load_problem as load_problem,
)
from ._results import (  # noqa: E402
    RESULTS as RESULTS,
    result_code as result_code,
    result_message as result_message,
    result_name as result_name,
)
from ._sbml import SBMLError as SBMLError, SBMLModel as SBMLModel, load_sbml as load_sbml  # noqa: E402
from ._sensitivity import (  # noqa: E402
    AbstractSensitivity as AbstractSensitivity,
    Automatic as Automatic,
    ContinuousAdjoint as ContinuousAdjoint,
    DirectDifferentiation as DirectDifferentiation,
    DiscreteAdjoint as DiscreteAdjoint,
    ForwardMode as ForwardMode,
)
from ._simulate import (  # noqa: E402
    Integrator as Integrator,
    kvaerno5_chord as kvaerno5_chord,
    Trajectory as Trajectory,
    simulate as simulate,
    steady_state as steady_state,
)
from ._synthetic import synthetic_dataset as synthetic_dataset  # noqa: E402
from ._zoo import (  # noqa: E402
    zoo_catalogue as zoo_catalogue,
    zoo_model as zoo_model,
    zoo_module as zoo_module,
    zoo_names as zoo_names,
)

