"""Evaluation of open_clip models on compositional benchmarks (SugarCrepe, ARO, VALSE, generic multiple choice),
zero-shot classification and image↔text retrieval.

`evaluate(model, preprocess, tokenizer, cfg, device, out_dir=None) -> {benchmark: {metric: value}}` is what the
trainer calls; `python -m compclip.evaluation` (`compclip-eval`) is the command line.
"""
from .common import BenchmarkResult, EvalDataError, EvaluationStopped
from .config import EvalConfig
from .embed import Embedder, ImageRef
from .runner import evaluate, run_benchmarks

__all__ = ["EvalConfig", "evaluate", "run_benchmarks", "Embedder", "ImageRef", "BenchmarkResult", "EvalDataError",
           "EvaluationStopped"]
