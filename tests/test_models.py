"""compclip.models: visual tokens, one-forward encoding, parameter groups, logit-scale clamp, export round trip."""
import math
import os
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from compclip.trainer.engine import clamp_logit_scale, full_state_dict
from compclip.models import Encoder, build_model, capture_visual_tokens, export_checkpoint, parameter_groups


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("compclip-tiny")


@pytest.fixture(scope="module")
def tiny_map():
    torch.manual_seed(0)
    return build_model("compclip-tiny-map")


def test_vit_class_token_through_ln_post_and_proj_is_encode_image(tiny):
    model = tiny[0].eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), capture_visual_tokens(model) as store:
        pooled = model.encode_image(images)
    assert torch.equal(store["class_token"], pooled)
    assert store["tokens"].shape == (2, 64, 64)  # (64 / 8)^2 patch tokens, joint width 64


def test_map_head_value_path_is_the_pool_of_a_lone_token(tiny_map):
    # With one key, attention is 1 on it, so the MAP head's output is exactly the token's value path.
    model = tiny_map[0].eval()
    pool = model.visual.trunk.attn_pool
    lone = torch.randn(3, 1, 64)
    from compclip.models import _map_value_path

    with torch.no_grad():
        torch.testing.assert_close(_map_value_path(pool, lone), pool(lone).reshape(3, 1, 64), rtol=1e-5, atol=1e-6)
        with capture_visual_tokens(model) as store:
            model.encode_image(torch.randn(2, 3, 64, 64))
    assert store["tokens"].shape == (2, 16, 64)


def test_encoder_is_one_forward_for_positives_negatives_and_concepts(tiny):
    model, _, _, tokenizer = tiny
    encoder = Encoder(model).eval()
    images = torch.randn(2, 3, 64, 64)
    text = tokenizer(["a red circle", "a blue square"])
    negatives = tokenizer(["a blue circle", "a red square", "a green circle", "a red cross"]).reshape(2, 2, -1)
    concepts = tokenizer(["red circle", "blue square", "square"])
    with torch.no_grad():
        out = encoder(images, text, negatives, concepts, want_tokens=True)
        torch.testing.assert_close(out.negatives[1, 1], F.normalize(model.encode_text(negatives[1, 1:]), dim=-1)[0])
        torch.testing.assert_close(out.concepts, F.normalize(model.encode_text(concepts), dim=-1))
        torch.testing.assert_close(out.image, F.normalize(model.encode_image(images), dim=-1))
    assert out.logit_scale.dim() == 0 and out.tokens.shape == (2, 64, 64)
    torch.testing.assert_close(out.tokens.norm(dim=-1), torch.ones(2, 64))


def test_no_weight_decay_on_gains_biases_scales_and_class_embedding(tiny):
    model = Encoder(build_model("compclip-tiny")[0])
    no_decay, decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert "clip.logit_scale" in plain and "clip.visual.class_embedding" in plain
    assert all(("ln" in n or "bias" in n or "logit" in n or "class_embedding" in n) for n in plain)
    assert {names[id(p)] for p in decay["params"]} >= {"clip.visual.proj", "clip.text_projection"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_logit_scale_clamp_and_export_loads_in_open_clip(tmp_path):
    torch.manual_seed(1)
    model = build_model("compclip-tiny")[0]
    encoder = Encoder(model)  # 0-dim parameters become [1] for DeepSpeed
    assert model.logit_scale.shape == (1,)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(300.0))
    clamp_logit_scale(model, 100.0)
    assert math.isclose(model.logit_scale.exp().item(), 100.0, rel_tol=1e-6)
    state = full_state_dict(model)
    assert state["logit_scale"].shape == ()  # the stock shape again
    path = tmp_path / "epoch_1.pt"
    export_checkpoint(state, str(path), 1, "compclip-tiny")
    stock, _, _ = open_clip.create_model_and_transforms("compclip-tiny", pretrained=str(path))
    stock.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(stock.encode_image(images), encoder.clip.eval().encode_image(images))
    assert math.isclose(stock.logit_scale.exp().item(), 100.0, rel_tol=1e-6)


@pytest.mark.parametrize("head", ["stock", "fc_norm_and_trunk_head"])
def test_map_tokens_follow_the_whole_pooled_path(head):
    """When every patch token entering the MAP head is the same, attention over them returns that token's value,
    so each visual token must equal the image embedding itself: the value path, then whatever the tower applies
    after the pool (timm's fc_norm and classifier head, open_clip's head). Checked with the stock tiny SigLIP-style
    tower and with a non-trivial fc_norm and trunk head (a timm MAP model built with fc_norm / num_classes)."""
    torch.manual_seed(0)
    model = build_model("compclip-tiny-map")[0].eval()
    trunk = model.visual.trunk
    if head != "stock":
        trunk.fc_norm = torch.nn.LayerNorm(64)
        torch.nn.init.normal_(trunk.fc_norm.weight)
        trunk.head = torch.nn.Linear(64, 64)
    same = trunk.norm.register_forward_hook(lambda module, inputs, output: output[:, :1].expand_as(output))
    try:
        with torch.no_grad(), capture_visual_tokens(model) as store:
            pooled = model.encode_image(torch.randn(2, 3, 64, 64))
    finally:
        same.remove()
    assert store["tokens"].shape == (2, 16, 64)
    torch.testing.assert_close(store["tokens"], pooled.unsqueeze(1).expand(2, 16, 64), rtol=1e-5, atol=1e-5)


def test_sincos_tiny_has_a_fixed_2d_sincos_position_embedding_outside_the_optimizer():
    """compclip-tiny-sincos: the image tower's position embedding is the closed-form 2-D sin-cos table (a zero row
    for the class token, then per patch sin/cos of its row and of its column at D/4 frequencies each), frozen,
    and so in no parameter group."""
    model = build_model("compclip-tiny-sincos")[0]
    table = model.visual.positional_embedding
    width, grid = table.shape[1], model.visual.grid_size[0]
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))

    def half(pos):
        angle = pos.double()[:, None] * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    expected = torch.cat([torch.zeros(1, width, dtype=torch.float64),
                          torch.cat([half(cols), half(rows)], dim=1)])  # first half: the column, second: the row
    assert not table.requires_grad
    torch.testing.assert_close(table.double(), expected, rtol=0, atol=1e-6)
    grouped = {id(p) for group in parameter_groups(model, 0.1) for p in group["params"]}
    assert id(table) not in grouped


LOAD_LOCAL_DIR = """
import sys, torch, open_clip
folder, inputs, out = sys.argv[1:]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
images, captions = torch.load(inputs)
model.eval()
with torch.no_grad():
    torch.save({"image": model.encode_image(images), "text": model.encode_text(tokenizer(captions)),
                "quick_gelu": type(model.visual.transformer.resblocks[0].mlp.gelu).__name__}, out)
"""


@pytest.mark.parametrize("arch, quick_gelu", [("compclip-tiny", False), ("ViT-B-32", True)])
def test_the_export_loads_as_a_local_folder_in_stock_open_clip(tmp_path, arch, quick_gelu):
    """`open_clip.create_model_and_transforms("local-dir:epoch_N")` in a fresh process that never imported compclip
    (so neither its architecture configs nor its QuickGELU rule): the embeddings equal the trained model's. For a
    QuickGELU ViT-B-32 (how OpenAI weights run), the `.pt` loaded with the plain architecture name would not."""
    import subprocess
    import sys

    from open_clip import get_model_preprocess_cfg

    torch.manual_seed(3)
    model, _, preprocess, tokenizer = build_model(arch, force_quick_gelu=quick_gelu)
    model.eval()
    state = full_state_dict(Encoder(model).clip)
    path = tmp_path / "checkpoints" / "epoch_1.pt"
    folder = export_checkpoint(state, str(path), 1, arch, quick_gelu=quick_gelu,
                               preprocess_cfg=get_model_preprocess_cfg(model), tokenizer=tokenizer)
    umask = os.umask(0)
    os.umask(umask)
    for written in (path, *Path(folder).iterdir()):  # as readable as the process's umask allows (shared clusters)
        assert written.stat().st_mode & 0o777 == 0o666 & ~umask, written
    size = model.visual.image_size
    images = torch.randn(2, 3, *(size if isinstance(size, tuple) else (size, size)))
    captions = ["a red circle left of a blue square", "a photo of a dog"]
    torch.save((images, captions), tmp_path / "inputs.pt")
    subprocess.run([sys.executable, "-c", LOAD_LOCAL_DIR, folder, str(tmp_path / "inputs.pt"), str(tmp_path / "o.pt")],
                   check=True, cwd=tmp_path, timeout=300)
    loaded = torch.load(tmp_path / "o.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded["image"], model.encode_image(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded["text"], model.encode_text(tokenizer(captions)), rtol=0, atol=1e-6)
    assert loaded["quick_gelu"] == ("QuickGELU" if quick_gelu else "GELU")
    if quick_gelu:  # the pitfall the folder removes: the same weights with the architecture's own GELU
        plain = open_clip.create_model_and_transforms(arch, pretrained=str(path))[0].eval()
        with torch.no_grad():
            assert not torch.allclose(plain.encode_image(images), loaded["image"], atol=1e-3)


@pytest.mark.parametrize("locks, image, text", [
    (dict(lock_image=True), 0, None),
    (dict(lock_image=True, lock_image_unlocked_groups=2, lock_text=True, lock_text_unlocked_layers=1), 2, 1),
    (dict(lock_text=True, lock_text_unlocked_layers=3), None, 3),
])
def test_locked_towers_are_open_clips_own_locks_and_stay_out_of_the_optimizer(locks, image, text):
    """model.lock_* freeze exactly what open_clip's lock_image_tower / lock_text_tower freeze with the same counts,
    and the optimizer's groups hold exactly the rest (an emptied group is dropped)."""
    from compclip.config import ModelConfig
    from compclip.models import build_from_config, lock_towers, parameter_group_names

    torch.manual_seed(0)
    ours = build_from_config(ModelConfig(arch="compclip-tiny", pretrained="", **locks), load_weights=False)[0]
    reference = build_model("compclip-tiny")[0]
    if image is not None:
        reference.lock_image_tower(unlocked_groups=image)
    if text is not None:
        reference.lock_text_tower(unlocked_layers=text)
    frozen = {name for name, param in reference.named_parameters() if not param.requires_grad}
    assert frozen == {name for name, param in ours.named_parameters() if not param.requires_grad} != set()
    grouped = [name for group in parameter_group_names(ours) for name in group]
    assert sorted(grouped) == sorted(name for name, _ in ours.named_parameters() if name not in frozen)
    assert "locked" in lock_towers(build_model("compclip-tiny")[0], ModelConfig(**locks))

    both = build_from_config(ModelConfig(arch="compclip-tiny", pretrained="", lock_image=True, lock_text=True),
                             load_weights=False)[0]
    groups = parameter_groups(Encoder(both), 0.1)
    # everything but the logit scale is frozen, and it is not decayed: one group is left
    assert [[p.shape for p in group["params"]] for group in groups] == [[torch.Size([1])]]
    assert groups[0]["weight_decay"] == 0.0


def test_lock_problems_are_found_from_the_model_config():
    from compclip.config import ModelConfig
    from compclip.models import build_from_config, lock_problem

    keep_norms = ModelConfig(arch="compclip-tiny", pretrained="", lock_text=True, lock_text_freeze_layer_norm=False)
    assert "model.lock_text_freeze_layer_norm=false" in lock_problem(keep_norms)
    assert lock_problem(ModelConfig(arch="compclip-tiny", lock_text=True)) is None
    with pytest.raises(ValueError, match="lock_text_freeze_layer_norm"):
        build_from_config(keep_norms, load_weights=False)


@pytest.mark.parametrize("arch", ["compclip-tiny", "compclip-tiny-map"])
def test_a_model_built_for_loaded_weights_skips_only_the_random_draws(tmp_path, arch):
    """A checkpoint file loaded at build time skips torch.nn.init's random draws; the loaded
    model equals one built the ordinary way and given the same weights, buffers included, and the initialisers
    are themselves again afterwards (also after an error inside)."""
    from compclip.models import create_model_and_transforms, register_model_configs, uninitialized_parameters

    register_model_configs()
    normal = torch.nn.init.normal_
    with pytest.raises(RuntimeError), uninitialized_parameters():
        marker = torch.full((4,), 7.0)
        assert torch.nn.init.normal_(marker) is marker and torch.equal(marker, torch.full((4,), 7.0))
        raise RuntimeError("inside")
    assert torch.nn.init.normal_ is normal
    reference = build_model(arch)[0]
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": arch, "state_dict": reference.state_dict()}, path)
    drawn = []
    original = torch.Tensor.normal_
    torch.Tensor.normal_ = lambda self, *a, **k: (drawn.append(self.shape), original(self, *a, **k))[1]
    try:
        loaded = create_model_and_transforms(arch, str(path), False)[0]
    finally:
        torch.Tensor.normal_ = original
    assert drawn == []  # nothing drawn at random: every parameter came from the file
    expected, actual = reference.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert all(torch.equal(a, b) for a, b in zip(reference.buffers(), loaded.buffers()))
