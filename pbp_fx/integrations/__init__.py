"""PB inside training frameworks: `hf` (transformers.Trainer), `lightning`, `averaging` (EMA/SWA copies).

Each submodule imports its framework only when imported itself, so `import pbp_fx` never needs
transformers or lightning.
"""
