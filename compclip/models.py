"""open_clip models for training: building, the encoder module DeepSpeed wraps, visual tokens, parameter groups,
the open_clip-loadable export.

Everything a method needs comes out of **one** forward of the open_clip model (``CLIP.forward(image, text)``):
the positives, the K negatives and the concepts are concatenated into one text batch, and the visual tokens of
C2LIP's XAC are captured by a hook inside the same image forward. Going through the model's own ``forward`` matters
under ZeRO-3: DeepSpeed gathers a module's parameters in that module's forward hooks, so ``logit_scale`` /
``logit_bias`` (parameters of the top-level module) are only materialised inside ``CLIP.forward``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger("compclip")

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Make compclip/model_configs/*.json known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def known_architecture(arch: str) -> Optional[str]:
    """None when open_clip can build `arch` (its own configs, compclip/model_configs, `hf-hub:` / `local-dir:`
    sources), else what is wrong with it."""
    register_model_configs()
    if arch.startswith(("hf-hub:", "local-dir:")) or arch in open_clip.list_models():
        if arch.startswith("local-dir:") and not os.path.isdir(arch[len("local-dir:"):]):
            return f"{arch}: no such folder"
        return None
    close = [name for name in open_clip.list_models() if name.lower().startswith(arch.lower()[:6])][:8]
    return (f"unknown open_clip architecture {arch!r}" + (f" (close: {', '.join(close)})" if close else "")
            + f"; compclip's own: {', '.join(sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json')))}")


def uses_quick_gelu(arch: str, pretrained: str, force_quick_gelu: bool) -> bool:
    """OpenAI's CLIP weights were trained with QuickGELU; open_clip's plain `ViT-B-32` config uses GELU, so a run
    from `openai` weights must force it (the `-quickgelu` architectures already have it)."""
    return force_quick_gelu or (pretrained.lower() == "openai" and not arch.endswith("-quickgelu"))


def build_model(arch: str, pretrained: str = "", force_quick_gelu: bool = False, *, load_weights: bool = True
                ) -> Tuple[nn.Module, object, object, object]:
    """(model, train preprocess, eval preprocess, tokenizer), fp32 on the CPU.

    `pretrained`: an open_clip tag, a local file (open_clip state dict, `{"state_dict": ...}` checkpoint such as
    our `epoch_N.pt`), or "" for random init. `load_weights=False` builds the architecture only (EMA teacher,
    whose weights are copied from the student).
    """
    problem = known_architecture(arch)
    if problem:
        raise ValueError(f"model.arch: {problem}")
    quick = uses_quick_gelu(arch, pretrained, force_quick_gelu)
    source = pretrained if (pretrained and load_weights) else None
    if source and os.path.sep in source and not os.path.exists(source):
        raise FileNotFoundError(f"model.pretrained: no such file {source}")
    model, preprocess_train, preprocess_val = create_model_and_transforms(arch, source, quick)
    tokenizer = open_clip.get_tokenizer(arch)
    return model, preprocess_train, preprocess_val, tokenizer


def create_model_and_transforms(arch: str, pretrained: Optional[str], force_quick_gelu: bool, device="cpu"):
    """open_clip's `create_model_and_transforms`, also for a checkpoint file on an `hf-hub:` / `local-dir:`
    architecture (open_clip ignores `pretrained` there and would silently keep the folder's own or random weights:
    the file is loaded after the model is built)."""
    schema = arch.startswith(("hf-hub:", "local-dir:"))
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        arch, pretrained=None if schema else pretrained, force_quick_gelu=force_quick_gelu, device=device,
        precision="fp32")
    if schema and pretrained:
        open_clip.load_checkpoint(model, pretrained, device=device)
    return model, preprocess_train, preprocess_val


def build_from_config(model_cfg, *, load_weights: bool = True, state: Optional[Dict[str, torch.Tensor]] = None):
    """`build_model` for a `ModelConfig` (gradient checkpointing as configured). Without weights (the EMA
    teacher's architecture, an evaluation copy) the activation is still the trained one: `pretrained` decides
    QuickGELU. `state` is loaded into the model. Returns what build_model does."""
    clip, *rest = build_model(model_cfg.arch, model_cfg.pretrained, model_cfg.force_quick_gelu,
                              load_weights=load_weights)
    if model_cfg.grad_checkpointing and load_weights:
        clip.set_grad_checkpointing(True)
    if state is not None:
        clip.load_state_dict(state)
    return (clip, *rest)


def promote_zero_dim_parameters(model: nn.Module) -> List[str]:
    """Give every 0-dim parameter the shape [1] for training; returns their names.

    DeepSpeed handles 0-dim parameters badly: 0.19.8 fails on them under ZeRO (hence the pin, proven in
    tests/test_packaging.py), and even the pinned version's non-ZeRO gradient clipping multiplies their gradient
    by a [1]-shaped coefficient in place, which raises. open_clip itself offers [1]-shaped scales
    (`nonscalar_logit_scale`) and its loader reshapes them, but our export restores the stock 0-dim shape
    anyway (`compclip.trainer.engine.full_state_dict`), so a checkpoint is indistinguishable from one of a stock model.
    """
    promoted = []
    for name, param in list(model.named_parameters()):
        if param.dim() != 0:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        setattr(owner, attr, nn.Parameter(param.detach().reshape(1).clone(), requires_grad=param.requires_grad))
        promoted.append(name)
    model._compclip_zero_dim = promoted
    return promoted


# --------------------------------------------------------------------------------------------------------------
# Visual tokens u_il (docs/losses.md, "Visual tokens for XAC")


def visual_token_kind(clip: nn.Module) -> str:
    """`vit` (open_clip VisionTransformer: patch tokens through ln_post and proj) or `map` (timm ViT with an
    attention-pool head: the head's value path per token)."""
    visual = clip.visual
    if hasattr(visual, "ln_post") and hasattr(visual, "proj"):
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
            raise NotImplementedError("visual tokens: open_clip ViTs with attentional pooling or a final LN after "
                                      "pooling have no token path through the pooled projection")
        return "vit"
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and getattr(trunk, "attn_pool", None) is not None:
        return "map"
    raise NotImplementedError(f"visual tokens are not defined for {type(visual).__name__} towers "
                              "(supported: open_clip ViT, timm ViT with a MAP attention-pool head)")


def _map_value_path(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Each token attends only to itself: softmax over one key is 1, so attention returns the token's own value.
    if getattr(pool, "pos_embed", None) is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    width = x.shape[-1]
    value = pool.kv(x)[..., width:]  # kv is fused [keys | values] along the last dim
    tokens = pool.proj(value)
    if getattr(pool, "mlp", None) is not None:
        tokens = tokens + pool.mlp(pool.norm(tokens))
    return tokens


@contextlib.contextmanager
def capture_visual_tokens(clip: nn.Module, enabled: bool = True):
    """Within the block, each image forward of `clip` stores its (unnormalised) joint-space visual tokens
    [B, L, D] in the yielded dict under "tokens"."""
    store: Dict[str, torch.Tensor] = {}
    if not enabled:
        yield store
        return
    kind = visual_token_kind(clip)
    visual = clip.visual
    if kind == "vit":
        def hook(module, inputs, output):
            # ln_post sees all tokens [B, 1+L, W] (class token first); proj is a parameter of `visual`, which
            # is mid-forward, so it is materialised even under ZeRO-3.
            store["tokens"] = output[:, 1:] @ visual.proj
            store["class_token"] = output[:, 0] @ visual.proj
        handle = visual.ln_post.register_forward_hook(hook)
    else:
        trunk = visual.trunk
        pool = trunk.attn_pool

        def hook(module, inputs, output):
            # After the pool, timm's forward_head applies fc_norm (and dropout) and its classifier head, then
            # open_clip's head: identities for SigLIP, but part of the pooled path of other MAP towers.
            tokens = _map_value_path(module, inputs[0])
            for layer in (getattr(trunk, "fc_norm", None), getattr(trunk, "head", None), visual.head):
                if layer is not None:
                    tokens = layer(tokens)
            store["tokens"] = tokens
        handle = pool.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------------------
# The module DeepSpeed wraps


@dataclass
class Encoded:
    """Normalised embeddings of one batch (local rows)."""

    image: torch.Tensor
    text: torch.Tensor
    negatives: Optional[torch.Tensor]
    concepts: Optional[torch.Tensor]
    tokens: Optional[torch.Tensor]
    logit_scale: torch.Tensor  # exponentiated
    logit_bias: Optional[torch.Tensor]


class Encoder(nn.Module):
    """Wraps an open_clip model; `forward` encodes a whole training batch in one model forward.

    The open_clip model is `self.clip`, so state-dict keys carry a `clip.` prefix that the export strips.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        promote_zero_dim_parameters(clip)
        self.clip = clip

    def forward(self, images: torch.Tensor, text: torch.Tensor, negatives: Optional[torch.Tensor] = None,
                concepts: Optional[torch.Tensor] = None, want_tokens: bool = False) -> Encoded:
        batch = text.shape[0]
        pieces = [text]
        num_negatives = 0
        if negatives is not None:
            num_negatives = negatives.shape[1]
            pieces.append(negatives.reshape(-1, negatives.shape[-1]))
        if concepts is not None:
            pieces.append(concepts)
        all_text = torch.cat(pieces) if len(pieces) > 1 else text
        with capture_visual_tokens(self.clip, enabled=want_tokens) as store:
            out = self.clip(images, all_text)
        if isinstance(out, dict):
            image, texts = out["image_features"], out["text_features"]
            logit_scale, logit_bias = out["logit_scale"], out.get("logit_bias")
        else:
            image, texts, logit_scale = out[:3]
            logit_bias = out[3] if len(out) > 3 else None
        logit_scale = logit_scale.reshape(())
        logit_bias = logit_bias.reshape(()) if logit_bias is not None else None
        positives = texts[:batch]
        negative_emb = None
        if negatives is not None:
            negative_emb = texts[batch:batch + batch * num_negatives].reshape(batch, num_negatives, -1)
        concept_emb = texts[batch + batch * num_negatives:] if concepts is not None else None
        tokens = F.normalize(store["tokens"], dim=-1) if want_tokens else None
        return Encoded(image, positives, negative_emb, concept_emb, tokens, logit_scale, logit_bias)


# --------------------------------------------------------------------------------------------------------------
# Parameter groups and the export (the logit-scale clamp and the full fp32 gather are DeepSpeed's side:
# compclip.trainer.engine)


def exclude_from_weight_decay(name: str, param: torch.Tensor) -> bool:
    """open_clip's rule: gains, biases, logit_scale/logit_bias and every < 2-d tensor (class embedding) are not
    decayed."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def parameter_groups(model: nn.Module, weight_decay: float) -> List[Dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if exclude_from_weight_decay(name, param) else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def model_config_of(arch: str) -> Optional[Dict]:
    """open_clip's model config (a copy) of an architecture name or `local-dir:` folder; None where it is not
    known locally (`hf-hub:`)."""
    register_model_configs()
    if arch.startswith("local-dir:"):
        path = Path(arch[len("local-dir:"):]) / "open_clip_config.json"
        return json.loads(path.read_text(encoding="utf-8"))["model_cfg"] if path.is_file() else None
    config = open_clip.get_model_config(arch)
    return copy.deepcopy(config) if config is not None else None


def local_dir_of(export: str) -> str:
    """The open_clip local folder written next to an export `.../epoch_N.pt`: `.../epoch_N/`."""
    return str(Path(export).with_suffix(""))


def export_checkpoint(state_dict: Dict[str, torch.Tensor], path: str, epoch: int, name: str,
                      config: Optional[dict] = None, *, quick_gelu: bool = False,
                      preprocess_cfg: Optional[Dict] = None, tokenizer=None) -> Optional[str]:
    """Write the open_clip export in both forms stock open_clip loads:

    * `path` (`epoch_N.pt`): `{"epoch", "name", "state_dict"}` (+ the resolved config), for
      `open_clip.create_model_and_transforms(arch, pretrained=path, force_quick_gelu=...)`;
    * the folder `epoch_N/` (`local_dir_of(path)`): `open_clip_config.json` (the model config with `quick_gelu` as
      trained, and the preprocess config) and `open_clip_model.safetensors`, plus the tokenizer's files for a Hugging
      Face tokenizer, for `open_clip.create_model_and_transforms("local-dir:epoch_N")` with no other argument.

    Returns the folder, or None when the architecture's config is not known locally (an `hf-hub:` model)."""
    from safetensors.torch import save_file

    from compclip import durable

    payload = {"epoch": epoch, "name": name, "state_dict": state_dict}
    if config is not None:
        payload["compclip_config"] = config
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    durable.torch_save(payload, path)
    model_cfg = model_config_of(name)
    if model_cfg is None:
        logger.warning("%s: no local open_clip config for %s; only the .pt export is written", path, name)
        return None
    if quick_gelu:
        model_cfg["quick_gelu"] = True
    folder = Path(local_dir_of(path))
    building = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    (building / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": dict(preprocess_cfg or {})}, indent=1), encoding="utf-8")
    save_file({key: value.detach().contiguous() for key, value in state_dict.items()},
              str(building / "open_clip_model.safetensors"))
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "save_pretrained"):  # open_clip's HFTokenizer: local-dir reads it here
        inner.save_pretrained(str(building))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(building, folder)
    durable.fsync_dir(folder.parent)
    return str(folder)
