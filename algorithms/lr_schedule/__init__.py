"""Learned learning-rate schedules (recipe ``lr-schedule``)."""

from metaopt.algorithms.lr_schedule.recipe import (
    Config,
    build_inner,
    initial_meta_params,
    learning_rate,
    schedule_optimizer,
)

__all__ = ["Config", "build_inner", "initial_meta_params", "learning_rate", "schedule_optimizer"]
