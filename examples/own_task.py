"""Your own problems, registered once: ``metaopt --import examples.own_task ...``.

A flax MLP on scikit-learn's diabetes regression (442 patients, 10 features; a data
set the registry does not ship) as two task families -- a narrow one to search on and
a wider one, on another split, to hold out -- and a gymnax environment the registry
does not bundle (Seaquest from MinAtar) for the RL recipes. Copy this file next to
your own data and model; every recipe accepts the names it registers:

    metaopt --import examples.own_task families
    metaopt --import examples.own_task program-search --preset quick --out runs/own \\
        tasks=diabetes-mlp funnel_tasks=diabetes-mlp heldout_task=diabetes-mlp
    metaopt eval runs/own --heldout diabetes-mlp-wide       # re-imports this module
    metaopt --import examples.own_task ta-lpo --preset quick env=seaquest
"""

import flax.linen as nn
import gymnax
from sklearn.datasets import load_diabetes

from metaopt.envs import families, rl


class MLP(nn.Module):
    """A ReLU MLP with one linear output (a regression head)."""

    hidden: tuple[int, ...] = (16,)

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(1)(x)


def diabetes(hidden: tuple[int, ...], split_seed: int) -> families.ModelFamily:
    """The diabetes regression (targets standardised) for an MLP of widths ``hidden``."""
    x, y = load_diabetes(return_X_y=True)
    y = (y - y.mean()) / y.std()
    return families.from_model(
        MLP(hidden), (x, y), loss="mse", batch_size=32, split_seed=split_seed
    )


families.register(
    "diabetes-mlp",
    lambda: diabetes((16,), split_seed=0),
    steps=200,
    description="diabetes regression, flax MLP 10-16-1 (MSE)",
)
families.register(
    "diabetes-mlp-wide",
    lambda: diabetes((64, 64), split_seed=1),
    steps=300,
    description="diabetes regression, flax MLP 10-64-64-1, another split (held out)",
)


@rl.register("seaquest", description="Seaquest-MinAtar (gymnax), 500-step episodes")
def seaquest():
    env, params = gymnax.make("Seaquest-MinAtar")
    return env, params.replace(max_steps_in_episode=500)
