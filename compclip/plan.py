"""`--plan`: the run a command line describes, resolved and sized, before anything trains.

    python compclip/train.py --config degla --data.train_manifest=coco.jsonl --plan --plan-world-size 8 \\
        --plan-gpu-memory 80GiB
    deepspeed --num_gpus 8 compclip/train.py --config degla ... --plan      # the launcher's world size

It prints the resolved configuration as its changes from the defaults; the world size, the samples (counted from
the manifest or shards), steps per epoch and in all; the learning rate at the end of the warm-up, mid-run and at the
end; the global and contrastive batch and the chunks; the ZeRO stage and precision; and a memory plan per GPU:

* model states: parameters, gradients, optimizer states (AdamW's two moments, and the fp32 master copy under mixed
  precision) and the fp32 EMA teacher, as the ZeRO stage partitions them over the ranks (`model_states`); where
  DeepSpeed has its own estimator (ZeRO 1-2 and 3 under bf16 / fp16) its figure is shown next to ours and used;
* activations: measured, not guessed: one training micro-step (the method's features, its loss and the backward,
  gradients allocated as in a run) of the real architecture at two micro-batch sizes on this machine's device
  (`measure_step`), whose difference is the cost per sample and whose remainder the fixed cost;
* the batch's own tensors, the loss's workspace (`loss_workspace`: the fused kernels' O(B) buffers on CUDA, the
  PyTorch reference's materialised logits elsewhere) and, with `optim.contrastive_batch`, the cached features;
* with `--plan-gpu-memory` (e.g. `80GiB`): the largest micro-batch (chunk) that fits, and the largest contrastive
  batch that fits with that chunk.

The measurement needs no weights (the architecture is built randomly initialised) and no data. On a CPU it counts
the tensor bytes PyTorch allocates (the profiler's memory events, `peak_allocated`), as `max_memory_allocated`
does on CUDA. A CPU measurement of activations is an upper bound for a GPU's: attention there runs fused kernels
that keep no L x L probabilities. `bench/test_bench_plan.py` compares the plan with the measured peak of real runs.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from compclip.config import changes
from compclip.resolve import ResolvedRun, published_terms

GIB = 2 ** 30
MIB = 2 ** 20
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# --------------------------------------------------------------------------------------------------------------
# Measuring allocated bytes


def peak_allocated(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes of tensors allocated at the peak of one call of `fn` beyond what was allocated before it.

    CUDA: `max_memory_allocated` after a reset. CPU: the running sum of the profiler's memory events (every
    allocation and free of the CPU allocator, in time order), whose maximum is the same quantity."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events()
                    if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


# --------------------------------------------------------------------------------------------------------------
# Model states


@dataclass
class ModelStates:
    """Per-rank bytes of what lives through the whole run (the gradients: at their largest, after a backward)."""

    parameters: int
    gradients: int
    optimizer: int
    master: int
    teacher: int
    deepspeed: Optional[int] = None
    """DeepSpeed's own estimate of parameters + gradients + optimizer + master, where it has one."""

    @property
    def total(self) -> int:
        ours = self.parameters + self.gradients + self.optimizer + self.master
        return (self.deepspeed if self.deepspeed is not None else ours) + self.teacher


def model_states(params: int, largest_layer: int, cfg, world_size: int, teacher: bool) -> ModelStates:
    """ZeRO's partitioning of AdamW training: stage >= 1 partitions the optimizer states (and the fp32 master under
    mixed precision), >= 2 the gradients, 3 the parameters (plus one layer gathered at a time) and the teacher."""
    stage, precision = cfg.deepspeed.zero_stage, cfg.deepspeed.precision
    compute, mixed = BYTES[precision], precision != "fp32"

    def share(nbytes: int, from_stage: int) -> int:
        return nbytes // world_size if stage >= from_stage else nbytes

    parameters = share(params * compute, 3) + (largest_layer * compute * 2 if stage == 3 else 0)
    gradients = share(params * compute, 2)
    optimizer = share(params * 8, 1)
    master = share(params * 4, 1) if mixed else 0
    teacher_bytes = share(params * 4, 3) if teacher else 0
    estimate = None
    if mixed and stage >= 1:
        from compclip.trainer.engine import deepspeed_model_states

        estimate = deepspeed_model_states(params, largest_layer, world_size, stage,
                                          cfg.deepspeed.offload_optimizer, cfg.deepspeed.offload_param)
    return ModelStates(parameters, gradients, optimizer, master, teacher_bytes, estimate)


# --------------------------------------------------------------------------------------------------------------
# The loss's workspace


def loss_workspace(terms: Dict[str, float], backend: str, local: int, batch: int, k: int, concepts: int,
                   tokens: int, width: int) -> int:
    """Bytes the loss terms allocate beyond their inputs for `local` rows against a global batch of `batch` images
    with K negatives each, `concepts` concepts, `tokens` visual tokens of width `width`.

    `triton` (the fused kernels, docs/kernels.md): per-row log-sum-exps and rescaling factors, O(rows + columns)
    float32 values per term (the logits never exist), and for XAC the per-pair statistics. `torch` (the reference):
    the logits materialised in float32, kept for the backward with their softmax and their gradient (3 copies)."""
    columns = {"clip": batch, "siglip": batch, "negclip": batch * (1 + k), "imc": 1 + batch * k,
               "cmr": 1 + k, "igc": 1 + k, "tgc": 1 + k, "distill": 0, "npc": concepts, "xac": concepts}
    total = 0
    for term in (t for t, w in terms.items() if w > 0):
        rows, cols = local, columns[term]
        if backend == "triton":
            total += 4 * 4 * (rows + cols)
            if term == "xac":
                total += 4 * 4 * rows * concepts
        else:
            total += 3 * 4 * rows * cols
            if term == "xac":  # the reference pools [rows, concepts, width] and its softmax over the tokens
                total += 3 * 4 * rows * concepts * (width + tokens)
    return total


# --------------------------------------------------------------------------------------------------------------
# Measured activations


@dataclass
class Activations:
    """A measured forward (features and loss, graph kept) at two micro-batch sizes, split into a cost per sample and
    a fixed part."""

    per_sample: int
    fixed: int
    sizes: Tuple[int, int]
    peaks: Tuple[int, int]
    device: str
    tokens: int
    width: int


class _FrozenTeacher:
    def __init__(self, module):
        self.module = module.eval()

    def __call__(self, *args):
        with torch.no_grad():
            return self.module(*args)


def _dummy_batch(size: int, tokenizer, image_size: int, k: int, device) -> Dict[str, torch.Tensor]:
    text = tokenizer([f"a photo of thing number {i}" for i in range(size)])
    negatives = tokenizer([f"a picture of item {i}" for i in range(size * k)]).reshape(size, k, -1)
    return {"images": torch.randn(size, 3, image_size, image_size, device=device), "text": text.to(device),
            "negatives": negatives.to(device), "valid": torch.ones(size, k, dtype=torch.bool, device=device),
            "concepts": tokenizer([f"thing {i}" for i in range(size)]).to(device),
            "owner": torch.arange(size, device=device)}


def measure_step(run: ResolvedRun, sizes: Tuple[int, int] = (2, 4)) -> Activations:
    """The activations of one micro-step at two micro-batch sizes: the peak allocation of the method's features
    (the teacher's included) and its loss, whose autograd graph holds what the backward will read. The backward then
    frees them as it allocates the gradients, so activations plus all gradients (counted with the model states) bound
    the step's peak from above."""
    from compclip.methods import build_method
    from compclip.models import Encoder, build_model
    from compclip.trainer.engine import COMPUTE_DTYPES

    cfg = run.config
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    dtype = COMPUTE_DTYPES[cfg.deepspeed.precision]
    clip, _, _, tokenizer = build_model(cfg.model.arch, "", cfg.model.force_quick_gelu, load_weights=False)
    method = build_method(cfg.loss, num_negatives=cfg.data.num_negatives,
                          has_logit_bias=getattr(clip, "logit_bias", None) is not None)
    teacher = _FrozenTeacher(Encoder(copy.deepcopy(clip)).float().to(device)) if method.needs_teacher else None
    encoder = Encoder(clip).to(device=device, dtype=dtype).train()
    image_size = _image_size(clip)
    peaks, kept = [], []
    for size in sizes:
        batch = _dummy_batch(size, tokenizer, image_size, cfg.data.num_negatives, device)

        def forward():
            features = method.features(encoder, teacher, batch, dtype)
            kept.append(method.loss(features)[0])  # the graph stays alive until the peak is read

        peaks.append(peak_allocated(forward, device))
        kept.clear()
    with torch.no_grad():
        tokens = encoder(_dummy_batch(1, tokenizer, image_size, 1, device)["images"].to(dtype),
                         tokenizer(["x"]).to(device), want_tokens=method.needs_tokens)
    per_sample = max(0, (peaks[1] - peaks[0]) // (sizes[1] - sizes[0]))
    fixed = max(0, peaks[0] - per_sample * sizes[0])
    return Activations(per_sample, fixed, tuple(sizes), tuple(peaks), device.type,
                       tokens.tokens.shape[1] if tokens.tokens is not None else 0, tokens.image.shape[-1])


def _image_size(clip) -> int:
    size = getattr(clip.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


# --------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    run: ResolvedRun
    samples: int
    samples_source: str
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    lr: Dict[str, Tuple[int, float]]
    params: int
    largest_layer: int
    states: ModelStates
    activations: Optional[Activations]
    memory: Dict[str, int] = field(default_factory=dict)
    fits: Dict[str, Any] = field(default_factory=dict)
    for_gpu: bool = False
    """Planned for a GPU's memory (`--plan-gpu-memory`): the loss runs the fused kernels there."""

    @property
    def total_memory(self) -> int:
        return sum(self.memory.values())


def count_samples(run: ResolvedRun) -> Tuple[int, str]:
    """(samples in one epoch over all ranks, where the number comes from)."""
    from compclip.data.survey import count

    data = run.config.data
    if data.train_num_samples:
        return data.train_num_samples, "data.train_num_samples"
    if run.synthetic is not None and not _exists(data.train_manifest):
        return data.synthetic.num_train, "data.synthetic.num_train (the world is written at the start)"
    return count(data.train_manifest, data.format, data.image_root, data.image_key, data.caption_key), \
        f"counted in {data.train_manifest}"


def _exists(path: str) -> bool:
    import os

    return os.path.isfile(path)


def _parameters(cfg) -> Tuple[int, int]:
    """(trainable parameters, the largest single parameter tensor) of the architecture."""
    from compclip.models import build_model

    clip = build_model(cfg.model.arch, "", cfg.model.force_quick_gelu, load_weights=False, initialize=False)[0]
    sizes = [p.numel() for p in clip.parameters() if p.requires_grad]  # shapes only: no random draws
    return sum(sizes), max(sizes)


def make_plan(run: ResolvedRun, measure: bool = True, gpu_memory: int = 0) -> Plan:
    from compclip.trainer import optim

    cfg = run.config
    samples, source = count_samples(run)
    batches = (samples // run.world_size) // run.loader_batch
    total = optim.total_steps(cfg.optim, batches)
    factor = optim.lr_lambda(cfg.optim, total)
    warmup_end = max(min(cfg.optim.warmup_steps, total) - 1, 0)
    lr = {"warm-up end": (warmup_end + 1, cfg.optim.lr * factor(warmup_end)),
          "mid-run": (total // 2 + 1, cfg.optim.lr * factor(total // 2)),
          "end": (total, cfg.optim.lr * factor(max(total - 1, 0)))}
    params, largest = _parameters(cfg)
    terms = published_terms(cfg)
    states = model_states(params, largest, cfg, run.world_size, bool({"tgc", "distill"} & set(terms)))
    activations = measure_step(run) if measure else None
    plan = Plan(run, samples, source, batches, batches // cfg.optim.grad_accumulation, total, lr, params, largest,
                states, activations, for_gpu=bool(gpu_memory))
    plan.memory = memory_at(plan, run.micro_batch, run.contrastive_batch)
    if gpu_memory:
        plan.fits = largest_fit(plan, gpu_memory)
    return plan


def _backend(cfg, for_gpu: bool) -> str:
    """The loss backend the planned run uses: the configured one, or with `auto` the fused kernels on a GPU (the
    machine's, or the one `--plan-gpu-memory` plans for) and the PyTorch reference on a CPU."""
    if cfg.loss.backend != "auto":
        return cfg.loss.backend
    gpu = for_gpu or (torch.cuda.is_available() and cfg.device != "cpu")
    return "triton" if gpu and cfg.device != "cpu" else "torch"


def memory_at(plan: Plan, micro: int, contrastive: int, cached: Optional[bool] = None) -> Dict[str, int]:
    """Per-rank bytes of a run with this micro-batch (chunk) and contrastive batch, with or without gradient caching
    (default: as the run is configured)."""
    run, cfg = plan.run, plan.run.config
    world_size, k = run.world_size, cfg.data.num_negatives
    compute = BYTES[cfg.deepspeed.precision]
    local = contrastive // world_size
    act = plan.activations
    tokens, width = (act.tokens, act.width) if act else (0, 0)
    image = _image_pixels(cfg)
    context = 77
    memory = {"model states": plan.states.total}
    if act is not None:
        memory["activations"] = act.fixed + act.per_sample * micro
    memory["batch tensors"] = micro * (3 * image * (4 + compute) + (1 + k + 1) * context * 8)
    memory["loss workspace"] = loss_workspace(published_terms(cfg), _backend(cfg, plan.for_gpu), local, contrastive, k,
                                              contrastive, tokens, width)
    if cfg.optim.contrastive_batch if cached is None else cached:
        per_row = (2 + k + 1) * width * compute * 2
        memory["cached features"] = local * (per_row + (tokens * width * compute * 2 if tokens else 0))
    return memory


def _image_pixels(cfg) -> int:
    from compclip.models import model_config_of

    config = model_config_of(cfg.model.arch) or {}
    size = config.get("vision_cfg", {}).get("image_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return int(size) * int(size)


def largest_fit(plan: Plan, budget: int) -> Dict[str, Any]:
    """The largest micro-batch (chunk) whose plain step fits `budget` bytes per rank, and the largest contrastive
    batch (a multiple of chunk x world size) that fits with gradient caching at that chunk."""
    run = plan.run
    world_size = run.world_size
    plain = lambda micro: sum(memory_at(plan, micro, micro * world_size).values())  # noqa: E731
    micro = _largest(lambda m: plain(m) <= budget)
    if micro == 0:
        return {"micro_batch": 0, "contrastive_batch": 0, "budget": budget}
    chunk = micro
    while True:  # the largest chunk that leaves room for caching at least two chunks' features
        step = chunk * world_size
        cached = lambda n: sum(memory_at(plan, chunk, n * step, cached=True).values())  # noqa: E731
        chunks = _largest(lambda n: cached(n) <= budget)
        if chunks >= 2 or chunk == 1:
            break
        chunk = max(1, chunk // 2)
    return {"micro_batch": micro, "plain_memory": plain(micro), "chunk": chunk, "contrastive_batch": chunks * step,
            "cached_memory": cached(chunks) if chunks else 0, "budget": budget}


def _largest(ok: Callable[[int], bool], limit: int = 2 ** 24) -> int:
    """The largest n in [1, limit] with ok(n), for ok monotone (true then false); 0 when ok(1) is false."""
    if not ok(1):
        return 0
    low, high = 1, 2
    while high <= limit and ok(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if ok(middle) else (low, middle)
    return low


# --------------------------------------------------------------------------------------------------------------
# Printing


def parse_memory(text: str) -> int:
    """`80GiB`, `80GB`, `81920MiB`, `80` (GiB) -> bytes; ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"--plan-gpu-memory: expected a size such as 80GiB, got {text!r}")
    number, unit = float(match.group(1)), (match.group(2) or "GiB").upper()
    scale = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30,
             "TIB": 2 ** 40}[unit]
    return int(number * scale)


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / MIB:.1f} MiB"


def render(plan: Plan, layers: Tuple[str, ...] = ()) -> str:
    run, cfg = plan.run, plan.run.config
    lines = ["compclip run plan (nothing was trained)", f"configuration: {' < '.join(layers or run.layers)}",
             "resolved configuration, as changes from the defaults:"]
    lines += [f"  {key}: {before!r} -> {after!r}" for key, before, after in changes(cfg)]
    lines += ["", f"world size: {run.world_size} rank(s); run folder {run.run.root}",
              f"data: {plan.samples:,} samples ({plan.samples_source}); {plan.batches_per_epoch:,} loader batches "
              f"of {run.loader_batch} per rank per epoch -> {plan.steps_per_epoch:,} optimizer steps per epoch; "
              f"{plan.total_steps:,} steps in all ({cfg.optim.epochs} epoch(s)"
              + (f", capped by optim.max_steps={cfg.optim.max_steps})" if cfg.optim.max_steps else ")"),
              *([f"warning: {plan.samples:,} samples give no full batch of {run.loader_batch} per rank on "
                 f"{run.world_size} rank(s): the run would stop at its start"] if not plan.batches_per_epoch else []),
              "learning rate: " + "; ".join(f"{name} (step {step:,}) {value:.3g}" for name, (step, value)
                                            in plan.lr.items()),
              f"batch: global {run.global_batch:,} images per optimizer step = {run.micro_batch} per rank x "
              f"{run.accumulation} x {run.world_size} rank(s); contrastive batch {run.contrastive_batch:,} (one "
              f"loss over all ranks)" + (f", in {run.chunks} chunks of {run.micro_batch} per rank" if run.chunks > 1
                                          else ""),
              f"distribution: ZeRO stage {cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision}"
              + (", optimizer offloaded" if cfg.deepspeed.offload_optimizer else "")
              + (", parameters offloaded" if cfg.deepspeed.offload_param else ""), ""]
    states = plan.states
    lines.append(f"memory per rank ({plan.params / 1e6:.1f} M trainable parameters; largest tensor "
                 f"{plan.largest_layer / 1e6:.2f} M):")
    lines += [f"  parameters          {_size(states.parameters)}", f"  gradients           {_size(states.gradients)}",
              f"  optimizer states    {_size(states.optimizer)} (AdamW m and v, fp32)",
              f"  fp32 master         {_size(states.master)}"]
    if states.deepspeed is not None:
        lines.append(f"  (DeepSpeed's estimator for the four above: {_size(states.deepspeed)}; used)")
    lines.append(f"  EMA teacher (fp32)  {_size(states.teacher)}")
    act = plan.activations
    if act is not None:
        lines.append(f"  activations         {_size(plan.memory['activations'])} = {run.micro_batch} x "
                     f"{_size(act.per_sample)} per sample + {_size(act.fixed)} (measured on {act.device}: the "
                     f"forward and loss of {act.sizes[0]} and of {act.sizes[1]} samples, peaks "
                     f"{_size(act.peaks[0])} and {_size(act.peaks[1])})")
    for key in ("batch tensors", "loss workspace", "cached features"):
        if key in plan.memory:
            lines.append(f"  {key:<19} {_size(plan.memory[key])}")
    lines.append(f"  total               {_size(plan.total_memory)}")
    fits = plan.fits
    if fits:
        lines.append("")
        if not fits["micro_batch"]:
            lines.append(f"in {_size(fits['budget'])} per GPU: not even a micro-batch of 1 fits")
        else:
            lines.append(f"in {_size(fits['budget'])} per GPU: the largest micro-batch is {fits['micro_batch']:,} "
                         f"per rank ({_size(fits['plain_memory'])}); with gradient caching in chunks of "
                         f"{fits['chunk']:,} (data.batch_size) the largest contrastive batch is "
                         f"{fits['contrastive_batch']:,} ({_size(fits['cached_memory'])}; optim.contrastive_batch)")
    return "\n".join(lines)


def print_plan(run: ResolvedRun, asked, rank: int = 0) -> Optional[Plan]:
    """`--plan`: rank 0 measures and prints; every rank returns without training."""
    if rank != 0:
        return None
    from compclip.config import ConfigError

    try:
        budget = parse_memory(asked.args.plan_gpu_memory) if asked.args.plan_gpu_memory else 0
    except ValueError as error:
        raise ConfigError(str(error)) from None
    plan = make_plan(run, gpu_memory=budget)
    print(render(plan, asked.layers), flush=True)
    return plan

