"""Discovery recipes built on the metaopt core (installed as ``metaopt.algorithms``).

:data:`RECIPES` is the table of built-in recipes, by command-line name. The core
finds it through the ``metaopt.recipes`` entry point that ``pyproject.toml``
declares (the same way it finds a third-party package's recipes); importing a
recipe module registers nothing.
"""

from metaopt.algorithms.hypergradient import recipe as _hypergradient
from metaopt.algorithms.in_context import recipe as _in_context
from metaopt.algorithms.learned_optimizer import recipe as _learned_optimizer
from metaopt.algorithms.lr_schedule import recipe as _lr_schedule
from metaopt.algorithms.maml import recipe as _maml
from metaopt.algorithms.meta_loss_rescaling import recipe as _meta_loss_rescaling
from metaopt.algorithms.program_search import recipe as _program_search
from metaopt.algorithms.stn import recipe as _stn
from metaopt.algorithms.ta_lpg import recipe as _ta_lpg
from metaopt.algorithms.ta_lpo import recipe as _ta_lpo

#: the built-in recipes, by the name ``metaopt <name>`` runs them under.
RECIPES = {
    r.name: r
    for r in (
        _hypergradient.RECIPE,
        _in_context.RECIPE,
        _learned_optimizer.RECIPE,
        _lr_schedule.RECIPE,
        _maml.RECIPE,
        _meta_loss_rescaling.RECIPE,
        _program_search.RECIPE,
        _stn.RECIPE,
        _ta_lpg.RECIPE,
        _ta_lpo.RECIPE,
    )
}

__all__ = ["RECIPES"]
