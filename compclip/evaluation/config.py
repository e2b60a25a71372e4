"""`EvalConfig`: which benchmarks to run, where their files are, and how to batch.

Flat fields of plain types (str, int, list of str) so the trainer can nest it in its YAML schema and override any
field from the command line (`--eval.batch_size=128`). A benchmark runs when its file field is set.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional

from compclip.fields import Section, field_docstrings


@dataclass
class EvalConfig(Section):
    # ---- SugarCrepe and any data in its format ----------------------------------------------------------------
    sugarcrepe: Optional[str] = None
    """SugarCrepe annotations: a directory of `<subset>.json` files (`{id: {filename, caption,
    negative_caption}}`; the 7 official subsets, or any set such as the synthetic world's `eval/<type>.json`) or a
    single such file."""
    sugarcrepe_image_root: Optional[str] = None
    """Folder the `filename` of each SugarCrepe item is relative to (COCO val2017 for the official data). Default:
    the folder of the annotation file."""
    sugarcrepe_subsets: List[str] = field(default_factory=list)
    """Subset names (file stems) to keep; empty = every SugarCrepe-format JSON file of the directory."""

    # ---- ARO --------------------------------------------------------------------------------------------------
    aro_vg_relation: Optional[str] = None
    """ARO `visual_genome_relation.json` (items with `image_path`, `bbox_x/y/w/h`, `true_caption`,
    `false_caption`, `relation_name`)."""
    aro_vg_attribution: Optional[str] = None
    """ARO `visual_genome_attribution.json` (same fields, `attributes` [a, b] instead of `relation_name`)."""
    aro_vg_image_root: Optional[str] = None
    """Folder the VG items' `image_path` is relative to. Default: the folder of the annotation file."""
    aro_exclude_relations: List[str] = field(default_factory=list)
    """VG-Relation relation names left out of the macro average (e.g. symmetric relations); empty = all."""
    aro_attribution_min_count: int = 25
    """VG-Attribution attribute pairs with fewer items are left out of the macro average (25 in the ARO authors'
    code); 0 keeps every pair."""
    aro_coco_order: Optional[str] = None
    """Karpathy-split JSON of COCO (`dataset_coco.json`, or a BLIP-style list of `{image, caption: [...]}`) for
    COCO-Order."""
    aro_coco_image_root: Optional[str] = None
    """Folder the COCO images are relative to (`filepath/filename` of the Karpathy JSON)."""
    aro_flickr_order: Optional[str] = None
    """Karpathy-split JSON of Flickr30k (`dataset_flickr30k.json` or BLIP-style list) for Flickr30k-Order."""
    aro_flickr_image_root: Optional[str] = None
    """Folder the Flickr30k images are relative to."""
    aro_order_split: str = "test"
    """Karpathy split used by COCO-Order and Flickr30k-Order."""
    aro_order_seed: int = 0
    """Seed of the RNG that draws the word-order perturbations (the same seed gives the same captions)."""
    spacy_model: str = "en_core_web_sm"
    """spaCy pipeline (package name or path) for the part-of-speech tags of the Order perturbations."""

    # ---- VALSE ------------------------------------------------------------------------------------------------
    valse: Optional[str] = None
    """VALSE annotations: a directory of piece files (`{id: {image_file, caption, foil, mturk: {caption, ...}}}`)
    or a single piece file. Only valid items (`mturk.caption >= 2`) are scored."""
    valse_image_root: Optional[str] = None
    """Folder holding the VALSE images: `image_file` is looked up directly under it, then under `<piece>/`."""
    valse_pieces: List[str] = field(default_factory=list)
    """Piece names (file stems) to keep; empty = every piece file of the directory."""

    # ---- generic multiple choice ------------------------------------------------------------------------------
    generic_jsonl: List[str] = field(default_factory=list)
    """JSONL files, one item per line: `{"image": path, "captions": [...], "label": index of the right caption,
    "id"?: ...}`; each file is its own benchmark `generic_<stem>`."""
    generic_image_root: Optional[str] = None
    """Folder relative `image` paths of the generic files are resolved against. Default: the file's folder."""

    # ---- zero-shot classification -----------------------------------------------------------------------------
    zeroshot: Optional[str] = None
    """Zero-shot data: an image folder with one subfolder per class, or a CSV file with columns `image,label`
    (label = class index or class name)."""
    zeroshot_image_root: Optional[str] = None
    """Folder relative CSV image paths are resolved against. Default: the CSV's folder."""
    zeroshot_classnames: Optional[str] = None
    """Text file with one class name per line, in label order (folders: sorted, numerically when numbered;
    CSV: label indices), overriding the names below. Default: open_clip's ImageNet class names for ImageNet class
    folders (WordNet ids such as `n01440764`, or ImageNet-V2's `0`-`999`) or an ImageNet `zeroshot_dataset`;
    otherwise the folder names (underscores become spaces) or the sorted distinct CSV labels."""
    zeroshot_templates: str = "openai"
    """Prompt templates: `openai` (open_clip's 80 CLIP ImageNet templates, which clip_benchmark uses for ImageNet and
    for datasets it has no templates for), `openai-simple` (open_clip's 7-template subset), `simple`
    ('a photo of a {}.'), or a text file with one template per line containing `{}`."""
    zeroshot_dataset: Optional[str] = None
    """The dataset's name as clip_benchmark's `--dataset` calls it, written into `zeroshot.clip_benchmark.json`.
    The ImageNet names (`imagenet1k`, `imagenetv2`, `imagenet_sketch`, `imagenet-a`, `imagenet-r`, `imagenet-o`)
    also select open_clip's ImageNet class names, for a CSV of ImageNet label indices or any numbered folders.
    Default: the folder's or CSV file's name."""

    # ---- retrieval --------------------------------------------------------------------------------------------
    retrieval: Optional[str] = None
    """Karpathy-style JSON (`{"images": [{"filename", "split", "sentences": [{"raw"}], "filepath"?}]}`)."""
    retrieval_image_root: Optional[str] = None
    """Folder the retrieval images (`filepath/filename`) are relative to. Default: the JSON's folder."""
    retrieval_split: str = "test"
    """Karpathy split to evaluate (`test`, `val`, `restval`, `train`)."""

    # ---- execution --------------------------------------------------------------------------------------------
    batch_size: int = 64
    """Images or texts per forward pass."""
    num_workers: int = 0
    """DataLoader worker processes that decode and preprocess images (0 = in the main process)."""
    precision: str = "amp"
    """`amp`: bfloat16 autocast on CUDA (fp32 on a CPU); `fp32`: no autocast."""
    max_items: Optional[int] = None
    """Keep only the first N items of each benchmark file (quick periodic checks); None = all."""
    every_n_epochs: int = 1
    """Periodic evaluation during training: run after every N-th epoch; 0 = never (not a `compclip-eval` option)."""
    progress: bool = True
    """Show progress: a bar in a terminal, a plain line every 30 s in a log (`compclip.progress`)."""

    def enabled(self) -> bool:
        """Whether any benchmark is configured."""
        return bool(self.sugarcrepe or self.aro_vg_relation or self.aro_vg_attribution or self.aro_coco_order
                    or self.aro_flickr_order or self.valse or self.generic_jsonl or self.zeroshot
                    or self.retrieval)

    def due(self, epoch: int) -> bool:
        """Whether the trainer should evaluate after `epoch` (1-based count of finished epochs)."""
        return self.enabled() and self.every_n_epochs > 0 and epoch % self.every_n_epochs == 0

    def __post_init__(self):
        if self.precision not in ("amp", "fp32"):
            raise ValueError(f"EvalConfig.precision must be 'amp' or 'fp32', got {self.precision!r}")
        if self.batch_size < 1:
            raise ValueError(f"EvalConfig.batch_size must be >= 1, got {self.batch_size}")
        for f in fields(self):
            if f.name in ("sugarcrepe_subsets", "aro_exclude_relations", "valse_pieces", "generic_jsonl"):
                value = getattr(self, f.name)
                if isinstance(value, str):  # a single path from YAML or the CLI
                    setattr(self, f.name, [value])


def field_docs(cls=EvalConfig) -> Dict[str, str]:
    """{field: docstring} read from the class source (the string literal under each field), for CLI help."""
    return field_docstrings(cls)
