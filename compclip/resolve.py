"""From the configuration a run asks for to the run it describes, in one step: `resolve(cfg, world_size)`.

Every value a run derives is derived here, and only here:

* the per-rank micro-batch from `global_batch_size`, the gradient-accumulation steps (or the chunks of a cached
  contrastive batch, `optim.contrastive_batch`) and the DeepSpeed config generated from them (an explicit
  `deepspeed.config_file` is overlaid, its differences reported, a batch conflict refused);
* the data: the synthetic world's folder and files when no manifest is named (its training and validation
  manifests then fill `data.train_manifest` / `data.val_manifest`), and with `eval_synthetic` its evaluation sets
  as the run's evaluation;
* the start: `model.pretrained: synthetic-bow[:EPOCHS]` becomes the checkpoint path of the bag-of-words start
  (compclip.bow), and `openai` weights set `model.force_quick_gelu`;
* the run folder (`log.logs` / `log.name`), also from a `--resume` path, and the checkpoint tag a resume or an
  `init_from` loads.

It also checks everything that can be checked without a process group, so that a mistake is one message naming the
key, before DeepSpeed starts: an unknown `model.arch`, `loss.method`, loss term or option, a missing manifest,
shard, evaluation file, pretrained file or checkpoint, a hard-negative method on a manifest without negatives, a
resume on another number of ranks. Nothing here writes a file or starts a process: writing the synthetic world and
training the bag-of-words start are the trainer's first steps (`compclip.trainer.inputs`).

The result is a frozen `ResolvedRun` whose config is sealed (compclip.fields.seal): no module writes into it
afterwards.
"""
from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from compclip import runfolder
from compclip.config import ConfigError, TrainConfig, from_dict, merge_dicts, read_config_bytes, to_dict
from compclip.fields import seal

logger = logging.getLogger("compclip")

NEGATIVE_CHECK_SAMPLES = 1000
"""Samples read before the run starts to see whether a hard-negative method has negatives to train on."""


@dataclass(frozen=True)
class ResolvedRun:
    """Everything a run is, derived once. `config` is sealed."""

    config: TrainConfig
    """The resolved configuration (config.yaml of the run folder)."""
    requested: TrainConfig
    """What was asked for (config.requested.yaml; a resume compares against it)."""
    world_size: int
    run: runfolder.RunFolder
    accumulation: int
    """Micro-batches per optimizer step: `optim.grad_accumulation`, or the chunks of a cached contrastive batch."""
    contrastive_batch: int
    """Samples one loss sees, over all ranks."""
    loader_batch: int
    """Samples per rank in one loader batch (with a contrastive batch: a whole step's share of the rank)."""
    deepspeed: Dict[str, Any]
    deepspeed_overrides: Tuple[str, ...]
    """What an explicit `deepspeed.config_file` changed, one line each."""
    synthetic: Optional[Any] = None
    """The synthetic world's WorldPaths when the run trains on it (written by the trainer before training)."""
    start: Optional[Any] = None
    """The bag-of-words start (compclip.bow.BowStart) to train before the model is built."""
    resume: Optional[Tuple[Path, str]] = None
    """(DeepSpeed checkpoint folder, tag) to continue from."""
    resume_fallbacks: Tuple[Tuple[Path, str], ...] = ()
    """The tags to try in order when `resume` fails verification (its ancestors on the current line; none for an
    explicit tag). The trainer verifies them with every rank (compclip.trainer.checkpoint.Checkpointer.verified)."""
    init_from: Optional[Tuple[Path, str]] = None
    """(DeepSpeed checkpoint folder, tag) whose weights start the run."""
    layers: Tuple[str, ...] = ()
    """Where the configuration came from (compclip.config.Request.layers)."""

    @property
    def micro_batch(self) -> int:
        return self.config.data.batch_size

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all ranks."""
        return self.micro_batch * self.accumulation * self.world_size

    @property
    def chunks(self) -> int:
        """Chunks of a cached contrastive batch per rank and step (1 without one)."""
        return self.accumulation if self.config.optim.contrastive_batch else 1


def launcher_world_size() -> int:
    """The number of ranks the launcher started (WORLD_SIZE), 1 without a launcher."""
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def default_run_name(cfg: TrainConfig) -> str:
    return f"{cfg.loss.method}-{cfg.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}".replace("/", "_")


def resolve(cfg: TrainConfig, world_size: int = 1, *, run_name: Optional[str] = None,
            layers: Tuple[str, ...] = ()) -> ResolvedRun:
    """The run `cfg` describes on `world_size` ranks (module docstring). `run_name` names the run folder when
    `log.name` is empty (ranks agree on it; default `<method>-<arch>-<time>`). Raises ConfigError."""
    requested = copy.deepcopy(cfg)
    derived: Dict[str, Any] = {}
    _check_loss(cfg)
    micro, accumulation, contrastive, loader_batch = batch_arithmetic(cfg, world_size)
    synthetic, start = _data(cfg, derived, micro)
    derived = merge_dicts(derived, {"data": {"batch_size": micro}})
    _model(cfg, derived, start)
    _evaluation(cfg, derived, synthetic)
    run, located = _run_folder(cfg, derived, run_name)
    resume, fallbacks = (located[0], tuple(located[1:])) if located else (None, ())
    config = from_dict(merge_dicts(to_dict(cfg), derived))
    ds_config, overrides = deepspeed_config(config, world_size, accumulation)
    if resume is not None:
        _check_resume_world(resume, world_size)
    init = _locate("init_from", config.init_from)[0] if config.init_from else None
    seal(config)
    seal(requested)
    return ResolvedRun(config, requested, world_size, run, accumulation, contrastive, loader_batch, ds_config,
                       tuple(overrides), synthetic, start, resume, fallbacks, init, tuple(layers))


# --------------------------------------------------------------------------------------------------------------
# The objective and the model


def published_terms(cfg: TrainConfig) -> Dict[str, float]:
    """The weights the run's objective sums: `loss.terms`, or the method's published ones (for a model without a
    logit bias; the trainer swaps SigLIP for InfoNCE or back once it knows the model)."""
    from compclip.losses.modules import PUBLISHED_WEIGHTS

    return dict(cfg.loss.terms) if cfg.loss.terms else dict(PUBLISHED_WEIGHTS.get(cfg.loss.method, {}))


def _check_loss(cfg: TrainConfig) -> None:
    from compclip.losses.terms import TERMS
    from compclip.methods import REGISTRY

    if cfg.loss.method not in REGISTRY:
        raise ConfigError(f"loss.method: unknown method {cfg.loss.method!r}; registered: {', '.join(sorted(REGISTRY))}")
    for key, names in (("loss.terms", cfg.loss.terms), ("loss.options", cfg.loss.options)):
        unknown = sorted(set(names) - set(TERMS))
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}: unknown loss term; known: {', '.join(sorted(TERMS))}")
    for term, options in cfg.loss.options.items():
        accepted = set(inspect.signature(TERMS[term]).parameters) - {"features", "group", "threshold"}
        for name in options:
            if name not in accepted:
                raise ConfigError(f"loss.options.{term}.{name}: not an option of term {term!r} "
                                  f"(its options: {', '.join(sorted(accepted)) or 'none'})")
    weights = published_terms(cfg)
    if not any(weight > 0 for weight in weights.values()):
        raise ConfigError(f"loss.terms: method {cfg.loss.method!r} needs at least one term with a weight > 0")
    if "cmr" in weights and cfg.data.num_negatives < 1:
        raise ConfigError("data.num_negatives: the cmr term needs K >= 1")


def needs_negatives(cfg: TrainConfig) -> bool:
    """Whether the run's terms read hard negatives."""
    from compclip.losses.terms import required_features

    wanted = {"negatives", "valid", "teacher_negatives"}
    return any(required_features(term) & wanted for term, w in published_terms(cfg).items() if w > 0)


def _model(cfg: TrainConfig, derived: Dict[str, Any], start) -> None:
    from compclip.models import known_architecture, lock_problem, uses_quick_gelu

    model = cfg.model
    problem = known_architecture(model.arch)
    if problem:
        raise ConfigError(f"model.arch: {problem}")
    problem = lock_problem(model)
    if problem:
        raise ConfigError(problem)
    if start is not None:
        derived.setdefault("model", {})["pretrained"] = start.checkpoint
        return
    pretrained = model.pretrained
    if pretrained and _looks_like_path(pretrained) and not os.path.isfile(os.path.expanduser(pretrained)):
        raise ConfigError(f"model.pretrained: no such file {pretrained}")
    if pretrained and not _looks_like_path(pretrained):
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(model.arch)
        if tags and pretrained not in tags and pretrained.lower() not in tags:
            raise ConfigError(f"model.pretrained: {pretrained!r} is neither a file nor a pretrained tag of "
                              f"{model.arch} (its tags: {', '.join(tags)})")
    if uses_quick_gelu(model.arch, pretrained, model.force_quick_gelu) and not model.force_quick_gelu:
        derived.setdefault("model", {})["force_quick_gelu"] = True


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith((".", "~")) or value.endswith((".pt", ".pth", ".bin",
                                                                               ".safetensors"))


# --------------------------------------------------------------------------------------------------------------
# Data and evaluation


def _data(cfg: TrainConfig, derived: Dict[str, Any], micro: int):
    """(synthetic WorldPaths or None, BowStart or None); fills the data paths into `derived`. The bag-of-words
    start is trained at the run's micro-batch `micro`."""
    from compclip import bow
    from compclip.data import synthetic as synthetic_world

    data = cfg.data
    try:
        epochs = bow.parse_tag(cfg.model.pretrained)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if data.train_manifest:
        if epochs is not None:
            raise ConfigError(f"model.pretrained={cfg.model.pretrained} is the synthetic world's bag-of-words start; "
                              "with data.train_manifest set, give model.pretrained an open_clip tag or a checkpoint")
        _check_source("data.train_manifest", cfg, data.train_manifest, negatives=needs_negatives(cfg))
        if data.val_manifest:
            _check_source("data.val_manifest", cfg, data.val_manifest, negatives=False)
        return None, None
    try:
        paths = synthetic_world.paths_of(data.synthetic)
    except (KeyError, IndexError, ValueError) as error:  # str.format of a placeholder it does not know
        raise ConfigError(f"data.synthetic.root: {data.synthetic.root[:200]!r} is not a folder with the placeholders "
                          f"{{seed}}, {{num_train}}, {{num_val}}, {{image_size}}, {{variant}} ({error!r})") from None
    derived["data"] = {"train_manifest": paths.train, "val_manifest": data.val_manifest or paths.val,
                       "synthetic": {"root": paths.root}}
    if data.val_manifest:
        _check_source("data.val_manifest", cfg, data.val_manifest, negatives=False)
    start = None if epochs is None else bow.start_for(paths, cfg.model.arch, micro, data.num_negatives, epochs)
    return paths, start


def _check_source(key: str, cfg: TrainConfig, path: str, negatives: bool) -> None:
    """The source exists and parses; with `negatives`, some of its first samples have hard negatives."""
    from compclip.data.survey import peek, source_files

    data = cfg.data
    try:
        source_files(path, data.format)
        samples = list(peek(path, NEGATIVE_CHECK_SAMPLES, data.format, data.image_root, data.image_key,
                            data.caption_key))
    except (OSError, ValueError) as error:  # ManifestError is a ValueError; both name file:line and field
        raise ConfigError(f"{key}: {error}") from None
    if not samples:
        raise ConfigError(f"{key}: {path} holds no sample")
    if negatives and not any(sample.has_negatives for sample in samples):
        raise ConfigError(
            f"{key}: none of the first {len(samples)} samples of {path} has hard negatives ('negatives'), so "
            f"{cfg.loss.method}'s hard-negative terms would train as CLIP; add them first (compclip-prepare "
            f"--input {path} --output <prepared>.jsonl) or train with loss.method=clip")


EVAL_FILES = ("sugarcrepe", "aro_vg_relation", "aro_vg_attribution", "aro_coco_order", "aro_flickr_order", "valse",
              "zeroshot", "retrieval")
EVAL_FOLDERS = ("sugarcrepe_image_root", "aro_vg_image_root", "aro_coco_image_root", "aro_flickr_image_root",
                "valse_image_root", "generic_image_root", "zeroshot_image_root", "retrieval_image_root")


def _evaluation(cfg: TrainConfig, derived: Dict[str, Any], synthetic) -> None:
    evaluation = cfg.eval
    if synthetic is not None and cfg.eval_synthetic and not evaluation.enabled():
        derived["eval"] = {"sugarcrepe": synthetic.eval_dir, "sugarcrepe_subsets": sorted(synthetic.eval),
                           "sugarcrepe_image_root": synthetic.eval_image_root, "retrieval": synthetic.retrieval,
                           "retrieval_image_root": synthetic.root}
        return
    paths: List[Tuple[str, str]] = [(f"eval.{name}", getattr(evaluation, name)) for name in EVAL_FILES + EVAL_FOLDERS]
    paths += [(f"eval.generic_jsonl[{i}]", path) for i, path in enumerate(evaluation.generic_jsonl)]
    for name in ("zeroshot_classnames",) + (("zeroshot_templates",) if evaluation.zeroshot_templates not in
                                            ("openai", "simple") else ()):
        paths.append((f"eval.{name}", getattr(evaluation, name)))
    for key, path in paths:
        if path and not os.path.exists(path):
            raise ConfigError(f"{key}: no such file or folder {path}")


# --------------------------------------------------------------------------------------------------------------
# Batch arithmetic and the DeepSpeed config


def batch_arithmetic(cfg: TrainConfig, world_size: int) -> Tuple[int, int, int, int]:
    """(micro-batch per rank, micro-batches (or chunks) per optimizer step, contrastive batch over all ranks,
    loader batch per rank).

    `train_batch_size = micro x accumulation x world_size` (DeepSpeed checks the product); `global_batch_size`,
    when given, fixes the left side. With `optim.contrastive_batch` the accumulation is the chunks of one cached
    step (compclip.trainer.gradcache): `train_batch_size = contrastive_batch`, `data.batch_size` the chunk."""
    micro, optim = cfg.data.batch_size, cfg.optim
    contrastive = optim.contrastive_batch
    if contrastive > 0:
        if cfg.global_batch_size > 0 and cfg.global_batch_size != contrastive:
            raise ConfigError(f"global_batch_size {cfg.global_batch_size} != optim.contrastive_batch {contrastive}: "
                              "with a contrastive batch, data.batch_size is the per-rank chunk; leave "
                              "global_batch_size at 0 or equal to it")
        per_chunk = micro * world_size
        if contrastive % per_chunk:
            raise ConfigError(f"optim.contrastive_batch {contrastive} is not a multiple of data.batch_size {micro} x "
                              f"world size {world_size} = {per_chunk}")
        return micro, contrastive // per_chunk, contrastive, contrastive // world_size
    if cfg.global_batch_size > 0:
        per_step = world_size * optim.grad_accumulation
        if cfg.global_batch_size % per_step:
            raise ConfigError(f"global_batch_size {cfg.global_batch_size} is not divisible by world size "
                              f"{world_size} x optim.grad_accumulation {optim.grad_accumulation}")
        micro = cfg.global_batch_size // per_step
    return micro, optim.grad_accumulation, micro * world_size, micro


def deepspeed_config(cfg: TrainConfig, world_size: int, accumulation: int) -> Tuple[Dict[str, Any], List[str]]:
    """The DeepSpeed config for a resolved `cfg`, and the differences an explicit config file made.

    The optimizer and the schedule are built by the trainer (torch AdamW with open_clip's parameter groups and a
    LambdaLR) and handed to deepspeed.initialize, so no `optimizer`/`scheduler` section is generated; a file that
    has one is reported and that section is honoured by DeepSpeed instead of ours."""
    generated = _generated_config(cfg, world_size, accumulation)
    if not cfg.deepspeed.config_file:
        return generated, []
    return _with_file(cfg, generated, world_size, accumulation)


def _generated_config(cfg: TrainConfig, world_size: int, accumulation: int) -> Dict[str, Any]:
    micro = cfg.data.batch_size
    generated: Dict[str, Any] = {
        "train_batch_size": micro * accumulation * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.optim.grad_clip,
        "steps_per_print": 10 ** 9,  # our own logs carry the numbers
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        # A torch AdamW works with offload only when DeepSpeed is told not to insist on its CPUAdam.
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
    }
    if cfg.deepspeed.precision == "bf16":
        generated["bf16"] = {"enabled": True}
    elif cfg.deepspeed.precision == "fp16":
        generated["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                             "min_loss_scale": 1}
    zero = generated["zero_optimization"]
    if cfg.deepspeed.zero_stage >= 1:
        zero.update({"overlap_comm": False, "contiguous_gradients": True})
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if cfg.deepspeed.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if cfg.deepspeed.zero_stage == 3:
        # Full fp32 weights are gathered by compclip for the export; DeepSpeed's 16-bit gather is not needed.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return generated


def _with_file(cfg: TrainConfig, generated: Dict[str, Any], world_size: int,
               accumulation: int) -> Tuple[Dict[str, Any], List[str]]:
    """`generated` overlaid with `deepspeed.config_file`, checked against the data loader's batch arithmetic."""
    micro, path = cfg.data.batch_size, cfg.deepspeed.config_file
    try:
        explicit = json.loads(read_config_bytes(path, "deepspeed.config_file").decode("utf-8"),
                              object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ConfigError(f"deepspeed.config_file {path}: not valid JSON: {exc}") from None
    if not isinstance(explicit, dict):
        raise ConfigError(f"deepspeed.config_file {path}: the top level must be an object")
    differences = _differences(generated, explicit)
    merged = merge_dicts(generated, explicit)
    ours = {"train_batch_size": micro * accumulation * world_size, "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accumulation}
    for key, value in ours.items():  # "auto": the DeepSpeed/HF convention for "filled in by the trainer"
        if merged.get(key) == "auto":
            merged[key] = value
    batch = merged["train_batch_size"]
    product = merged["train_micro_batch_size_per_gpu"] * merged["gradient_accumulation_steps"] * world_size
    if batch != product:
        raise ConfigError(f"deepspeed config {path}: train_batch_size {batch} != micro batch "
                          f"{merged['train_micro_batch_size_per_gpu']} x accumulation "
                          f"{merged['gradient_accumulation_steps']} x world size {world_size} = {product}")
    if merged["train_micro_batch_size_per_gpu"] != micro or merged["gradient_accumulation_steps"] != accumulation:
        raise ConfigError(f"deepspeed config {path} sets micro batch {merged['train_micro_batch_size_per_gpu']} / "
                          f"accumulation {merged['gradient_accumulation_steps']}, but the data loader uses "
                          f"data.batch_size={micro} / accumulation {accumulation}: set those instead")
    return merged, differences


def _unique_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """A JSON object whose keys are unique (json keeps the last of two and drops the first without a word)."""
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"key {repeated[0]!r} repeated: one of the two values would be lost")
    return dict(pairs)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number a DeepSpeed setting can take")


def _differences(ours: Dict[str, Any], theirs: Dict[str, Any], prefix: str = "") -> List[str]:
    out = []
    for key, value in theirs.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(ours.get(key), dict):
            out.extend(_differences(ours[key], value, dotted + "."))
        elif key not in ours:
            out.append(f"{dotted}: set to {value!r} by the file (not generated by compclip)")
        elif ours[key] != value and value != "auto":  # "auto": filled in with ours
            out.append(f"{dotted}: file {value!r} overrides generated {ours[key]!r}")
    return out


# --------------------------------------------------------------------------------------------------------------
# The run folder and the checkpoints it continues from


def _locate(key: str, spec: str, run: Optional[runfolder.RunFolder] = None) -> List[Tuple[Path, str]]:
    """The tags a resume (init_from) of `spec` tries, in order (compclip.runfolder.candidates)."""
    try:
        return runfolder.candidates(spec, run, warn=False)
    except runfolder.CheckpointNotFound as error:
        raise ConfigError(f"{key}: {error}") from None


def _run_folder(cfg: TrainConfig, derived: Dict[str, Any],
                run_name: Optional[str]) -> Tuple[runfolder.RunFolder, List[Tuple[Path, str]]]:
    log, resume = cfg.log, cfg.resume
    logs, name = log.logs, log.name
    if resume and resume != "latest" and not name:
        folder = runfolder.run_folder_of(resume)
        if folder is None:
            raise ConfigError(f"resume={resume}: not inside a run folder (<logs>/<name>/checkpoints/...); give "
                              "log.name")
        logs, name = str(folder.root.parent), folder.root.name
    if resume == "latest" and not name:
        raise ConfigError("resume=latest needs log.name (the run folder to continue)")
    name = name or run_name or default_run_name(cfg)
    for key, value in (("log.logs", logs), ("log.name", name)):
        _check_path(key, value)
    derived.setdefault("log", {}).update(logs=logs, name=name)
    run = runfolder.RunFolder(Path(logs) / name)
    return run, (_locate("resume", resume, run) if resume else [])


NAME_MAX = 255
"""The longest file or folder name most file systems take, in bytes."""


def _check_path(key: str, value: str) -> None:
    """A path the run will create: no NUL byte, no name longer than NAME_MAX (both fail only at the first write)."""
    if "\x00" in value:
        raise ConfigError(f"{key}: a path cannot hold a NUL byte ({value[:200]!r})")
    long = [part for part in Path(value).parts if len(os.fsencode(part)) > NAME_MAX]
    if long:
        raise ConfigError(f"{key}: the name {long[0][:60]!r}... is {len(os.fsencode(long[0]))} bytes long; file "
                          f"systems take at most {NAME_MAX}")


def _check_resume_world(resume: Tuple[Path, str], world_size: int) -> None:
    try:
        saved = runfolder.marker(resume[0] / resume[1]).get("world_size")
    except runfolder.CheckpointNotFound as error:
        raise ConfigError(f"resume: {error}") from None
    if saved is not None and saved != world_size:
        raise ConfigError(f"resume: {resume[0] / resume[1]} was written by {saved} ranks, this run has {world_size}; "
                          "use init_from to continue on a different number of ranks")
