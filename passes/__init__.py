"""Graph passes (GraphModule -> GraphModule), composable by hand or with PassManager.

    gm = pbp_fx.trace(model, example_inputs)
    specs = find_sites(gm, exclude=["head"])        # what to change: plain data
    gm = insert_dendrites(gm, specs)                # how to edit the graph
    eval_gm = finalize(gm)                          # fused, eval-only graph

`merge_train_eval(train_gm, eval_gm)` (train_eval.py) makes one graph out of a train-mode and
an eval-mode capture; `pbp_fx.trace` runs it for both frontends.
"""
from .find_sites import SiteSpec, find_sites
from .finalize import finalize, fuse_site
from .insert_dendrites import insert_dendrites, site_key
from .manager import ContractError, Pass, PassManager
from .train_eval import lower_to_eval, merge_train_eval

# (runtime modules, which live in pbp_fx.modes and pbp_fx.site; still importable from here as before)
from pbp_fx.modes import ModeSwitch  # noqa: E402,F401
from pbp_fx.site import TiedFusedSite  # noqa: E402,F401

__all__ = ["SiteSpec", "find_sites", "insert_dendrites", "finalize", "fuse_site", "site_key",
           "Pass", "PassManager", "ContractError", "merge_train_eval", "lower_to_eval"]
