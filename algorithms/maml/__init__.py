"""MAML on sinusoid regression (recipe ``maml``), on the core's InnerLoop / MetaGradient seam."""

from metaopt.algorithms.maml.maml import (
    AdaptationCurve,
    MAMLState,
    Sinusoid,
    adapt,
    adaptation_curve,
    init_model,
    mse,
    predict,
    sample_points,
    sample_task,
    sgd_step,
    sinusoid_inner_loop,
)
from metaopt.algorithms.maml.recipe import Config, build_outer, load_params, plot_fits

__all__ = [
    "AdaptationCurve",
    "Config",
    "MAMLState",
    "Sinusoid",
    "adapt",
    "adaptation_curve",
    "build_outer",
    "init_model",
    "load_params",
    "mse",
    "plot_fits",
    "predict",
    "sample_points",
    "sample_task",
    "sgd_step",
    "sinusoid_inner_loop",
]
