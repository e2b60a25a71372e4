"""The training configuration: the schema (nested dataclasses), YAML files, command-line overrides, and the one rule
that decides which layers a run starts from (`request`). Deriving values from it (batch arithmetic, the synthetic
world's paths, the run folder, the DeepSpeed config) is `compclip.resolve`'s job, and nothing else's.

Layers, lowest first:
1. the dataclass defaults below (what `--help` shows);
2. the embedded default, `configs/default.yaml` (the synthetic-world demo), only when the command line names no
   `--config` and no data (`data.train_manifest` / `data.val_manifest`), or names it as `--config default`;
3. the YAML files of `--config`, in order (a later file overlays an earlier one; `loss.terms` is replaced whole);
4. the command line (`--section.field=value`).
With `--resume`, the run's own saved request (`config.requested.yaml` of the checkpoint) replaces layers 1-3, and a
key given again must keep its value unless it is one of `RESUME_MAY_CHANGE`.

Every key is checked: an unknown key or a value of the wrong type is a ``ConfigError`` that names the dotted key,
raised before any process group, worker or data file is touched.

Command line: ``--section.field=value`` or ``--section.field value``; values are parsed as YAML
(``--loss.terms={negclip: 1.0, igc: 0.1}``, ``--optim.betas=[0.9,0.98]``), string fields keep the raw text.
Mapping fields also take one key at a time: ``--loss.terms.igc=0.1``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from compclip import durable
from compclip.data import DataConfig
from compclip.evaluation import EvalConfig
from compclip.fields import Section, field_docstrings
from compclip.kernels.dispatch import BACKENDS


class ConfigError(ValueError):
    """A bad configuration key or value (the message names the dotted key)."""


@dataclass
class ModelConfig(Section):
    """Which open_clip model to train and where its starting weights come from."""

    arch: str = "ViT-B-32"
    """open_clip architecture name (`ViT-B-32`, `ViT-B-16-SigLIP`, ...) or one of compclip/model_configs
    (`compclip-tiny`; `compclip-tiny-sincos`, the same with a fixed 2-D sin-cos position embedding in the image
    tower, the embedded default's and the study's; `compclip-tiny-map`, SigLIP-style)."""
    pretrained: str = "openai"
    """A pretrained tag known to open_clip (`openai`, needs the hub or open_clip's cache), a local checkpoint path
    (an open_clip state dict, our `epoch_N.pt` export, or a consolidated fp32 state dict), empty for random init, or
    `synthetic-bow[:EPOCHS]`: the bag-of-words CLIP of the synthetic world the run trains on (the study's stage 1,
    EPOCHS long if given, trained once by a child run in `<data.synthetic.root>/pretrained/` and reused after;
    the embedded default's is `synthetic-bow:1`)."""
    force_quick_gelu: bool = False
    """Use QuickGELU activations. Resolved to true when `pretrained` is `openai` (the OpenAI weights were trained
    with it, and running them with GELU silently costs accuracy), so the run's config.yaml and its exports say so."""
    grad_checkpointing: bool = False
    """Recompute activations in the backward pass (open_clip's set_grad_checkpointing)."""
    tf32: bool = True
    """On a CUDA device, let float32 matmuls and cuDNN convolutions use TF32 tensor cores (Ampere and newer; on
    older GPUs the switch does nothing), as open_clip's training does; the fused kernels' float32 dots follow it.
    False: IEEE float32 everywhere. bf16 / fp16 compute is unaffected, and so is the CPU."""
    lock_image: bool = False
    """Freeze the image tower (open_clip's `--lock-image`, as in LiT) through open_clip's `lock_image_tower`: its
    parameters get no gradient, no optimizer state and no weight decay, and stay as they started (under bf16 /
    fp16 they are held, and exported, in that precision: DeepSpeed keeps fp32 masters only of trained parameters)."""
    lock_image_unlocked_groups: int = 0
    """With lock_image: leave the last N layer groups of the image tower trainable (open_clip's
    `--lock-image-unlocked-groups`). For an open_clip ViT the groups are, first to last: the patch embedding with the
    class and position embeddings and ln_pre, each residual block but the last, the last block with ln_post, and
    the projection; timm towers use timm's own grouping."""
    lock_image_freeze_bn_stats: bool = False
    """With lock_image: also freeze the BatchNorm running statistics of the locked layers (open_clip's
    `--lock-image-freeze-bn-stats`; ResNet and timm convolutional towers; a ViT has none)."""
    lock_text: bool = False
    """Freeze the text tower (open_clip's `--lock-text`) through open_clip's `lock_text_tower`: token and position
    embeddings, the transformer, the final LayerNorm and the text projection."""
    lock_text_unlocked_layers: int = 0
    """With lock_text: leave the last N layer groups of the text tower trainable (open_clip's
    `--lock-text-unlocked-layers`). For open_clip's own text transformer the groups are, first to last: the
    embeddings, each residual block but the last, the last block with the final LayerNorm, and the projection."""
    lock_text_freeze_layer_norm: bool = True
    """With lock_text: freeze the LayerNorms of the locked layers too (open_clip's `--lock-text-freeze-layer-norm`).
    Only Hugging Face text towers can leave them trainable; open_clip's own text transformer refuses false (the
    default here is open_clip's `lock_text_tower` default, not its command line's)."""


@dataclass
class LossConfig(Section):
    """The training objective: a method from compclip/methods and its loss-term weights."""

    method: str = "negclip"
    """Registry name: `clip`, `negclip`, `ceclip`, `degla`, `c2lip` or `composite` (any terms)."""
    terms: Dict[str, float] = field(default_factory=dict)
    """Loss terms and their weights, e.g. {negclip: 1.0, cmr: 0.2, imc: 0.2}. Empty = the method's published
    weights; given = replaces them (`composite` requires it). Names: clip, siglip, negclip, cmr, imc, igc, tgc,
    distill, npc, xac."""
    options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    """Keyword options per term, passed to compclip.losses.terms.TERMS[name], e.g. {imc: {variant: released}}."""
    backend: str = "auto"
    """Kernel backend for every term: `auto` (Triton on CUDA), `triton` or `torch`."""
    cmr_upper: float = 10.0
    """Upper clamp of the CE-CLIP adaptive threshold (scaled-logit units)."""
    ema_decay: float = 0.9996
    """EMA decay of the teacher for terms that need one (tgc, distill)."""


@dataclass
class OptimConfig(Section):
    """AdamW, the learning-rate schedule and the length of the run."""

    lr: float = 1e-5
    """Peak learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay; never applied to gains, biases, logit_scale / logit_bias or 1-d embeddings."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    schedule: str = "cosine"
    """`cosine` (to 0 after linear warm-up) or `constant` (after warm-up)."""
    warmup_steps: int = 50
    """Optimizer steps of linear warm-up."""
    epochs: int = 1
    """Passes over the training data."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs). The schedule spans min(epochs, max_steps)."""
    grad_accumulation: int = 1
    """Micro-batches per optimizer step. Every micro-batch's loss uses only that micro-batch's global batch as
    negatives (see README, 'Gradient accumulation'); for a larger contrastive batch use optim.contrastive_batch."""
    contrastive_batch: int = 0
    """Samples one loss sees, over all ranks (0 = data.batch_size x world size). Larger than what fits: one step
    caches the features of every chunk of data.batch_size per rank without autograd, takes the global-batch loss's
    gradient w.r.t. them, then re-forwards each chunk with autograd (gradient caching, compclip.trainer.gradcache;
    ~1.3-1.5x the time of a plain step). Must be a multiple of data.batch_size x world size; not with grad_accumulation > 1.
    Cached per rank: B/world x (2 + K + concepts/sample) x D features and, for C2LIP's XAC, the visual tokens
    B/world x L x D in the compute dtype (e.g. ViT-B/32 at 224 px, B/world = 4096: 4096 x 49 x 512 x 2 bytes = 206
    MB in bf16), each twice (values and gradients)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    logit_scale_max: float = 100.0
    """exp(logit_scale) is clamped to at most this after every optimizer step (all three papers use 100)."""


@dataclass
class DeepSpeedConfig(Section):
    """How the model is distributed; turned into a DeepSpeed config by `deepspeed_config()`."""

    zero_stage: int = 0
    """ZeRO stage 0, 1, 2 or 3."""
    precision: str = "fp32"
    """`fp32`, `bf16` or `fp16` (the EMA teacher stays fp32 in every case)."""
    offload_optimizer: bool = False
    """ZeRO 1-3: keep optimizer states in CPU memory."""
    offload_param: bool = False
    """ZeRO 3: keep parameters in CPU memory."""
    config_file: str = ""
    """An explicit DeepSpeed JSON (also `--deepspeed_config FILE`). Its values override the generated ones;
    every difference is reported, and a batch-size conflict is an error."""


@dataclass
class LogConfig(Section):
    """Run folder, logging and checkpoints."""

    logs: str = "logs"
    """Parent folder of run folders."""
    name: str = ""
    """Run folder name under `logs`; empty = `<method>-<arch>-<timestamp>`."""
    every_n_steps: int = 10
    """Write metrics.jsonl / tensorboard every N optimizer steps (step 1 is always logged)."""
    tensorboard: bool = True
    """Write tensorboard events to <run>/tensorboard."""
    wandb: bool = False
    """Also log to Weights & Biases (open_clip's `--report-to wandb`; needs `pip install wandb`): the scalars
    tensorboard gets, the resolved configuration, and every evaluation as a table and as an artifact (its folder
    `eval/<label>/`). Rank 0 logs; its files go to `<run>/wandb/`, and a resumed run continues the same W&B run."""
    wandb_project: str = "compclip"
    """W&B project."""
    wandb_entity: str = ""
    """W&B entity (user or team); empty = the account's default."""
    wandb_name: str = ""
    """W&B run name; empty = the run folder's name (`log.name`)."""
    wandb_tags: List[str] = field(default_factory=list)
    """W&B tags of the run."""
    wandb_mode: str = ""
    """`online`, `offline` (everything written to `<run>/wandb/` with no network; upload later with `wandb sync
    <run>/wandb/offline-run-*`) or `disabled`; empty = W&B's own choice (the WANDB_MODE environment variable, else
    online)."""
    progress: bool = True
    """Progress of the run on rank 0: a tqdm bar in a terminal; in a log (a batch job), a plain line every
    COMPCLIP_PROGRESS_INTERVAL seconds (30) with steps, rate, elapsed time and ETA."""
    save_every_n_steps: int = 0
    """Also write a DeepSpeed checkpoint every N optimizer steps (0 = only at the end of each epoch)."""
    save_every_n_minutes: float = 0.0
    """Also write a DeepSpeed checkpoint when N minutes of wall clock have passed since the last such save, at
    the same optimizer step on every rank (0 = off). For preemptible jobs; SIGTERM always saves."""
    keep_checkpoints: int = 0
    """Keep the newest N complete DeepSpeed checkpoints of the current line (README, 'Long runs'); older ones are
    deleted once a newer one is complete (0 = keep all)."""
    keep_abandoned: bool = True
    """When a run resumes a tag other than the newest of its line (or falls back from a damaged one, or starts
    afresh in a folder with checkpoints), the tags it leaves behind are moved to
    `checkpoints/deepspeed/abandoned/line<L>/` (true) or deleted (false). True by default: they may be hours of
    work, and a resume of the wrong tag should cost disk space, not the work."""
    keep_exports: int = 0
    """Keep the newest N exports epoch_N.pt (0 = keep all)."""
    save_deepspeed: bool = True
    """Write DeepSpeed checkpoints (needed for --resume) at the end of each epoch and of the run."""
    export: bool = True
    """Write the open_clip-loadable <run>/checkpoints/epoch_N.pt after each epoch."""


@dataclass
class TrainConfig(Section):
    """A training run. Sections: model, data, loss, optim, deepspeed, eval, log."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data (compclip.data.DataConfig; `data.batch_size` is the micro-batch per rank)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """Distribution and precision."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic evaluation (compclip.evaluation.EvalConfig)."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging and checkpoints."""
    global_batch_size: int = 0
    """Images per optimizer step over all ranks and micro-batches (the papers' "batch 256"); sets data.batch_size
    to global / (world size x optim.grad_accumulation), which must divide evenly. 0 = use data.batch_size."""
    seed: int = 0
    """Seed of model init, data order and every RNG."""
    device: str = "auto"
    """`auto` (the DeepSpeed accelerator: CUDA if present, else CPU), `cuda` or `cpu`."""
    resume: str = ""
    """`latest` (the newest complete DeepSpeed checkpoint of this run folder) or a checkpoint folder/tag path.
    Same world size and ZeRO stage: bit-identical continuation. For another world size use `init_from`."""
    init_from: str = ""
    """A DeepSpeed checkpoint folder: load its consolidated fp32 weights (student and EMA teacher) and start a
    new run (optimizer, schedule and data order restart). For changing the number of ranks."""
    eval_synthetic: bool = True
    """When training on the synthetic world and no benchmark is configured, evaluate on the world's binding sets
    and retrieval split."""
    eval_before: bool = True
    """Evaluate before the first step too, and print a before -> after table at the end."""
    max_nonfinite: int = 5
    """Consecutive non-finite losses (each step is skipped) that stop the run."""
    threads: int = 0
    """torch CPU threads per rank (0 = OMP_NUM_THREADS when set, else cores / local ranks)."""


# --------------------------------------------------------------------------------------------------------------
# Type checking and conversion


@functools.lru_cache(maxsize=None)
def _hints(cls) -> Dict[str, Any]:
    # Modules with `from __future__ import annotations` store field types as strings; evaluating them is most of
    # the cost of reading a config, and a class's hints never change.
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _shown(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters (a 1 MB value makes a useless message)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section {tp.__name__}), got {value!r}")
        return _build(tp, value, key)
    if origin in (list, List, Sequence, tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r} ({type(value).__name__})")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, f"{key}"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected a bool (true/false), got {value!r} ({type(value).__name__})")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -2 ** 63 <= value < 2 ** 63:  # torch, numpy and the C libraries below take 64-bit integers
                raise ConfigError(f"{key}: {_shown(value)} does not fit in 64 bits")
            return value
        raise ConfigError(f"{key}: expected an int, got {_shown(value)} ({type(value).__name__})")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 2 ** 1024 else math.inf
        elif isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a float, got {_shown(value)} ({type(value).__name__})")
        if not math.isfinite(number):  # no setting means NaN or infinity; it would only show up as a NaN loss
            raise ConfigError(f"{key}: expected a finite number, got {_shown(value)}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `name: 2024` in YAML
        if value is None:
            return ""
        raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__})")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls, values: Dict[str, Any], prefix: str = ""):
    """`cls` from defaults overlaid with `values` (checked, recursively)."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = [n for n in sorted(names) if n.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint}; valid keys here: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc


def to_dict(cfg) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(values: Dict[str, Any]) -> TrainConfig:
    """A checked TrainConfig from a nested mapping over the dataclass defaults (a saved config.yaml, a study's
    child config)."""
    cfg = _build(TrainConfig, values)
    validate(cfg)
    return cfg


def merge_dicts(base: Dict[str, Any], overlay: Dict[str, Any]) -> Dict[str, Any]:
    """`overlay` over `base`, section by section; a value that is not a mapping replaces (lists included)."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def flatten(values: Dict[str, Any], cls=TrainConfig, prefix: str = "") -> Dict[str, Any]:
    """{dotted key: value} of a nested config mapping; a mapping-typed field (loss.terms) is one value."""
    hints = _hints(cls)
    out: Dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        tp = hints.get(key)
        if tp is not None and dataclasses.is_dataclass(tp) and isinstance(value, dict):
            out.update(flatten(value, tp, dotted + "."))
        else:
            out[dotted] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# Command line


def _parse_value(raw: str, tp: Any) -> Any:
    if tp is str or (typing.get_origin(tp) is typing.Union and str in typing.get_args(tp)
                     and raw.lower() not in ("null", "none", "~")):
        return raw
    if raw.lower() == "none":
        return None
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def _field_type(dotted: str) -> Tuple[Any, List[str]]:
    """Type of the field at a dotted path of TrainConfig (raises for an unknown key)."""
    cls, tp = TrainConfig, TrainConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if dataclasses.is_dataclass(cls):
            hints = _hints(cls)
            if part not in hints:
                raise ConfigError(f"unknown config key {dotted!r} (no field {part!r} in "
                                  f"{'.'.join(parts[:i]) or 'the top level'}; valid: {', '.join(sorted(hints))})")
            tp = hints[part]
            cls = tp if dataclasses.is_dataclass(tp) else None
        elif typing.get_origin(tp) in (dict, Dict):
            tp = typing.get_args(tp)[1] if typing.get_args(tp) else Any
            cls = None
        else:
            raise ConfigError(f"unknown config key {dotted!r}: {'.'.join(parts[:i])} is not a section")
    return tp, parts


def _nest(parts: List[str], value: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = value
    for part in reversed(parts):
        out = {part: out}
    return out


# Flags the DeepSpeed launcher and users pass that are not `--section.field`.
ALIASES = {"deepspeed_config": "deepspeed.config_file"}


@dataclass(frozen=True)
class Args:
    """The command line, split: YAML files, `(dotted key, raw value)` overrides, and the flags that are not config
    keys (the launcher's `--local_rank`; `--plan` and its options, see compclip.plan)."""

    configs: Tuple[str, ...] = ()
    overrides: Tuple[Tuple[str, str], ...] = ()
    local_rank: Optional[int] = None
    plan: bool = False
    plan_gpu_memory: str = ""
    plan_world_size: int = 0


def _flag_value(key: str, raw: str):
    if key == "local_rank":
        if not raw.isdigit():
            raise ConfigError(f"--local_rank: expected a rank number, got {_shown(raw)}")
        return int(raw)
    if key == "plan_world_size":
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"--plan-world-size: expected a positive number of ranks, got {raw!r}")
        return int(raw)
    if key == "plan":
        if raw.lower() not in ("true", "1", "yes"):
            raise ConfigError(f"--plan takes no value (got {raw!r})")
        return True
    return raw


FLAGS = {"local_rank", "plan", "plan_gpu_memory", "plan_world_size"}


def parse_args(argv: Sequence[str]) -> Args:
    """`Args` from argv (`--key=value` or `--key value`; a bare `--key` is `true`)."""
    configs: List[str] = []
    overrides: List[Tuple[str, str]] = []
    flags: Dict[str, Any] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --section.field=value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            key = arg[2:]
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raw = "true"  # a bare flag is `true` (booleans), e.g. --log.progress
                i += 1
            else:
                raw = args[i + 1]
                i += 2
        key = key.replace("-", "_") if "." not in key else key
        key = ALIASES.get(key, key)
        if key == "config":
            configs.append(raw)
        elif key in FLAGS:
            flags[key] = _flag_value(key, raw)
        else:
            overrides.append((key, raw))
    return Args(tuple(configs), tuple(overrides), **flags)


# The method YAMLs ship with the package as `compclip/configs/` (setup.py maps it to the repository's top-level
# `configs/`); in a source checkout (editable install, or `python compclip/train.py` before installing) they are
# that top-level folder.
BUNDLED_CONFIG_DIRS = (Path(__file__).resolve().parent / "configs", Path(__file__).resolve().parent.parent / "configs")
EMBEDDED_DEFAULT = "default"
"""The bundled config (`configs/default.yaml`) layered under a run that names no config and no data."""
RECIPE_TABLE = "recipes"
"""`configs/recipes.yaml`: the published-recipe table the bundled configs are tested against; not a run config."""
DATA_KEYS = ("data.train_manifest", "data.val_manifest")
"""Naming one of these on the command line means "my data": the embedded default then stays out."""


def bundled_configs() -> List[str]:
    """Names `--config` accepts besides paths: `degla`, `tiny`, `tiny/c2lip`, ..."""
    for root in BUNDLED_CONFIG_DIRS:
        if root.is_dir():
            names = (str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))
            return sorted(name for name in names if name != RECIPE_TABLE)
    return []


def recipe_table() -> Dict[str, Dict[str, Any]]:
    """{bundled config name: its published recipe} (configs/recipes.yaml)."""
    with open(config_path(RECIPE_TABLE), encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def config_path(name: str) -> str:
    """`--config` value -> YAML file: an existing file as given, else a bundled name (`degla`, `tiny/c2lip`,
    with or without `.yaml`; a folder of that name in the working directory does not hide it). An unknown name is
    returned as is (the caller reports the missing file)."""
    if os.path.isfile(name):
        return name
    stem = name[:-len(".yaml")] if name.endswith(".yaml") else name
    for root in BUNDLED_CONFIG_DIRS:
        candidate = root / f"{stem}.yaml"
        if candidate.is_file():
            return str(candidate)
    return name


MAX_CONFIG_BYTES = 16 << 20
"""A config file (YAML or DeepSpeed JSON) larger than this is refused unread: configs are kilobytes, and a file
this size named by mistake (a checkpoint, a dataset) would be read whole before it failed."""


def read_config_bytes(path: str, what: str) -> bytes:
    """The content of the config file `path`; ConfigError naming `what` and the file for anything that is not a
    readable regular file of at most MAX_CONFIG_BYTES (a FIFO or a device would block or never end a read)."""
    shown = path if len(path) <= 200 and "\x00" not in path else _shown(path)
    try:
        return durable.read_bounded(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"{what} {shown}: no such file") from None
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
        raise ConfigError(f"{what} {shown}: {getattr(error, 'strerror', None) or error}") from None


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser when there is one: 50x faster
    """YAML's safe loader, refusing a key repeated within one mapping: YAML forbids it, and PyYAML would keep the
    last value and drop the first without a word."""


def _unique_mapping(loader, node, deep=False):
    first: Dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {_shown(key)} repeated (first at line {first[key] + 1}): one of the two values "
                    "would be lost", key_node.start_mark)
            first[key] = key_node.start_mark.line
        except TypeError:  # an unhashable key: SafeConstructor reports it
            pass
    return yaml.constructor.SafeConstructor.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(path: str, what: str) -> Any:
    """The YAML document of the file `path` (read_config_bytes); errors name `what`, the file and the line."""
    data = read_config_bytes(path, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ConfigError(f"{what} {path}: line {line}: not UTF-8 text ({error.reason} at byte {error.start})"
                          ) from None
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = str(getattr(error, "problem", None) or error)
        raise ConfigError(f"{what} {path}: {where}not valid YAML: {problem[:200]}") from None


def read_yaml(name: str) -> Dict[str, Any]:
    """The mapping of a `--config` file (a path or a bundled name); errors name the file."""
    path = config_path(name)
    if os.path.exists(path) and Path(path).resolve() == Path(config_path(RECIPE_TABLE)).resolve():
        raise ConfigError(f"--config {name}: {path} is the published-recipe table, not a run config; use one of "
                          f"{', '.join(bundled_configs())}")
    if not os.path.lexists(path):
        raise ConfigError(f"--config {_shown(name)}: no such file, nor a bundled config "
                          f"({', '.join(bundled_configs())})")
    loaded = load_yaml(path, "--config")
    if loaded is None:  # empty, or comments only: most likely a file cut short, never a run anyone meant
        raise ConfigError(f"--config {path}: holds no settings (an empty or truncated file?)")
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping of sections")
    return loaded


def _overlay_yaml(merged: Dict[str, Any], loaded: Dict[str, Any]) -> Dict[str, Any]:
    merged = merge_dicts(merged, loaded)
    # `loss.terms` replaces rather than merges: a YAML that names terms means exactly those terms.
    if isinstance(loaded.get("loss"), dict) and "terms" in loaded["loss"]:
        merged["loss"] = dict(merged["loss"], terms=loaded["loss"]["terms"])
    return merged


def _overlay_override(merged: Dict[str, Any], dotted: str, raw: str) -> Dict[str, Any]:
    tp, parts = _field_type(dotted)
    value = _parse_value(raw, tp)
    if dotted == "loss.terms":  # the whole mapping replaces the terms of lower layers
        return dict(merged, loss=dict(merged.get("loss", {}), terms=value))
    # --loss.terms.igc=0.1 adds / reweights one term; every other key replaces its value
    return merge_dicts(merged, _nest(parts, value))


def named_values(args: Args) -> Dict[str, Any]:
    """The nested mapping the YAML files and command-line overrides give, without any lower layer."""
    merged: Dict[str, Any] = {}
    for name in args.configs:
        merged = _overlay_yaml(merged, read_yaml(name))
    for dotted, raw in args.overrides:
        merged = _overlay_override(merged, dotted, raw)
    return merged


@dataclass(frozen=True)
class Request:
    """What a command line asks for: the config after layering, the layers it came from, and the keys it named."""

    config: TrainConfig
    layers: Tuple[str, ...]
    """e.g. ("defaults", "configs/default.yaml (embedded default)", "command line")."""
    named: Dict[str, Any]
    """{dotted key: value} given by a YAML or the command line (not by a lower layer)."""
    args: Args
    resumed_from: str = ""
    """The checkpoint tag whose saved request replaced the lower layers (resume), else empty."""
    embedded_default: bool = False
    """Whether configs/default.yaml is one of the layers."""


def uses_embedded_default(args: Args) -> bool:
    """The rule of layer 2: no `--config` and no data key on the command line (and not resuming)."""
    keys = {dotted for dotted, _ in args.overrides}
    return not args.configs and not keys & set(DATA_KEYS) and "resume" not in keys


def request(argv: Sequence[str]) -> Request:
    """The configuration `compclip/train.py` runs with for `argv`: the layers of the module docstring, checked."""
    args = argv if isinstance(argv, Args) else parse_args(argv)
    named = named_values(args)
    layers = ["defaults"]
    resumed_from = ""
    if named.get("resume"):
        saved, resumed_from = saved_request(named)
        changed = check_resume_changes(saved, named)
        merged = merge_dicts(saved, named)
        layers = [f"the request saved in {resumed_from} (resume"
                  + (f"; changed {', '.join(changed)})" if changed else ")")]
    elif uses_embedded_default(args):
        merged = merge_dicts(read_yaml(EMBEDDED_DEFAULT), named)
        layers.append(f"configs/{EMBEDDED_DEFAULT}.yaml (embedded default: no --config and no data named)")
    else:
        merged = named
    layers += [f"--config {name}" for name in args.configs]
    if args.overrides:
        layers.append("command line")
    cfg = _build(TrainConfig, merged)
    validate(cfg)
    check_installed(cfg)
    return Request(cfg, tuple(layers), flatten(named), args, resumed_from,
                   embedded_default=any(layer.startswith(f"configs/{EMBEDDED_DEFAULT}.yaml") for layer in layers))


def load_config(argv: Sequence[str] = ()) -> TrainConfig:
    """The TrainConfig `compclip/train.py` would run with for `argv` (`request(argv).config`)."""
    return request(argv).config


RESUME_MAY_CHANGE = ("log.", "eval.", "eval_before", "eval_synthetic", "threads", "max_nonfinite",
                     "data.num_workers", "data.pin_memory", "resume", "optim.max_steps", "optim.epochs",
                     "model.tf32")
"""Keys a resumed run may be given with a new value: what is logged, saved and evaluated, how fast data loads
and computes (TF32 on another GPU), and a longer run (`optim.max_steps` / `optim.epochs` may only grow). Every
other key is the run's."""


def _longer(key: str, saved: Any, given: Any) -> bool:
    if key == "optim.max_steps":
        return given == 0 or (saved != 0 and given >= saved)
    return given >= saved  # optim.epochs


def saved_request(named: Dict[str, Any]) -> Tuple[Dict[str, Any], str]:
    """(the request a run was started with, its checkpoint tag) for `resume` in `named`: the request recorded in
    the tag's completion marker, or for a checkpoint written before that the run folder's config.yaml."""
    from compclip import runfolder

    spec = str(named["resume"])
    log = named.get("log") or {}
    if spec == "latest":
        if not log.get("name"):
            raise ConfigError("resume=latest needs log.name (the run folder to continue)")
        run = runfolder.RunFolder(Path(str(log.get("logs", LogConfig.logs))) / str(log["name"]))
    else:
        run = runfolder.run_folder_of(spec)
    try:
        root, tag = runfolder.locate(spec, run, warn=False)
    except runfolder.CheckpointNotFound as error:
        raise ConfigError(str(error)) from None
    saved = runfolder.marker(root / tag).get("request")
    if saved is None:  # a checkpoint from before requests were recorded: the resolved config is what there is
        folder = runfolder.run_folder_of(str(root / tag))
        path = folder.config if folder is not None else None
        if path is None or not path.is_file():
            raise ConfigError(f"resume: {root / tag} records no configuration and {path} is missing")
        saved = load_yaml(str(path), "resume:") or {}
    return saved, str(root / tag)


def _typed(values: Dict[str, Any]) -> Dict[str, Any]:
    return flatten(to_dict(_build(TrainConfig, values)))


def check_resume_changes(saved: Dict[str, Any], named: Dict[str, Any]) -> List[str]:
    """Refuse a resume whose YAMLs / command line give a key of the run a value other than the saved one; returns
    the accepted changes (`key before -> after`; a longer run recomputes its lr schedule over the new length)."""
    saved_flat, given = _typed(saved), _typed(named)  # typed alike: 1e-5 == 0.00001
    differing, accepted = [], []
    for key in flatten(named):
        before, after = saved_flat.get(key), given.get(key)
        if before == after or key == "resume":
            continue
        if key in ("optim.max_steps", "optim.epochs"):
            if _longer(key, before, after):
                accepted.append(f"{key} {before!r} -> {after!r}, the lr schedule spans the new length")
                continue
            differing.append(f"{key}: {before!r} -> {after!r} (a resumed run may only get longer)")
        elif not key.startswith(RESUME_MAY_CHANGE):
            differing.append(f"{key}: saved {before!r}, given {after!r}")
        else:
            accepted.append(f"{key} {before!r} -> {after!r}")
    if differing:
        raise ConfigError("resume: the run was started with other values for these keys; drop them from the "
                          "command line (the run's saved config is restored) or start a new run with init_from:\n  "
                          + "\n  ".join(differing))
    return accepted


def _value(cfg: TrainConfig, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


AT_LEAST_ONE = ("optim.grad_accumulation", "optim.epochs", "data.batch_size", "data.num_negatives",
                "data.synthetic.num_train", "data.synthetic.num_val", "data.synthetic.image_size", "log.every_n_steps")
NOT_NEGATIVE = ("optim.max_steps", "optim.warmup_steps", "optim.contrastive_batch", "optim.lr", "optim.weight_decay",
                "optim.eps", "optim.grad_clip", "loss.cmr_upper", "global_batch_size", "threads", "max_nonfinite",
                "seed", "data.synthetic.seed", "data.num_workers", "data.max_concepts", "data.shuffle_buffer",
                "data.train_num_samples", "eval.num_workers", "eval.every_n_epochs", "eval.aro_attribution_min_count",
                "eval.aro_order_seed", "log.save_every_n_steps", "log.save_every_n_minutes", "log.keep_checkpoints",
                "log.keep_exports")
"""Numeric keys and their lower bounds (0 means off where a key has an off; a seed is a non-negative integer, as
numpy's generators require). Non-finite floats and integers beyond 64 bits are refused when the config is read."""


def _check_ranges(cfg: TrainConfig) -> None:
    for bound, keys in ((1, AT_LEAST_ONE), (0, NOT_NEGATIVE)):
        for key in keys:
            if not _value(cfg, key) >= bound:
                raise ConfigError(f"{key}: must be >= {bound}, got {_value(cfg, key)}")
    if not 0.0 <= cfg.data.max_skip_fraction <= 1.0:
        raise ConfigError(f"data.max_skip_fraction: must be in [0, 1], got {cfg.data.max_skip_fraction}")
    if not all(0.0 <= beta < 1.0 for beta in cfg.optim.betas):
        raise ConfigError(f"optim.betas: each must be in [0, 1), got {cfg.optim.betas}")
    if cfg.eval.max_items is not None and cfg.eval.max_items < 1:
        raise ConfigError(f"eval.max_items: must be >= 1 (or unset: every item), got {cfg.eval.max_items}")


def validate(cfg: TrainConfig) -> None:
    """Cross-field checks that need no files or processes."""
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage: expected 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}")
    if cfg.deepspeed.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"deepspeed.precision: expected fp32, bf16 or fp16, got {cfg.deepspeed.precision!r}")
    if cfg.deepspeed.offload_param and cfg.deepspeed.zero_stage != 3:
        raise ConfigError("deepspeed.offload_param needs deepspeed.zero_stage=3")
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
    if cfg.deepspeed.precision == "fp16" and cfg.deepspeed.zero_stage == 0:
        # DeepSpeed's stage-0 FP16 optimizer keeps an fp32 master copy the logit-scale clamp cannot reach: the
        # master would drift above the bound and overwrite the clamped value at the next step.
        raise ConfigError("deepspeed.precision=fp16 needs deepspeed.zero_stage >= 1 (the logit_scale clamp cannot "
                          "reach stage 0's fp16 master weights); use bf16, or ZeRO 1-3")
    from compclip.data.synthetic import check_variant, variant_of

    try:
        check_variant(**variant_of(cfg.data.synthetic))
    except ValueError as error:
        raise ConfigError(f"data.synthetic: {error}") from None
    if cfg.optim.schedule not in ("cosine", "constant"):
        raise ConfigError(f"optim.schedule: expected cosine or constant, got {cfg.optim.schedule!r}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {cfg.optim.betas}")
    _check_ranges(cfg)
    if cfg.optim.contrastive_batch and cfg.optim.grad_accumulation > 1:
        raise ConfigError("optim.contrastive_batch and optim.grad_accumulation > 1 do not combine: the contrastive "
                          "batch already accumulates its chunks; make it larger instead")
    if cfg.optim.logit_scale_max <= 1.0:
        raise ConfigError("optim.logit_scale_max: must be > 1 (it bounds exp(logit_scale))")
    if cfg.loss.backend not in BACKENDS:
        raise ConfigError(f"loss.backend: expected one of {', '.join(BACKENDS)}, got {cfg.loss.backend!r}")
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"device: expected auto, cuda or cpu, got {cfg.device!r}")
    for name, weight in cfg.loss.terms.items():
        if not weight >= 0:
            raise ConfigError(f"loss.terms.{name}: weight must be >= 0, got {weight}")
    if not 0.0 <= cfg.loss.ema_decay < 1.0:
        raise ConfigError(f"loss.ema_decay: must be in [0, 1), got {cfg.loss.ema_decay}")
    if cfg.data.concept_extractor not in ("none", "spacy"):
        raise ConfigError(f"data.concept_extractor: expected none or spacy, got {cfg.data.concept_extractor!r}")
    if cfg.data.caption_order not in ("keep", "shuffle"):
        raise ConfigError(f"data.caption_order: expected keep or shuffle, got {cfg.data.caption_order!r}")
    if cfg.data.format not in ("auto", "jsonl", "csv", "tsv", "wds"):
        raise ConfigError(f"data.format: expected auto, jsonl, csv, tsv or wds, got {cfg.data.format!r}")
    if cfg.resume and cfg.init_from:
        raise ConfigError("resume and init_from are exclusive")
    _validate_locks(cfg.model)
    if cfg.log.wandb_mode not in WANDB_MODES:
        raise ConfigError(f"log.wandb_mode: expected online, offline, disabled or empty (W&B's choice), got "
                          f"{cfg.log.wandb_mode!r}")


WANDB_MODES = ("", "online", "offline", "disabled")


def _validate_locks(model: ModelConfig) -> None:
    for tower, count in (("image", "lock_image_unlocked_groups"), ("text", "lock_text_unlocked_layers")):
        value = getattr(model, count)
        if value < 0:
            raise ConfigError(f"model.{count}: must be >= 0, got {value}")
        if value and not getattr(model, f"lock_{tower}"):
            raise ConfigError(f"model.{count}={value} leaves layers of a locked {tower} tower trainable, but "
                              f"model.lock_{tower} is false: set it too (open_clip ignores the count without it)")
    if model.lock_image_freeze_bn_stats and not model.lock_image:
        raise ConfigError("model.lock_image_freeze_bn_stats needs model.lock_image=true")


def check_installed(cfg: TrainConfig) -> None:
    """The optional packages a run to be trained needs are importable (not checked by `validate`: a saved config
    must load anywhere, e.g. for an export on a machine without them)."""
    import importlib.util

    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb=true needs the wandb package: pip install wandb (or set log.wandb=false)")


# --------------------------------------------------------------------------------------------------------------
# Help and dumps


def field_docs(cls=TrainConfig, prefix: str = "", values=None) -> List[Tuple[str, str, Any, str]]:
    """(dotted key, type, default, docstring) of every field, docstrings read from the source (attribute
    docstrings are not kept at run time)."""
    docs = field_docstrings(cls)
    hints = _hints(cls)
    values = cls() if values is None else values
    rows = []
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(field_docs(hints[f.name], dotted + ".", getattr(values, f.name)))
        else:
            rows.append((dotted, _type_name(hints[f.name]), getattr(values, f.name), docs.get(f.name, "")))
    return rows


def changes(cfg: TrainConfig, base: Optional[TrainConfig] = None) -> List[Tuple[str, Any, Any]]:
    """[(dotted key, value in `base`, value in `cfg`)] where they differ (`base`: the dataclass defaults)."""
    before = flatten(to_dict(base if base is not None else TrainConfig()))
    after = flatten(to_dict(cfg))
    return [(key, before.get(key), value) for key, value in after.items() if before.get(key) != value]


def help_text() -> str:
    """`--help`: every key with its dataclass default and docstring, then what the embedded default changes."""
    lines = [__doc__.strip(), "", "Flags: --config NAME|FILE (repeatable), --resume latest|PATH, --plan "
             "[--plan-gpu-memory 80GiB] [--plan-world-size N] (print the resolved, sized run and exit).", "",
             "Keys (--key=value), with their defaults:"]
    for dotted, type_name, default, doc in field_docs():
        lines.append(f"  --{dotted}={default!r}  [{type_name}]")
        if doc:
            lines.append(f"      {doc}")
    default = from_dict(read_yaml(EMBEDDED_DEFAULT))
    lines += ["", f"The embedded default (configs/{EMBEDDED_DEFAULT}.yaml, used when the command line names no "
              "--config and no data) changes:"]
    lines += [f"  {key}: {before!r} -> {after!r}" for key, before, after in changes(default)]
    return "\n".join(lines)


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
