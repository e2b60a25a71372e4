"""Which model to evaluate: an open_clip architecture with a pretrained tag or checkpoint file, a custom
architecture JSON, or a compclip run folder (`config.yaml` + `checkpoints/epoch_N.pt`, the latest is used)."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger(__name__)

_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


@dataclass
class ModelSpec:
    label: str
    arch: str
    pretrained: Optional[str] = None  # an open_clip tag or a checkpoint path
    model_config: Optional[str] = None  # custom architecture JSON
    force_quick_gelu: bool = False


def register_model_config(path: str, arch: Optional[str] = None) -> str:
    """Make a custom architecture JSON known to open_clip; returns the architecture name to create.

    open_clip names a config after its file stem; when `arch` differs, the JSON is registered under `arch`.
    """
    import open_clip

    if not os.path.isfile(path):
        raise FileNotFoundError(f"model config not found: {path}")
    stem = os.path.splitext(os.path.basename(path))[0]
    if arch is None or arch == stem:
        open_clip.add_model_config(path)
        return stem
    with open(path, encoding="utf-8") as handle:
        json.load(handle)  # fail here, naming the file, on a broken JSON
    with tempfile.TemporaryDirectory(prefix="compclip-model-config-") as folder:  # open_clip reads it at once
        shutil.copyfile(path, os.path.join(folder, f"{arch}.json"))
        open_clip.add_model_config(os.path.join(folder, f"{arch}.json"))
    return arch


def latest_checkpoint(run_dir: str) -> str:
    folder = os.path.join(run_dir, "checkpoints")
    found = []
    if os.path.isdir(folder):
        found = [(int(match.group(1)), name) for name in os.listdir(folder) if (match := _EPOCH_FILE.match(name))]
    if not found:
        raise FileNotFoundError(f"{run_dir}: no checkpoints/epoch_N.pt in this run folder")
    return os.path.join(folder, max(found)[1])


def spec_from_run(run_dir: str, force_quick_gelu: bool = False, label: Optional[str] = None) -> ModelSpec:
    """A run folder's model: `config.yaml`'s `model` section (`arch`, `pretrained`, `model_config`,
    `force_quick_gelu`) with the latest epoch checkpoint. A run initialised from OpenAI weights is evaluated with
    QuickGELU, as it was trained."""
    import yaml

    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml)")
    with open(config_path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle) or {}
    model = config.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("arch"), str):
        raise ValueError(f"{config_path}: needs a 'model' section with 'arch'")
    model_config = model.get("model_config")
    if model_config and not os.path.isabs(model_config) and not os.path.isfile(model_config):
        model_config = os.path.join(run_dir, model_config)
    quick_gelu = bool(model.get("force_quick_gelu")) or force_quick_gelu
    if model.get("pretrained") == "openai" and not quick_gelu and "quickgelu" not in model["arch"].lower():
        log.warning("%s was initialised from OpenAI weights: evaluating with QuickGELU as it was trained", run_dir)
        quick_gelu = True
    checkpoint = latest_checkpoint(run_dir)
    name = label or f"{os.path.basename(os.path.normpath(run_dir))}/{os.path.splitext(os.path.basename(checkpoint))[0]}"
    return ModelSpec(name, model["arch"], checkpoint, model_config, quick_gelu)


def load_model(spec: ModelSpec, device="cpu"):
    """(model in eval mode on `device`, evaluation preprocess, tokenizer)."""
    import open_clip

    from compclip.models import create_model_and_transforms, register_model_configs

    register_model_configs()  # compclip's own architectures (compclip/model_configs), as the trainer knows them
    arch = register_model_config(spec.model_config, spec.arch) if spec.model_config else spec.arch
    model, _, preprocess = create_model_and_transforms(arch, spec.pretrained, spec.force_quick_gelu, device=device)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(arch)
