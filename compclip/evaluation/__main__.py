"""`python -m compclip.evaluation` / `compclip-eval`: evaluate one or more models and compare them.

    compclip-eval --model ViT-B-32 --pretrained openai --checkpoint runs/negclip --checkpoint ft.pt \
        --sugarcrepe data/sugarcrepe --sugarcrepe-image-root coco/val2017 --out eval_out
    compclip-eval --summarize logs/negclip-run logs/degla-run eval_out --out eval_summary

Every `EvalConfig` field but the trainer's `every_n_epochs` is an option (`--sugarcrepe-image-root`,
`--batch-size`, ...); `--config eval.yaml` reads them from YAML first (command-line values win). Writes
`<out>/<model>/<benchmark>.json` (with `.details.json`, and `.clip_benchmark.json` for zero-shot and retrieval),
`<out>/summary.json`, `<out>/results.md`, `<out>/results.csv`, `<out>/comparison.png`, and prints a table.
`--summarize` evaluates nothing: it reads the results of training runs and evaluation folders
(`compclip/evaluation/summarize.py`) and writes one `results.md` / `results.csv` / `comparison.png` of them all.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from typing import List, Optional

from .common import exit_on_bad_input
from .config import EvalConfig, field_docs
from .loading import ModelSpec, load_model, spec_from_run

log = logging.getLogger("compclip.evaluation")

_FIELD_TYPES = {"str": str, "Optional[str]": str, "int": int, "Optional[int]": int}
# EvalConfig fields that are no options here: `progress` is --no-progress; `every_n_epochs` is the trainer's.
_NOT_OPTIONS = ("progress", "every_n_epochs")
_MODEL_OPTIONS = ("model", "pretrained", "model_config", "checkpoint", "label")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends the default where there is a value to show. An option without one (None, a flag's False) says in
    its help what happens without it; the EvalConfig options carry their dataclass default in their help, because
    their parser default must stay unset so that a --config YAML value is not overridden."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is None or default is False or default == argparse.SUPPRESS \
                or default == []:
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compclip-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=_HelpFormatter)
    models = parser.add_argument_group("models")
    models.add_argument("--model", help="open_clip architecture (e.g. ViT-B-32), or the name for --model-config")
    models.add_argument("--pretrained", help="open_clip pretrained tag or checkpoint file for --model")
    models.add_argument("--model-config", help="custom open_clip architecture JSON")
    models.add_argument("--force-quick-gelu", action="store_true",
                        help="build the model with QuickGELU: required for fine-tunes of OpenAI weights, which "
                             "otherwise run with GELU and silently give other numbers")
    models.add_argument("--checkpoint", action="append", default=[],
                        help="a checkpoint file (architecture from --model) or a compclip run folder (latest "
                             "epoch); repeat to compare several side by side")
    models.add_argument("--label", action="append", default=[],
                        help="display names of the models, in order (--pretrained model first)")
    run = parser.add_argument_group("run")
    run.add_argument("--config", help="YAML file of EvalConfig fields (optionally under an 'eval' key)")
    run.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    run.add_argument("--out", default=None,
                     help="output folder (default: eval_out; with --summarize: eval_summary)")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress display (default: a bar in a terminal, a plain line every 30 s in a log; "
                          "COMPCLIP_PROGRESS_INTERVAL sets the seconds)")
    run.add_argument("--summarize", nargs="+", metavar="RUN_OR_DIR",
                     help="evaluate nothing: gather the results of training run folders (their newest "
                          "eval/<label>/), compclip-eval output folders and folders of <benchmark>.json files "
                          "(or folders holding them) into one results.md / results.csv / comparison.png")
    benchmarks = parser.add_argument_group("benchmarks and execution (EvalConfig fields)")
    docs = field_docs()
    for field in dataclasses.fields(EvalConfig):
        if field.name in _NOT_OPTIONS:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        help_text = docs.get(field.name, "").replace("%", "%%")
        if default is not None and default != []:
            help_text += f" (default: {default})"
        if field.type == "List[str]":
            benchmarks.add_argument(flag, nargs="+", default=argparse.SUPPRESS, help=help_text)
        else:
            benchmarks.add_argument(flag, type=_FIELD_TYPES[field.type], default=argparse.SUPPRESS, help=help_text)
    return parser


def eval_config(args) -> EvalConfig:
    values = {}
    if args.config:
        import yaml

        with open(args.config, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle) or {}
        loaded = loaded.get("eval", loaded)
        known = {field.name for field in dataclasses.fields(EvalConfig)}
        unknown = set(loaded) - known
        if unknown:
            raise SystemExit(f"{args.config}: unknown EvalConfig field(s) {sorted(unknown)}")
        values.update(loaded)
    for field in dataclasses.fields(EvalConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = value
    if args.no_progress:
        values["progress"] = False
    return EvalConfig(**values)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def model_specs(args) -> List[ModelSpec]:
    specs = []
    if args.pretrained or not args.checkpoint:
        if not (args.model or args.model_config):
            raise SystemExit("name a model: --model ARCH [--pretrained TAG|FILE], --model-config JSON, "
                             "or --checkpoint RUN_DIR")
        arch = args.model or os.path.splitext(os.path.basename(args.model_config))[0]
        label = f"{arch}:{os.path.basename(args.pretrained)}" if args.pretrained else arch
        specs.append(ModelSpec(label, arch, args.pretrained, args.model_config, args.force_quick_gelu))
    for checkpoint in args.checkpoint:
        if os.path.isdir(checkpoint):
            specs.append(spec_from_run(checkpoint, args.force_quick_gelu))
        elif os.path.isfile(checkpoint):
            if not (args.model or args.model_config):
                raise SystemExit(f"{checkpoint}: a checkpoint file needs --model (or --model-config)")
            arch = args.model or os.path.splitext(os.path.basename(args.model_config))[0]
            if not args.force_quick_gelu and "quickgelu" not in arch.lower():
                log.warning("%s: if it was fine-tuned from OpenAI weights, pass --force-quick-gelu", checkpoint)
            label = os.path.splitext(os.path.basename(checkpoint))[0]
            specs.append(ModelSpec(label, arch, checkpoint, args.model_config, args.force_quick_gelu))
        else:
            raise SystemExit(f"--checkpoint {checkpoint}: no such file or run folder")
    if args.label:
        if len(args.label) != len(specs):
            raise SystemExit(f"{len(args.label)} --label for {len(specs)} models")
        for spec, label in zip(specs, args.label):
            spec.label = label
    seen = {}
    for spec in specs:  # two checkpoints called epoch_5 become epoch_5 and epoch_5-2
        seen[spec.label] = seen.get(spec.label, 0) + 1
        if seen[spec.label] > 1:
            spec.label = f"{spec.label}-{seen[spec.label]}"
    return specs


def summarize_main(args) -> int:
    from .summarize import summarize

    given = [f"--{name.replace('_', '-')}" for name in _MODEL_OPTIONS if getattr(args, name)]
    given += [f"--{field.name.replace('_', '-')}" for field in dataclasses.fields(EvalConfig)
              if field.name not in _NOT_OPTIONS and hasattr(args, field.name)]
    if given or args.config:
        raise SystemExit(f"--summarize reads results and evaluates nothing: drop {', '.join(given or ['--config'])}")
    try:
        written, table = summarize(args.summarize, args.out or "eval_summary")
    except (OSError, ValueError) as error:
        raise SystemExit(f"compclip-eval --summarize: {error}") from None
    print(table)
    print("\nwrote " + ", ".join(written))
    return 0


@exit_on_bad_input
def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.summarize:
        return summarize_main(args)
    cfg = eval_config(args)
    if not cfg.enabled():
        raise SystemExit("no benchmark given: pass at least one of --sugarcrepe, --aro-vg-relation, "
                         "--aro-vg-attribution, --aro-coco-order, --aro-flickr-order, --valse, --generic-jsonl, "
                         "--zeroshot, --retrieval")
    from compclip.heap import startup

    with startup():  # no collections while the imports run; then what they made is frozen
        import torch

        import compclip.models  # noqa: F401  (open_clip)

        from .report import format_table, json_safe, plot_comparison, write_tables
        from .runner import evaluate

    out = args.out or "eval_out"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    specs = model_specs(args)
    runs = {}
    for spec in specs:
        log.info("evaluating %s (%s, pretrained=%s, quick_gelu=%s)", spec.label, spec.arch, spec.pretrained,
                 spec.force_quick_gelu)
        model, preprocess, tokenizer = load_model(spec, device)
        runs[spec.label] = evaluate(model, preprocess, tokenizer, cfg, device,
                                    out_dir=os.path.join(out, _slug(spec.label)), label=spec.label,
                                    arch=spec.arch, pretrained=spec.pretrained or "")
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    os.makedirs(out, exist_ok=True)
    summary = {"models": {spec.label: dataclasses.asdict(spec) for spec in specs}, "results": runs,
               "config": dataclasses.asdict(cfg)}
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(json_safe(summary), handle, indent=2, default=str)
    info = {spec.label: {"arch": spec.arch, "pretrained": spec.pretrained or ""} for spec in specs}
    tables = write_tables(runs, out, info)
    chart = plot_comparison(runs, os.path.join(out, "comparison.png"))
    print(format_table(runs))
    written = [f"{out}/<model>/<benchmark>.json", "summary.json"] + [os.path.basename(p) for p in tables]
    print("\nwrote " + ", ".join(written + ([os.path.basename(chart)] if chart else [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
