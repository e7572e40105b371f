"""Discovered-optimizer primitives: the program IR and interpreter, the learned optimizer.

Both leave as an ``optax.GradientTransformation``; neither needs the recipes that
search or meta-train them:

* :mod:`metaopt.optimizers.program` -- optimizer programs (Lion-style straight-line
  code): parse and print text, the ``vmap``-pable interpreter, the built-in
  programs (AdamW, Lion, SGD-momentum, signSGD) and ``as_optax``.
* :mod:`metaopt.optimizers.lopt` -- the per-parameter MLP learned optimizer, its
  ``.npz`` artifact and ``as_optax``.

Example:
  >>> import optax
  >>> from metaopt.optimizers import program
  >>> opt = program.as_optax(program.LION, learning_rate=optax.cosine_decay_schedule(1e-4, 1000))
  >>> state = opt.init({"w": jnp.zeros(3)})
"""

from metaopt.optimizers import lopt, program

__all__ = ["lopt", "program"]
