"""General-purpose in-context learning: a causal transformer over (x_t, y_{t-1}) tokens.

The model reads a sequence of examples of one task; token ``t`` is the input
``x_t`` next to the one-hot label of the *previous* example, and the output at
``t`` is the logits of ``y_t``. It is meta-trained on tasks from
:class:`metaopt.envs.in_context.GPICLTasks` (a dataset under a random projection
and label permutation per task), so with enough distinct tasks it has to learn
the mapping from the context -- in its forward pass -- rather than memorise tasks.

References:
  Kirsch et al., "General-Purpose In-Context Learning by Meta-Learning Transformers", 2022.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from metaopt.inner import InnerLoop


def tokens(xs, ys, num_classes: int, prev_input: bool = True):
    """The model inputs ``[L, F]``: ``(x_t, onehot(y_{t-1}))``, and ``x_{t-1}`` with ``prev_input``.

    Position 0 sees zeros for the previous label (and input).
    """
    prev = jax.nn.one_hot(ys, num_classes)
    prev = jnp.concatenate([jnp.zeros_like(prev[..., :1, :]), prev[..., :-1, :]], axis=-2)
    feats = [xs, prev]
    if prev_input:  # no previous-token head needed to pair x_{t-1} with y_{t-1}
        feats.append(jnp.concatenate([jnp.zeros_like(xs[..., :1, :]), xs[..., :-1, :]], -2))
    return jnp.concatenate(feats, -1)


class Block(nn.Module):
    """A pre-LayerNorm transformer block with causal self-attention."""

    model_dim: int
    heads: int

    @nn.compact
    def __call__(self, h):
        mask = nn.make_causal_mask(jnp.ones(h.shape[:-1], jnp.int32))
        a = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.model_dim)
        h = h + a(nn.LayerNorm()(h), mask=mask)
        m = nn.Dense(4 * self.model_dim)(nn.LayerNorm()(h))
        return h + nn.Dense(self.model_dim)(nn.gelu(m))


class Transformer(nn.Module):
    """Causal transformer: ``(xs [L, d], ys [L]) -> logits [L, num_classes]``.

    Attributes:
      num_classes: label alphabet size.
      model_dim: width of the residual stream.
      heads: attention heads per layer.
      depth: number of blocks.
      max_len: the longest sequence the model reads (its positional table).
    """

    num_classes: int = 10
    model_dim: int = 64
    heads: int = 4
    depth: int = 2
    max_len: int = 64
    prev_input: bool = True  # token t also carries x_{t-1}: (x_{t-1}, y_{t-1}) is one example

    @nn.compact
    def __call__(self, xs, ys):
        length = xs.shape[-2]
        if length > self.max_len:
            raise ValueError(f"sequence of {length} is longer than max_len={self.max_len}")
        h = nn.Dense(self.model_dim)(tokens(xs, ys, self.num_classes, self.prev_input))
        pos = self.param("pos", nn.initializers.normal(0.02), (self.max_len, self.model_dim))
        h = h + pos[:length]
        for _ in range(self.depth):
            h = Block(self.model_dim, self.heads)(h)
        return nn.Dense(self.num_classes)(nn.LayerNorm()(h))


class LSTM(nn.Module):
    """An LSTM over the same tokens: ``(xs [L, d], ys [L]) -> logits [L, num_classes]``.

    The paper's state-size baseline (Kirsch et al. 2022, Sec. 4.4): about as many
    parameters as :class:`Transformer`, but everything it knows about the context
    lives in its state of ``2 * hidden`` floats (cell and hidden vector), where the
    transformer can attend to a key/value cache of ``2 * depth * L * model_dim``
    floats. With the recipe's defaults (``lstm_hidden=131``, ``depth=2``,
    ``model_dim=64``, ``L=32``): 262 floats against 8192.

    Attributes:
      num_classes: label alphabet size.
      hidden: LSTM state width.
      max_len: the longest sequence the model reads (kept for the Transformer's interface).
      prev_input: as for :class:`Transformer`.
    """

    num_classes: int = 10
    hidden: int = 131
    max_len: int = 64
    prev_input: bool = True

    @nn.compact
    def __call__(self, xs, ys):
        length = xs.shape[-2]
        if length > self.max_len:
            raise ValueError(f"sequence of {length} is longer than max_len={self.max_len}")
        h = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(
            tokens(xs, ys, self.num_classes, self.prev_input)
        )
        return nn.Dense(self.num_classes)(h)


def sequence_loss(model: Transformer, params, episodes) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over every position of a batch, and accuracy ``[B, L]``."""
    logits = model.apply({"params": params}, episodes.context_x, episodes.context_y)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, episodes.context_y)
    return ce.mean(), (jnp.argmax(logits, -1) == episodes.context_y).astype(jnp.float32)


def gpicl_inner_loop(model: Transformer, family, episodes_per_particle: int) -> InnerLoop:
    """Meta-training the transformer as an :class:`~metaopt.inner.InnerLoop`.

    As for the LSA, learning happens in the forward pass: horizon one (an empty
    step); the meta-loss is :func:`sequence_loss` on ``episodes_per_particle``
    fresh episodes of ``family`` drawn from the key.
    """

    def meta_loss(params, state, key):
        del state
        return sequence_loss(model, params, family.sample_batch(key, episodes_per_particle))[0]

    return InnerLoop(
        init=lambda params, key: jnp.zeros((), jnp.int32),
        step=lambda params, state, key: (state + 1, {}),
        meta_loss=meta_loss,
        horizon=1,
        name="gpicl",
    )


def init_transformer(model: Transformer, key: jax.Array, length: int, input_dim: int):
    """The model's initial parameters for sequences of ``length`` inputs of ``input_dim``."""
    xs = jnp.zeros((length, input_dim))
    return model.init(key, xs, jnp.zeros((length,), jnp.int32))["params"]


def accuracy_by_position(model: Transformer, params, family, key: jax.Array, episodes: int):
    """Accuracy at each position ``[L]`` over ``episodes`` fresh episodes of ``family``."""
    return sequence_loss(model, params, family.sample_batch(key, episodes))[1].mean(0)
