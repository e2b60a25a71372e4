"""Validation during training on `data.val_manifest` (the synthetic world's validation split when training on it):
after every epoch (and at a run's last step), the method's loss on the validation data and in-domain retrieval
R@1 in both directions, written to `metrics.jsonl` / tensorboard as `val/...` and drawn in `curves.png`.

* Loss: the training objective, each validation batch as a global batch over the ranks (the same terms, the EMA
  teacher's features where the method has one, CE-CLIP's current threshold), averaged over the batches. The
  validation loader pads the last rank by repeating samples so that every rank runs the same number of collective
  steps; those few repeats enter the average.
* Retrieval: every sample's image and caption embedding, gathered from all ranks to rank 0 with each sample's index
  (the repeats dropped); images are grouped by their file (a manifest with several captions per image, as COCO's),
  so image->text R@1 asks whether the top caption is one of the image's own, and text->image whether the top image
  is the caption's.
Every rank takes part (the forward is a collective under ZeRO-3); rank 0 scores and writes.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

import torch

from compclip.data import to_device
from compclip.distributed import all_gather_no_grad, get_rank
from compclip.rng import rng_state, set_rng_state

logger = logging.getLogger("compclip")


def recall_at_1(images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor) -> Dict[str, float]:
    """R@1 both ways for unit `images` [I, D], unit `texts` [T, D] and `owner` [T] (the image of each text)."""
    scores = texts @ images.T
    text_to_image = (scores.argmax(dim=1) == owner).double().mean().item()
    best_text = scores.argmax(dim=0)
    image_to_text = (owner[best_text] == torch.arange(images.shape[0])).double().mean().item()
    return {"image_to_text_R@1": image_to_text, "text_to_image_R@1": text_to_image}


class Validator:
    """`run(step)` after an epoch: validation loss and R@1 of the current model (every rank calls it)."""

    def __init__(self, loader, method, engine, teacher, device: torch.device, dtype: torch.dtype, metrics):
        self.loader, self.method, self.engine, self.teacher = loader, method, engine, teacher
        self.device, self.dtype, self.metrics = device, dtype, metrics
        records = getattr(getattr(loader, "dataset", None), "records", None)
        self.image_of = [record.image for record in records] if records is not None else None

    @torch.no_grad()
    def run(self, step: int) -> Optional[Dict[str, float]]:
        """Validate at optimizer step `step`; the random generators are left as they were (a resumed run draws what
        the straight run draws)."""
        generators = rng_state(self.device)
        self.engine.eval()
        try:
            totals, parts_sum, batches = 0.0, {}, 0
            images: List[torch.Tensor] = []
            texts: List[torch.Tensor] = []
            indices: List[torch.Tensor] = []
            for batch in self.loader:
                batch = to_device(batch, self.device)
                features = self.method.features(self.engine, self.teacher, batch, self.dtype)
                loss, parts = self.method.loss(features)
                totals += float(loss)
                for name, value in parts.items():
                    parts_sum[name] = parts_sum.get(name, 0.0) + float(value)
                batches += 1
                images.append(features.image.float().cpu())
                texts.append(features.text.float().cpu())
                indices.append(batch["index"].cpu())
        finally:
            self.engine.train()
            set_rng_state(generators, self.device)
        values = self._retrieval(torch.cat(images), torch.cat(texts), torch.cat(indices))
        if values is None:  # not rank 0
            return None
        values = {"val/loss": totals / max(batches, 1), **{f"val/loss/{k}": v / max(batches, 1)
                                                            for k, v in parts_sum.items()}, **values}
        self.metrics.write(step, values)
        logger.info("validation at step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in values.items()))
        return values

    def _retrieval(self, images: torch.Tensor, texts: torch.Tensor, indices: torch.Tensor):
        images, texts = all_gather_no_grad(images), all_gather_no_grad(texts)
        indices = all_gather_no_grad(indices)
        if get_rank() != 0:
            return None
        order, keep = {}, []
        for row, index in enumerate(indices.tolist()):
            if index not in order:  # a repeat of the padded last rank
                order[index] = row
                keep.append(row)
        keep = torch.tensor(keep)
        texts, samples = texts[keep], indices[keep].tolist()
        files = [self.image_of[i] if self.image_of is not None else i for i in samples]
        first: Dict[object, int] = {}
        owner = torch.tensor([first.setdefault(name, len(first)) for name in files])
        rows = torch.tensor([keep[files.index(name)].item() for name in first])
        values = recall_at_1(images[rows], texts, owner)
        return {f"val/{key}": value for key, value in values.items()}
