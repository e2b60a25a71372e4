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


def build_model(arch: str, pretrained: str = "", force_quick_gelu: bool = False, *, load_weights: bool = True,
                initialize: Optional[bool] = None) -> Tuple[nn.Module, object, object, object]:
    """(model, train preprocess, eval preprocess, tokenizer), fp32 on the CPU.

    `pretrained`: an open_clip tag, a local file (open_clip state dict, `{"state_dict": ...}` checkpoint such as
    our `epoch_N.pt`), or "" for random init. `load_weights=False` builds the architecture only (EMA teacher,
    whose weights are copied from the student). `initialize`: draw the random initial weights; by default unless
    `pretrained` is a checkpoint file loaded here. A caller that writes every parameter afterwards passes False
    (`uninitialized_parameters`).
    """
    problem = known_architecture(arch)
    if problem:
        raise ValueError(f"model.arch: {problem}")
    quick = uses_quick_gelu(arch, pretrained, force_quick_gelu)
    source = pretrained if (pretrained and load_weights) else None
    if source and os.path.sep in source and not os.path.exists(source):
        raise FileNotFoundError(f"model.pretrained: no such file {source}")
    model, preprocess_train, preprocess_val = create_model_and_transforms(
        arch, source, quick, initialize=initialize)
    tokenizer = open_clip.get_tokenizer(arch)
    return model, preprocess_train, preprocess_val, tokenizer


def create_model_and_transforms(arch: str, pretrained: Optional[str], force_quick_gelu: bool, device="cpu",
                                initialize: Optional[bool] = None):
    """open_clip's `create_model_and_transforms`, also for a checkpoint file on an `hf-hub:` / `local-dir:`
    architecture (open_clip ignores `pretrained` there and would silently keep the folder's own or random weights:
    the file is loaded after the model is built). `initialize` draws the random initial weights; by default not
    when `pretrained` is a checkpoint file (loaded strictly, every parameter written). A hub tag (`openai`) keeps
    them: next to a download they cost nothing, and nothing here sees what the download holds."""
    schema = arch.startswith(("hf-hub:", "local-dir:"))
    if initialize is None:
        initialize = not (pretrained and os.path.isfile(pretrained))
    with contextlib.nullcontext() if initialize else uninitialized_parameters():
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            arch, pretrained=None if schema else pretrained, force_quick_gelu=force_quick_gelu, device=device,
            precision="fp32")
    if schema and pretrained:
        open_clip.load_checkpoint(model, pretrained, device=device)
    return model, preprocess_train, preprocess_val


@contextlib.contextmanager
def uninitialized_parameters():
    """Build modules without drawing their random initial weights, for weights that are loaded right after: every
    in-place initialiser of `torch.nn.init` (what `nn.Linear`, `nn.LayerNorm`, ... and open_clip's
    `init_parameters` call) leaves its tensor as allocated. A ViT-B builds in about 0.15 s instead of 0.9 s. Only
    for callers that then write every parameter: a strict load (a checkpoint file, an evaluation's state dict,
    compclip-export) or the EMA teacher's copy of the student (`EMATeacher.copy_from`, a copy, not 0 x teacher +
    student: 0 x NaN is NaN); buffers computed at construction (attention masks, position ids) are unaffected.
    Not thread-safe (it patches `torch.nn.init` for the duration)."""
    init = torch.nn.init
    names = [name for name in dir(init) if name.endswith("_") and not name.startswith("_")
             and callable(getattr(init, name))]
    saved = {name: getattr(init, name) for name in names}

    def keep(tensor, *args, **kwargs):
        return tensor

    try:
        for name in names:
            setattr(init, name, keep)
        yield
    finally:
        for name, function in saved.items():
            setattr(init, name, function)


def build_from_config(model_cfg, *, load_weights: bool = True, state: Optional[Dict[str, torch.Tensor]] = None,
                      initialize: Optional[bool] = None):
    """`build_model` for a `ModelConfig` (gradient checkpointing as configured, towers locked as configured).
    Without weights (the EMA teacher's architecture, an evaluation copy) the activation is still the trained one:
    `pretrained` decides QuickGELU, and the locks are applied too (freezing BatchNorm statistics replaces modules,
    which every copy must share). `state` is loaded into the model (strictly: no random weights are drawn for it).
    `initialize` as in build_model. Returns what build_model does."""
    if state is not None:
        initialize = False
    clip, *rest = build_model(model_cfg.arch, model_cfg.pretrained, model_cfg.force_quick_gelu,
                              load_weights=load_weights, initialize=initialize)
    if model_cfg.grad_checkpointing and load_weights:
        clip.set_grad_checkpointing(True)
    locked = lock_towers(clip, model_cfg)
    if locked and load_weights:
        logger.info("%s", locked)
    if state is not None:
        clip.load_state_dict(state)
    return (clip, *rest)


# --------------------------------------------------------------------------------------------------------------
# Locked towers (open_clip's --lock-image / --lock-text)


def lock_problem(model_cfg) -> Optional[str]:
    """What makes the configured locks impossible for this architecture (None when they are fine), found from its
    model config without building it: open_clip's own text transformer cannot leave LayerNorms trainable."""
    if not (model_cfg.lock_text and not model_cfg.lock_text_freeze_layer_norm):
        return None
    config = model_config_of(model_cfg.arch)
    if config is None or config.get("text_cfg", {}).get("hf_model_name"):
        return None  # a Hugging Face text tower (or not known here: lock_towers checks the built model)
    return (f"model.lock_text_freeze_layer_norm=false: the text tower of {model_cfg.arch} is open_clip's own "
            "transformer, whose lock_text_tower freezes its LayerNorms with the other weights; only Hugging Face "
            "text towers can leave them trainable (set it to true)")


def lock_towers(clip: nn.Module, model_cfg) -> str:
    """Freeze what `model.lock_image` / `model.lock_text` ask for, with open_clip's own `lock_image_tower` /
    `lock_text_tower` (the same layer groups as open_clip's training flags); returns a summary for the log ("" when
    nothing is locked). Frozen parameters get `requires_grad = False`, so `parameter_groups` leaves them out of the
    optimizer and DeepSpeed keeps no gradient, master copy or optimizer state for them."""
    if not (model_cfg.lock_image or model_cfg.lock_text):
        return ""
    if model_cfg.lock_image:
        clip.lock_image_tower(unlocked_groups=model_cfg.lock_image_unlocked_groups,
                              freeze_bn_stats=model_cfg.lock_image_freeze_bn_stats)
    if model_cfg.lock_text:
        from open_clip.hf_model import HFTextEncoder

        if not model_cfg.lock_text_freeze_layer_norm and not isinstance(getattr(clip, "text", None), HFTextEncoder):
            raise ValueError(lock_problem(model_cfg)
                             or "model.lock_text_freeze_layer_norm=false needs a Hugging Face text tower")
        clip.lock_text_tower(unlocked_layers=model_cfg.lock_text_unlocked_layers,
                             freeze_layer_norm=model_cfg.lock_text_freeze_layer_norm)
    total = sum(p.numel() for p in clip.parameters())
    frozen = sum(p.numel() for p in clip.parameters() if not p.requires_grad)
    towers = [f"{tower} tower ({count} unlocked layer groups)" if count else f"{tower} tower"
              for tower, locked, count in (("image", model_cfg.lock_image, model_cfg.lock_image_unlocked_groups),
                                           ("text", model_cfg.lock_text, model_cfg.lock_text_unlocked_layers))
              if locked]
    return (f"locked {' and '.join(towers)}: {frozen:,} of {total:,} parameters frozen, "
            f"{total - frozen:,} trained")


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
    """AdamW's groups over the trainable parameters (frozen ones, e.g. of a locked tower, are left out): without
    weight decay, then with it; a group left empty by locking is dropped."""
    return [{"params": params, "weight_decay": decay}
            for params, decay in zip(_grouped_parameters(model), (0.0, weight_decay)) if params]


def _grouped_parameters(model: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if exclude_from_weight_decay(name, param) else decay).append(param)
    return no_decay, decay


def parameter_group_names(model: nn.Module, prefix: str = "") -> List[List[str]]:
    """The parameter names of each of `parameter_groups(model)`, in the optimizer's order, with `prefix` (what a
    stage-0 DeepSpeed checkpoint's per-group fp32 masters are matched by)."""
    names = {id(param): prefix + name for name, param in model.named_parameters()}
    return [[names[id(param)] for param in group["params"]] for group in parameter_groups(model, 0.0)]


def load_trained_weights(clip: nn.Module, saved: Dict[str, torch.Tensor]) -> Tuple[List[str], List[str]]:
    """Load weights saved under the trained Encoder's names (`clip.<key>`, 0-dim parameters as [1]:
    `promote_zero_dim_parameters`) into the open_clip model `clip`; returns (its parameters `saved` lacks, the keys
    it does not know). Buffers `saved` lacks keep their values (an EMA teacher stores parameters only)."""
    shapes = {key: value.shape for key, value in clip.state_dict().items()}
    state = {key[len("clip."):]: value for key, value in saved.items() if key.startswith("clip.")}
    state = {key: value.reshape(shapes[key]) if key in shapes and value.numel() == shapes[key].numel() else value
             for key, value in state.items()}
    missing, unexpected = clip.load_state_dict(state, strict=False)
    parameters = dict(clip.named_parameters())
    return [key for key in missing if key in parameters], list(unexpected)


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
    weights = building / "open_clip_model.safetensors"
    save_file({key: value.detach().contiguous() for key, value in state_dict.items()}, str(weights))
    os.chmod(weights, Path(path).stat().st_mode & 0o777)  # safetensors creates it 0600; as readable as the .pt
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "save_pretrained"):  # open_clip's HFTokenizer: local-dir reads it here
        inner.save_pretrained(str(building))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(building, folder)
    durable.fsync_dir(folder.parent)
    return str(folder)
