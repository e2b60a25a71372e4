"""The trainer: the loop (`train`) and its components, one concern each (docs/architecture.md).

    from compclip.trainer import Trainer
    Trainer(resolve(load_config(argv), world_size)).train()

`compclip/train.py` is the entry point that `deepspeed compclip/train.py` runs; it parses, resolves and hands the
`ResolvedRun` to `Trainer`.
"""
from .train import Trainer

__all__ = ["Trainer"]
