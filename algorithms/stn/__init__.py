"""Self-Tuning Networks (MacKay et al. 2019): the ``stn`` recipe.

The best-response layers live in :mod:`metaopt.bestresponse`; this package holds the
alternating training (:class:`~.recipe.StnTrainer`), the run and its evaluation
against random search and a grid.
"""
