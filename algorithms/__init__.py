"""Discovery recipes built on the metaopt core (installed as ``metaopt.algorithms``).

Importing this package registers every built-in recipe with :mod:`metaopt.recipes`.
"""

from metaopt.algorithms import lr_schedule

__all__ = ["lr_schedule"]
