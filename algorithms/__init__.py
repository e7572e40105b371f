"""Discovery recipes built on the metaopt core (installed as ``metaopt.algorithms``).

:data:`RECIPES` is the table of built-in recipes, by command-line name. The core
finds it through the ``metaopt.recipes`` entry point that ``pyproject.toml``
declares (the same way it finds a third-party package's recipes); importing a
recipe module registers nothing.
"""

from metaopt.algorithms.hypergradient import recipe as _hypergradient
from metaopt.algorithms.in_context import recipe as _in_context
from metaopt.algorithms.learned_optimizers import recipe as _learned_optimizers
from metaopt.algorithms.lpg import recipe as _lpg
from metaopt.algorithms.lpo import recipe as _lpo
from metaopt.algorithms.lr_schedule import recipe as _lr_schedule
from metaopt.algorithms.maml import recipe as _maml
from metaopt.algorithms.program_search import recipe as _program_search

#: the built-in recipes, by the name ``metaopt <name>`` runs them under.
RECIPES = {
    r.name: r
    for r in (
        _hypergradient.RECIPE,
        _in_context.RECIPE,
        _learned_optimizers.RECIPE,
        _lr_schedule.RECIPE,
        _maml.RECIPE,
        _program_search.RECIPE,
        _lpg.RECIPE,
        _lpo.RECIPE,
    )
}

__all__ = ["RECIPES"]
