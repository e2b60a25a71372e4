"""Data: manifests and WebDataset shards, importers of the published formats, hard negatives, concepts, the
synthetic world, and the loader that yields the batch contract of docs/internals.md."""
from .config import DataConfig, SyntheticConfig
from .dataset import EpochSampler, Loader, SkipBudgetExceeded, select_negatives
from .loader import build_dataloader, to_device
from .manifest import INVALID_NEGATIVE, ManifestError, Record, read_manifest, write_jsonl

__all__ = [
    "DataConfig",
    "SyntheticConfig",
    "build_dataloader",
    "to_device",
    "EpochSampler",
    "Loader",
    "SkipBudgetExceeded",
    "select_negatives",
    "INVALID_NEGATIVE",
    "ManifestError",
    "Record",
    "read_manifest",
    "write_jsonl",
]
