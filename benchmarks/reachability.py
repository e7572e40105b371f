"""Can single mutations reach momentum from a stateless program? Counted, not guessed.

The ``warm_start=sgd`` search (docs/program_search/round3_selection.md) ended at
``update = clip(g, 0.127)``: no state slot, although momentum is worth a lot on the
proxy (``validate-proxy``: sgd 1.38, sgd_momentum 1.21, signsgd 1.32,
sign_momentum 0.937 of tuned AdamW's validation loss). This script samples the
default preset's proposal operator (``RandomMutator`` over the default
``SearchSpace``, then ``remove_dead_code`` exactly as the search does) from a
start program and sorts every child into:

- ``same``: after dead-code removal, structurally the parent (the search reuses the
  parent's fitness and learns nothing);
- ``stateless``: a different program that keeps no state;
- ``reads zero state``: reads ``m`` or ``v`` but never writes it (the slot stays 0);
- ``stateful``: writes a slot the update reads at a later step (momentum-like).

Then it does the same for the grandchildren of the stateless and zero-state
children, so the two-mutation routes to state are counted too.

    python benchmarks/reachability.py                      # from SGD and from clip(g)
    python benchmarks/reachability.py --state-moves        # with the state move
"""

from __future__ import annotations

import argparse
from collections import Counter

import jax
import numpy as np

from metaopt.algorithms.program_search.mutate import RandomMutator, SearchSpace
from metaopt.algorithms.program_search.simplify import (
    fingerprint_inputs,
    function_class,
    functional_fingerprints,
    keeps_state,
    remove_dead_code,
    structural_hash,
)
from metaopt.optimizers.program import BUILTINS, parse, stack_programs, statements, to_source

CLIPPED = "update = clip(g, 0.127256)\n"


def kind(program, parent_hash: str) -> str:
    """Which of the four classes above ``program`` (already dead-code free) is in."""
    if structural_hash(program) == parent_hash:
        return "same"
    if keeps_state(program):
        return "stateful"
    read = {a for _, _, args in statements(program) for a in args} & {"m", "v"}
    return "reads zero state" if read else "stateless"


def function_of(programs) -> list[str]:
    """The search's functional hash of each program (``"zero"``: an all-zero update)."""
    inputs = fingerprint_inputs(jax.random.key(1))
    fps = np.asarray(functional_fingerprints(stack_programs(programs), *inputs))
    return [function_class(f) for f in fps]


def children(source: str, n: int, rng: np.random.Generator, space: SearchSpace):
    parent = parse(source)
    mutator, h = RandomMutator(space), structural_hash(parent)
    for _ in range(n):
        child = remove_dead_code(parse(mutator([to_source(parent)], rng)))
        yield child, kind(child, h)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=4000, help="children per start program")
    ap.add_argument(
        "--grand",
        type=int,
        default=50,
        help="grandchildren per kept zero-state child (1 per stateless one)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--state-moves", action="store_true", help="SearchSpace(state_moves=True)")
    args = ap.parse_args(argv)
    # the default preset's: 2 slots, no t, the cheap ops, 8 statements
    space = SearchSpace(state_moves=args.state_moves)
    rng = np.random.default_rng(args.seed)
    for name, source in (("sgd", BUILTINS["sgd"]), ("clip(g, 0.127)", CLIPPED)):
        print(f"start: {name}: {source.strip()!r}")
        counts, grand, kids = Counter(), Counter(), []
        for child, k in children(source, args.samples, rng, space):
            counts[k] += 1
            kids.append((child, k))
        total = sum(counts.values())
        for k in ("same", "stateless", "reads zero state", "stateful"):
            print(f"  child {k:>17}: {counts[k]:6d}  ({counts[k] / total:.2%})")
        zero_state = [c for c, k in kids if k == "reads zero state"]
        valid = {}
        if zero_state:
            parent_f, *fs = function_of([parse(source), *zero_state])
            z = Counter(
                "invalid (zero update)"
                if f == "zero"
                else "neutral (the parent's function)"
                if f == parent_f
                else "other"
                for f in fs
            )
            print("  zero-state children: " + ", ".join(f"{k} {v}" for k, v in sorted(z.items())))
            valid = {id(c) for c, f in zip(zero_state, fs, strict=True) if f != "zero"}
        # grandchildren of the children the search can keep (an all-zero update is rejected)
        for child, k in kids:
            n = 1 if k == "stateless" else args.grand if id(child) in valid else 0
            if n:
                for _, gk in children(to_source(child), n, rng, space):
                    grand[(k, gk)] += 1
        for via in ("stateless", "reads zero state"):
            n = sum(v for (a, _), v in grand.items() if a == via)
            if n:
                s = grand[(via, "stateful")]
                print(f"  grandchild via {via:>17}: {s:6d} of {n} stateful ({s / n:.2%})")


if __name__ == "__main__":
    main()
