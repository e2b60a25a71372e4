"""`python -m compclip.evaluation` / `compclip-eval`: evaluate one or more models and compare them.

    compclip-eval --model ViT-B-32 --pretrained openai --checkpoint runs/negclip --checkpoint ft.pt \
        --sugarcrepe data/sugarcrepe --sugarcrepe-image-root coco/val2017 --out eval_out

Every `EvalConfig` field is an option (`--sugarcrepe-image-root`, `--batch-size`, ...); `--config eval.yaml` reads
them from YAML first (command-line values win). Writes `<out>/<model>/<benchmark>.json`, `<out>/summary.json`,
`<out>/comparison.png`, and prints a table.
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compclip-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    run.add_argument("--device", default=None, help="cuda when available, else cpu")
    run.add_argument("--out", default="eval_out", help="output folder")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    benchmarks = parser.add_argument_group("benchmarks (EvalConfig fields)")
    docs = field_docs()
    for field in dataclasses.fields(EvalConfig):
        if field.name == "progress":
            continue
        flag = "--" + field.name.replace("_", "-")
        help_text = docs.get(field.name, "")
        if field.type == "List[str]":
            benchmarks.add_argument(flag, nargs="+", default=None, help=help_text)
        else:
            benchmarks.add_argument(flag, type=_FIELD_TYPES[field.type], default=None, help=help_text)
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


@exit_on_bad_input
def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    cfg = eval_config(args)
    if not cfg.enabled():
        raise SystemExit("no benchmark given: pass at least one of --sugarcrepe, --aro-vg-relation, "
                         "--aro-vg-attribution, --aro-coco-order, --aro-flickr-order, --valse, --generic-jsonl, "
                         "--zeroshot, --retrieval")
    import torch

    from .report import format_table, json_safe, plot_comparison
    from .runner import evaluate

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    specs = model_specs(args)
    runs = {}
    for spec in specs:
        log.info("evaluating %s (%s, pretrained=%s, quick_gelu=%s)", spec.label, spec.arch, spec.pretrained,
                 spec.force_quick_gelu)
        model, preprocess, tokenizer = load_model(spec, device)
        runs[spec.label] = evaluate(model, preprocess, tokenizer, cfg, device,
                                    out_dir=os.path.join(args.out, _slug(spec.label)), label=spec.label)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    summary = {"models": {spec.label: dataclasses.asdict(spec) for spec in specs}, "results": runs,
               "config": dataclasses.asdict(cfg)}
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(json_safe(summary), handle, indent=2, default=str)
    chart = plot_comparison(runs, os.path.join(args.out, "comparison.png"))
    print(format_table(runs))
    print(f"\nwrote {args.out}/<model>/<benchmark>.json, summary.json" + (f", {chart}" if chart else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
