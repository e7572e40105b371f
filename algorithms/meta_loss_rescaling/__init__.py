"""Per-example loss weights for noisy labels (recipe ``meta-loss-rescaling``)."""

from metaopt.algorithms.meta_loss_rescaling.recipe import (
    METHODS,
    Config,
    load_rescaler,
    noisy_family,
    train_one,
    train_seeds,
)

__all__ = ["METHODS", "Config", "load_rescaler", "noisy_family", "train_one", "train_seeds"]
