"""delete_unused_submodules: drop the submodules a graph no longer reads, without getattr."""
from __future__ import annotations

from torch import fx

__all__ = ["delete_unused_submodules"]


def delete_unused_submodules(gm: fx.GraphModule) -> None:
    """What `gm.delete_all_unused_submodules()` does, walking `named_modules` and deleting with
    `delattr` on the parent: torch's walks paths with hasattr, which a module with its own
    __getattr__ (PEFT's ModulesToSaveWrapper) answers with a KeyError, not False, once a child is gone.
    A get_attr or call_module target is kept with every module on its path and every module under it."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    targets = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module") and isinstance(n.target, str)}
    kept = set()
    for target in targets:
        parts = target.split(".")
        kept.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))

    def used(path: str) -> bool:
        return path in kept or any(path.startswith(t + ".") for t in targets)

    for path in sorted((p for p in modules if p and not used(p)), key=lambda p: -p.count(".")):
        parent, _, name = path.rpartition(".")
        owner = modules.get(parent)
        if owner is not None and name in dict(owner.named_children()):
            delattr(owner, name)
