"""Validation during training (data.val_manifest): the logged validation loss and in-domain R@1 equal what the
exported model gives when computed again here, with several captions per image (COCO's shape) grouped by file."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compclip.trainer.validate import recall_at_1


def test_recall_at_1_closed_form():
    images = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    # texts 0, 1 belong to image 0; text 2 to image 1; text 3 to image 2 but points at image 0
    texts = F.normalize(torch.tensor([[1.0, 0.1], [0.9, 0.0], [0.0, 1.0], [1.0, -0.2]]), dim=-1)
    owner = torch.tensor([0, 0, 1, 2])
    values = recall_at_1(images, texts, owner)
    assert values["text_to_image_R@1"] == pytest.approx(3 / 4)
    # image 0's best text is one of its own, image 1's too; image 2's best text (text 0) is image 0's
    assert values["image_to_text_R@1"] == pytest.approx(2 / 3)


def test_logged_validation_equals_the_export_recomputed(tmp_path, one_process):
    from compclip.config import LossConfig
    from compclip.data import DataConfig, build_dataloader
    from compclip.data.synthetic import generate_world
    from compclip.methods import build_method
    from compclip.models import Encoder, build_model
    from compclip.train import main

    world = generate_world(str(tmp_path / "world"), 32, 6, seed=2, image_size=32)
    rows = [json.loads(line) for line in Path(world.val).read_text().splitlines()]
    paraphrased = [dict(row, caption=row["caption"].replace("a ", "one ", 1)) for row in rows]
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(dict(row, image=str(Path(world.root) / row["image"]))) + "\n"
                           for row in rows + paraphrased))  # 6 images, 2 captions each
    main(["--config", "tiny", "--loss.method=negclip", f"--data.train_manifest={world.train}",
          f"--data.val_manifest={val}", "--data.batch_size=4", "--optim.max_steps=2", f"--log.logs={tmp_path}",
          "--log.name=v", "--eval_before=false", "--threads=1"])
    logged = [json.loads(line) for line in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    (values,) = [row for row in logged if "val/loss" in row]
    assert values["step"] == 2

    export = torch.load(tmp_path / "v" / "checkpoints" / "epoch_1.pt", weights_only=False)["state_dict"]
    clip, _, preprocess, tokenizer = build_model("compclip-tiny")
    clip.load_state_dict(export)
    encoder = Encoder(clip).eval()
    method = build_method(LossConfig(method="negclip", backend="torch"), num_negatives=4, has_logit_bias=False)
    loader = build_dataloader(DataConfig(train_manifest=world.train, val_manifest=str(val), batch_size=4),
                              tokenizer, preprocess, rank=0, world_size=1, seed=0, train=False)
    losses, texts, images = [], [], []
    with torch.no_grad():
        for batch in loader:
            features = method.features(encoder, None, batch)
            losses.append(float(method.loss(features)[0]))
            texts.append(features.text)
            images.append(features.image)
    assert values["val/loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    texts, images = torch.cat(texts), torch.cat(images)
    owner = torch.tensor([index % 6 for index in range(12)])  # row i and row i + 6 show the same image
    expected = recall_at_1(images[:6], texts, owner)
    for key, value in expected.items():
        assert values[f"val/{key}"] == pytest.approx(value), key
    assert (tmp_path / "v" / "curves.png").stat().st_size > 10_000
