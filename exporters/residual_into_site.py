"""Rewrite rule: a residual Add after a fused 2-D conv site becomes an input of the site.

Why: in a plain network, ONNX Runtime's x86 NCHWc transformer fuses a residual Add after a Conv
into that Conv (its one *sum* input). A fused site's neuron Conv already spends its sum input on
the site's tail (n + V[0] * s_0), so the residual Add after the site ran as an op of its own, one
more pass over the block's output: in MNASNet with one dendrite per site, about the whole gap to
the latency target (bench/results/latency_stop33.md, docs/inference.md). Reassociated,

    (n + V[0] * s_0) + R  =  n + (V[0] * s_0 + R)

the Add reads the scale pass V[0] * s_0, which the runtime runs as a blocked depthwise 1x1 Conv
with a free sum input: the Add is fused there, and the final Add into the neuron's Conv as
before. The site's node takes R as an extra input (`FusedOpSpec.residual`) and its output is the
Add's. The same function up to rounding.

An Add matches when it is a default-domain Add of two inputs, one of them a fused site's output
that nothing else reads and that is no graph output, the site is a 2-D conv (the blocked layout
exists for those only: elsewhere both forms run the same ops) with a scale pass V[0] (not
`unit_first_weight`), and it takes no residual yet. `rewrite` returns why each other site read
by an Add stayed.
"""
from __future__ import annotations

from typing import Optional

import onnx

from .functions import DOMAIN, FusedOpSpec, set_flags, ship_functions
from .graph_index import GraphIndex

__all__ = ["rewrite"]


def _why_not(site: onnx.NodeProto, add: onnx.NodeProto, spec: FusedOpSpec, index: GraphIndex) -> Optional[str]:
    """Why this Add after `site` cannot move into it (None: it can)."""
    out = site.output[0]
    if out in index.graph_outputs:
        return "its output is a graph output"
    if index.uses[out] != 1:
        return "its output has other readers than the Add"
    if list(add.input).count(out) != 1:
        return "the Add adds its output to itself"
    if spec.kind != "conv2d":
        return f"a {spec.kind} site (the runtime's blocked layout, which fuses the Add, is for 2-D convs only)"
    if spec.unit_first_weight:
        return "its V[0] is folded into its readers (no scale pass to take the Add)"
    if spec.residual:
        return "it takes a residual already"
    return None


def rewrite(model: onnx.ModelProto, specs: dict[str, FusedOpSpec], opset: int) -> tuple[int, list[str]]:
    """Apply the rule to every Add that reads a fused site's output (in place; `specs` gains the
    rewritten sites' signatures). Returns the number of Adds moved into sites and, for each other
    site read by an Add, why it stayed.
    """
    index = GraphIndex(model.graph)
    graph = model.graph
    done, skipped = 0, []
    for add in list(graph.node):
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
            continue
        for pos, value in enumerate(add.input):
            site = index.producer.get(value)
            if site is None or site.domain != DOMAIN or site.overload not in specs:
                continue
            spec = specs[site.overload]
            why = _why_not(site, add, spec, index)
            if why is not None:
                skipped.append(f"Add {add.name!r} after site {site.name!r} stays: {why}")
                continue
            set_flags(site, specs, "residual")
            site.input.append(add.input[1 - pos])
            del site.output[:]
            site.output.append(add.output[0])
            # The site moves to the Add's place: R may be computed after the site's old place.
            graph.node.remove(site)
            graph.node.insert(list(graph.node).index(add), site)
            graph.node.remove(add)
            index.producer[add.output[0]] = site
            stale = [v for v in graph.value_info if v.name == value]
            for v in stale:
                graph.value_info.remove(v)
            done += 1
            break
    if done:
        ship_functions(model, specs, opset)
    return done, skipped
