"""LPG / TA-LPG: RL objectives produced by a backward recurrent network (recipe ``ta-lpg``).

* :mod:`~metaopt.algorithms.ta_lpg.network` -- the LPG network (reverse-time GRU) and its targets;
* :mod:`~metaopt.algorithms.ta_lpg.agent` -- the agent as a metaopt ``InnerLoop`` with
  pluggable objective (LPG, A2C, REINFORCE) and sampled lifetimes;
* :mod:`~metaopt.algorithms.ta_lpg.recipe` -- the ``ta-lpg`` recipe (ES and meta-gradients);
* :mod:`~metaopt.algorithms.ta_lpg.evaluate` -- the comparison across lifetimes;
* :mod:`~metaopt.algorithms.ta_lpg.plots` -- meta-training curves and progress dependence.
"""

from metaopt.algorithms.ta_lpg import agent, network
from metaopt.algorithms.ta_lpg.agent import AgentConfig, AgentLoop, AgentState, make_agent
from metaopt.algorithms.ta_lpg.recipe import Config, load_meta_params, load_objective

__all__ = [
    "AgentConfig",
    "AgentLoop",
    "AgentState",
    "Config",
    "agent",
    "load_meta_params",
    "load_objective",
    "make_agent",
    "network",
]
