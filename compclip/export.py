"""`compclip-export RUN [--tag TAG] [--teacher] [--out DIR]`: an open_clip model from any committed checkpoint of a
training run.

    compclip-export logs/degla-run                         # the newest complete checkpoint, the student
    compclip-export logs/degla-run --tag step1200 --teacher --out degla-teacher-1200

RUN is a run folder, its `checkpoints/deepspeed/` folder or a tag folder in it; `--tag` names a tag (`step<N>`, any
committed one, mid-epoch included; default: the newest complete one, as `--resume latest` picks it). Its files are
checked against the completion marker first, as a resume checks them: a default tag that fails is passed over for
the previous complete one of its line, with a warning naming the bad file; a `--tag` that fails is refused. The
weights are the fp32 ones of any number of ranks under any ZeRO stage (compclip.trainer.checkpoint.consolidated_fp32:
DeepSpeed's `zero_to_fp32` for ZeRO 1-3), or with `--teacher` the EMA teacher's (each rank's shards in
`compclip_rank<r>.pt`, compclip.trainer.ema.consolidate_shards). Written through compclip.models.export_checkpoint,
as the trainer's epoch exports are:

* `DIR.pt`: open_clip's `epoch_N.pt` layout (`{"epoch", "name", "state_dict"}` + the run's resolved config), for
  `open_clip.create_model_and_transforms(arch, pretrained="DIR.pt")`;
* `DIR/`: an open_clip local folder in the Hugging Face Hub layout, `open_clip_config.json` (the model config, with
  `quick_gelu` as trained) + `open_clip_model.safetensors` + `README.md` (a model card: method, recipe, data and
  the run's evaluations), for `open_clip.create_model_and_transforms("local-dir:DIR")`, or to upload as it is
  (`huggingface-cli upload <you>/<repo> DIR`, then `hf-hub:<you>/<repo>`).

DIR defaults to `<run>/exports/<tag>` (`<tag>-teacher` with `--teacher`). Nothing needs a GPU or a process group.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from compclip import durable, runfolder

log = logging.getLogger("compclip.export")

EXIT_ERROR = 2


class ExportError(ValueError):
    """A run, tag or request that cannot be exported (the message says why)."""


@dataclass
class Exported:
    """What `export_run` wrote, and from where."""

    checkpoint: str
    """`DIR.pt`."""
    folder: str
    """`DIR/` (open_clip local folder with the model card)."""
    run: str
    tag: str
    global_step: int
    epoch: int
    teacher: bool


def locate(path: str, tag: Optional[str]) -> Tuple[runfolder.RunFolder, Path, str]:
    """(run folder, DeepSpeed checkpoint folder, complete tag) of RUN and --tag."""
    given = Path(path)
    if not given.is_dir():
        raise ExportError(f"{path}: no such folder (expected a run folder or a checkpoint tag in it)")
    run = runfolder.RunFolder(given) if (given / "config.yaml").is_file() else runfolder.run_folder_of(path)
    if run is None or not run.config.is_file():
        raise ExportError(f"{path}: not a training run folder (no config.yaml), nor a checkpoint inside one")
    spec = str(run.deepspeed / tag) if tag else (path if run.root.resolve() != given.resolve() else "latest")
    from compclip.config import ConfigError
    from compclip.trainer.checkpoint import first_intact

    try:  # the tag's files checked against its completion marker, falling back as a resume does
        root, name = first_intact(runfolder.candidates(spec, run, warn=True), runfolder.verify, "export",
                                  retry="export")
    except runfolder.CheckpointNotFound as error:
        found = [name for _, name, _ in runfolder.complete_tags(run.deepspeed)]
        reason = str(error).removeprefix("resume: ").removeprefix("resume=")
        raise ExportError(f"{reason} (complete checkpoints of {run.root}: {', '.join(found) or 'none'})") from None
    except ConfigError as error:
        raise ExportError(str(error)) from None
    return run, root, name


def _counters(tag_dir: Path) -> Dict[str, int]:
    from compclip.config import ConfigError
    from compclip.trainer.checkpoint import COUNTERS, read_extras

    try:
        extras = read_extras(tag_dir / runfolder.EXTRAS.format(rank=0))
    except ConfigError as error:
        raise ExportError(str(error)) from None
    return {key: extras[key] for key in COUNTERS}


def load_model(cfg, root: Path, tag: str, teacher: bool):
    """(open_clip model with the tag's fp32 weights, its tokenizer): the run's architecture and locks, built
    without downloading anything, then the student's consolidated weights or the teacher's."""
    from compclip.models import build_from_config, load_trained_weights, parameter_group_names
    from compclip.trainer.checkpoint import consolidated_fp32, consolidated_teacher

    clip, _, _, tokenizer = build_from_config(cfg.model, load_weights=False, initialize=False)  # all loaded below
    if teacher:
        saved = consolidated_teacher(root / tag)
        if saved is None:
            raise ExportError(f"{root / tag}: this run has no EMA teacher (only the tgc and distill terms train "
                              "with one)")
    else:
        saved = consolidated_fp32(root, tag, parameter_group_names(clip, "clip."))
    missing, unexpected = load_trained_weights(clip, saved)
    if missing or unexpected:
        raise ExportError(f"{root / tag}: the checkpoint does not match {cfg.model.arch} as the run built it "
                          f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return clip.eval(), tokenizer


def export_run(path: str, tag: Optional[str] = None, teacher: bool = False, out: Optional[str] = None) -> Exported:
    """Export the tag `tag` of the run at `path` (module docstring); raises ExportError."""
    import yaml
    from open_clip import get_model_preprocess_cfg

    from compclip.config import ConfigError, from_dict, to_dict
    from compclip.models import export_checkpoint

    run, root, tag = locate(path, tag)
    try:
        cfg = from_dict(yaml.safe_load(run.config.read_text(encoding="utf-8")) or {})
    except (ConfigError, yaml.YAMLError) as error:
        raise ExportError(f"{run.config}: {error}") from None
    counters = _counters(root / tag)
    clip, tokenizer = load_model(cfg, root, tag, teacher)
    epoch = counters["epoch"] + (1 if counters["micro_in_epoch"] else 0)  # mid-epoch: as this epoch, like the trainer
    folder = Path(out) if out else run.root / "exports" / (tag + ("-teacher" if teacher else ""))
    checkpoint = str(folder.with_name(folder.name + ".pt"))
    written = export_checkpoint(clip.state_dict(), checkpoint, epoch, cfg.model.arch, to_dict(cfg),
                                quick_gelu=cfg.model.force_quick_gelu, preprocess_cfg=get_model_preprocess_cfg(clip),
                                tokenizer=tokenizer)
    if written is None:
        raise ExportError(f"{cfg.model.arch}: open_clip has no local config of this architecture, so only "
                          f"{checkpoint} was written (no local folder)")
    exported = Exported(checkpoint, written, str(run.root), tag, counters["global_step"], epoch, teacher)
    world = runfolder.marker(root / tag).get("world_size", 1)
    durable.write_text(Path(written) / "README.md", model_card(cfg, exported, world, evaluations(run)))
    return exported


# --------------------------------------------------------------------------------------------------------------
# The model card (README.md of the Hugging Face Hub layout)


def evaluations(run: runfolder.RunFolder) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{label: {benchmark: metrics}} of the run's evaluations `eval/<label>/`, `before` first, then in the order
    they were written."""
    from compclip.evaluation.summarize import is_benchmark_file, read_benchmark_folder

    root = run.root / "eval"
    if not root.is_dir():
        return {}
    folders = [p for p in root.iterdir() if p.is_dir() and any(is_benchmark_file(f) for f in os.listdir(p))]
    folders.sort(key=lambda p: (p.name != "before", max(f.stat().st_mtime for f in p.iterdir()), p.name))
    return {p.name: read_benchmark_folder(str(p)) for p in folders}


def _method_summary(cfg) -> Tuple[str, Dict[str, float], bool]:
    """(the method's label and what it is, from its module's docstring; the weights of its terms; whether it
    trains with an EMA teacher)."""
    import importlib

    from compclip.methods import REGISTRY
    from compclip.resolve import published_terms

    method = REGISTRY[cfg.loss.method]
    doc = (importlib.import_module(method.__module__).__doc__ or "").strip()
    first = " ".join(doc.split("\n\n")[0].split())  # e.g. "DeGLA (Hu et al., 2025): L_base (NegCLIP) + ..."
    described = first if first.startswith(method.label) else f"{method.label}: {first}" if first else method.label
    weights = published_terms(cfg)
    return described, weights, bool({"tgc", "distill"} & set(weights))


def _recipe_rows(cfg, world: int) -> List[Tuple[str, str]]:
    optim, data, model = cfg.optim, cfg.data, cfg.model
    accumulation = optim.grad_accumulation
    batch = optim.contrastive_batch or data.batch_size * accumulation * world
    rows = [("architecture", f"`{model.arch}`" + (" (QuickGELU)" if model.force_quick_gelu else "")),
            ("start", f"`{model.pretrained}`" if model.pretrained else "random init"),
            ("optimizer", f"AdamW, lr {optim.lr:g}, betas {tuple(optim.betas)}, eps {optim.eps:g}, weight decay "
                          f"{optim.weight_decay:g} (not on gains, biases, logit scale, embeddings)"),
            ("schedule", f"{optim.schedule}, {optim.warmup_steps} warm-up steps"),
            ("length", f"{optim.epochs} epoch(s)" + (f", at most {optim.max_steps} steps" if optim.max_steps else "")),
            ("global batch", f"{batch} ({world} rank(s) x {data.batch_size}"
                             + (f" x {accumulation} accumulated" if accumulation > 1 else "")
                             + (", one contrastive batch by gradient caching" if optim.contrastive_batch else "")
                             + ")"),
            ("hard negatives per image", str(data.num_negatives)),
            ("precision", f"{cfg.deepspeed.precision}, DeepSpeed ZeRO stage {cfg.deepspeed.zero_stage}"),
            ("logit scale", f"learnable, exp clamped to <= {optim.logit_scale_max:g}"),
            ("seed", str(cfg.seed))]
    locks = [f"image tower ({model.lock_image_unlocked_groups} last groups trainable)" if model.lock_image else "",
             f"text tower ({model.lock_text_unlocked_layers} last groups trainable)" if model.lock_text else ""]
    if any(locks):
        rows.append(("locked", ", ".join(lock for lock in locks if lock)))
    return rows


def _data_lines(cfg) -> List[str]:
    data = cfg.data
    synthetic = data.synthetic  # a resolved config names the world's folder, and its train.jsonl as the manifest
    if Path(data.train_manifest).parent == Path(synthetic.root):
        return [f"compclip's synthetic compositional world (`compclip.data.synthetic`): {synthetic.num_train} rendered "
                f"scenes of up to {synthetic.max_objects} objects (seed {synthetic.seed}"
                + (", each layout written one way" if synthetic.one_phrasing else "") + "), with their captions, "
                "typed hard negatives and concepts."]
    lines = [f"Training manifest: `{data.train_manifest}`" + (f" (images under `{data.image_root}`)"
                                                              if data.image_root else "") + "."]
    lines.append(f"{data.num_negatives} hard-negative captions per image; captions "
                 + ("with their words shuffled." if data.caption_order == "shuffle" else "as written."))
    return lines


def _evaluation_lines(results: Dict[str, Dict[str, Dict[str, float]]], exported: Exported) -> List[str]:
    from compclip.evaluation.report import format_markdown

    if not results:
        return ["The run was not evaluated; `compclip-eval --checkpoint <this folder's .pt> ...` evaluates the "
                "export."]
    same = [label for label in results if label in (f"epoch_{exported.epoch}", f"step_{exported.global_step}")]
    lines = ["The run's own evaluations (of the student; accuracy and recall in %)"
             + (f"; `{same[0]}` is of the weights exported here" if same and not exported.teacher else "") + "."]
    table = format_markdown(results, title="")
    lines += ["#" + line if line.startswith("#") else line for line in table.splitlines()[1:]]
    return lines


def model_card(cfg, exported: Exported, world: int, results: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    """The README.md of an export: Hugging Face Hub metadata, then method, recipe, data, evaluation and usage."""
    method, weights, has_teacher = _method_summary(cfg)
    run_name = Path(exported.run).name
    which = "EMA teacher" if exported.teacher else "student"
    lines = ["---", "library_name: open_clip", "pipeline_tag: zero-shot-image-classification", "tags:"]
    lines += [f"- {tag}" for tag in ("clip", "open_clip", "compclip", "compositionality", cfg.loss.method)]
    lines += ["---", "", f"# {run_name}: {exported.tag} ({which})", "",
              f"An open_clip `{cfg.model.arch}` fine-tuned for compositional understanding (attributes, relations, "
              f"word order) with compclip, method {method}", "",
              f"These are the {which}'s fp32 weights at optimizer step {exported.global_step} (epoch "
              f"{exported.epoch}), checkpoint `{exported.tag}` of the run `{run_name}`"
              + (f"; the teacher is the exponential moving average of the student, decay {cfg.loss.ema_decay:g}, "
                 "updated after every optimizer step" if exported.teacher else "") + ".", "",
              "## Method", "", "| loss term | weight |", "|---|---:|"]
    lines += [f"| `{term}` | {weight:g} |" for term, weight in weights.items()]
    if has_teacher and not exported.teacher:
        lines += ["", f"The `tgc` / `distill` terms read a frozen EMA teacher (decay {cfg.loss.ema_decay:g}); "
                      "`compclip-export --teacher` exports it."]
    lines += ["", "## Training recipe", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in _recipe_rows(cfg, world)]
    lines += ["", "The full resolved configuration is in the `.pt` export (`compclip_config`).", "", "## Data", ""]
    lines += _data_lines(cfg) + ["", "## Evaluation", ""] + _evaluation_lines(results, exported)
    loader = "local-dir:<this folder>"
    lines += ["", "## Use", "", "```python", "import open_clip", "",
              f"model, _, preprocess = open_clip.create_model_and_transforms({loader!r})",
              f"tokenizer = open_clip.get_tokenizer({loader!r})",
              "# after uploading this folder to the Hub: 'hf-hub:<you>/<repo>' in place of 'local-dir:...'", "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compclip-export", description=__doc__.split("\n\n")[0],
                                     epilog="Writes DIR.pt and DIR/ (module compclip/export.py).")
    parser.add_argument("run", metavar="RUN", help="a training run folder (or its checkpoints/deepspeed/<tag>)")
    parser.add_argument("--tag", help="a complete checkpoint tag, e.g. step1200 (default: the newest complete one)")
    parser.add_argument("--teacher", action="store_true", help="export the EMA teacher instead of the student")
    parser.add_argument("--out", metavar="DIR",
                        help="the export's local folder; DIR.pt is written beside it (default: "
                             "<run>/exports/<tag>[-teacher])")
    return parser


def main(argv: Optional[List[str]] = None) -> Exported:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        exported = export_run(args.run, args.tag, args.teacher, args.out)
    except (ExportError, OSError) as error:
        print(f"compclip-export: {error}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None
    print(json.dumps({"checkpoint": exported.checkpoint, "folder": exported.folder, "tag": exported.tag,
                      "global_step": exported.global_step, "epoch": exported.epoch,
                      "weights": "EMA teacher" if exported.teacher else "student"}, indent=1))
    print(f"load it: open_clip.create_model_and_transforms('local-dir:{exported.folder}')")
    return exported


def cli() -> None:
    """`compclip-export`: main() without its result as the exit status."""
    main()


if __name__ == "__main__":
    cli()
