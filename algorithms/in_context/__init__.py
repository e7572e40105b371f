"""In-context learners (recipe ``in-context``): learning algorithms inside a forward pass.

- :mod:`.lsa`: linear self-attention, its hand-set gradient-descent construction,
  GD and GD++ references (von Oswald et al. 2023).
- :mod:`.gpicl`: a causal flax transformer over ``(x_t, y_{t-1})`` tokens (Kirsch et al. 2022).
- :mod:`.recipe`: the ``lsa-gd``, ``lsa-mlp`` and ``gpicl`` presets, meta-trained by
  MetaGradient through the driver; :func:`load_predictor` exports a trained learner as a
  pure function.
"""

from metaopt.algorithms.in_context.gpicl import Transformer, gpicl_inner_loop, sequence_loss
from metaopt.algorithms.in_context.lsa import (
    LSALayer,
    batch_predict,
    embed,
    embed_batch_predict,
    embed_lsa_apply,
    gd_construction,
    gd_predict,
    gdpp_predict,
    init_embed,
    init_embed_lsa,
    init_lsa,
    lsa_apply,
    lsa_inner_loop,
    query_loss,
    tokens,
)
from metaopt.algorithms.in_context.recipe import (
    Config,
    build_gpicl_outer,
    build_outer,
    load_gpicl,
    load_gpicl_predictor,
    load_lsa,
    load_predictor,
)

__all__ = [
    "Config",
    "LSALayer",
    "Transformer",
    "batch_predict",
    "build_gpicl_outer",
    "build_outer",
    "embed",
    "embed_batch_predict",
    "embed_lsa_apply",
    "gd_construction",
    "gd_predict",
    "gdpp_predict",
    "gpicl_inner_loop",
    "init_embed",
    "init_embed_lsa",
    "init_lsa",
    "load_gpicl",
    "load_gpicl_predictor",
    "load_lsa",
    "load_predictor",
    "lsa_apply",
    "lsa_inner_loop",
    "query_loss",
    "sequence_loss",
    "tokens",
]
