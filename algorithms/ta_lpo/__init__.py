"""LPO / TA-LPO: RL objectives discovered by evolution strategies (recipe ``ta-lpo``).

* :mod:`~metaopt.rl.objectives` -- PPO, DPO, LPO and TA-LPO as pure
  losses ``objective(meta_params, ratio, advantage, progress)``;
* :mod:`~metaopt.rl.ppo` -- a pure-JAX PPO learner with a pluggable
  objective, as a metaopt ``InnerLoop``;
* :mod:`~metaopt.algorithms.ta_lpo.recipe` -- the ``ta-lpo`` recipe (ES meta-training);
* :mod:`~metaopt.algorithms.ta_lpo.evaluate` -- the comparison across horizons and envs;
* :mod:`~metaopt.algorithms.ta_lpo.plots` -- drift heatmaps.
"""

from metaopt.algorithms.ta_lpo.recipe import Config, load_meta_params, load_objective
from metaopt.rl import objectives, ppo
from metaopt.rl.objectives import (
    OBJECTIVES,
    clipped_ppo,
    dpo,
    dpo_drift,
    init_drift_params,
    lpo,
    lpo_drift,
    ppo_drift,
    ta_lpo,
    ta_lpo_drift,
)
from metaopt.rl.ppo import PPOConfig, PPOState, make_ppo, ppo_config

__all__ = [
    "OBJECTIVES",
    "Config",
    "PPOConfig",
    "PPOState",
    "clipped_ppo",
    "dpo",
    "dpo_drift",
    "init_drift_params",
    "load_meta_params",
    "load_objective",
    "lpo",
    "lpo_drift",
    "make_ppo",
    "objectives",
    "ppo",
    "ppo_config",
    "ppo_drift",
    "ta_lpo",
    "ta_lpo_drift",
]
