"""The bundled recipes, resolved exactly as `compclip/train.py` resolves them (compclip.config.request, then
compclip.resolve.resolve), equal key by key to the published-recipe table configs/recipes.yaml; and docs/losses.md
shows that table."""
from pathlib import Path

import pytest

from compclip.config import bundled_configs, recipe_table, request
from compclip.resolve import resolve

ROOT = Path(__file__).resolve().parents[1]
TABLE = recipe_table()
RECIPES = [name for name in bundled_configs() if "/" not in name and name != "tiny"]  # tiny*: CPU overlays


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipes") / "train.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "a dog on a red sofa", "negatives": ["a red dog on a sofa"]}\n')
    return str(path)


def resolved_recipe(argv, world_size=1):
    """The table's keys of the run `argv` resolves to, through main()'s own two steps."""
    asked = request(argv)
    run = resolve(asked.config, world_size, layers=asked.layers)
    cfg, optim = run.config, run.config.optim
    recipe = {"arch": cfg.model.arch, "pretrained": run.requested.model.pretrained,
              "quick_gelu": cfg.model.force_quick_gelu, "method": cfg.loss.method,
              "terms": _terms(cfg), "options": cfg.loss.options, "K": cfg.data.num_negatives,
              "global_batch": run.global_batch, "epochs": optim.epochs, "steps": optim.max_steps, "lr": optim.lr,
              "betas": optim.betas, "eps": optim.eps, "weight_decay": optim.weight_decay,
              "warmup": optim.warmup_steps, "schedule": optim.schedule, "grad_clip": optim.grad_clip,
              "precision": cfg.deepspeed.precision, "zero": cfg.deepspeed.zero_stage}
    if {"tgc", "distill"} & set(recipe["terms"]):
        recipe["ema"] = cfg.loss.ema_decay
    return recipe


def _terms(cfg):
    from compclip.resolve import published_terms

    return published_terms(cfg)


def differences(actual, expected):
    keys = sorted(set(actual) | set(expected))
    return [f"{key}: resolved {actual.get(key)!r}, table {expected.get(key)!r}" for key in keys
            if actual.get(key) != expected.get(key)]


def test_every_bundled_recipe_is_in_the_table():
    assert sorted(RECIPES) == sorted(TABLE)


@pytest.mark.parametrize("name", RECIPES)
def test_the_bundled_recipe_resolves_to_the_table(name, manifest):
    argv = ["--config", name] + ([] if name == "default" else [f"--data.train_manifest={manifest}"])
    actual = resolved_recipe(argv)
    assert not differences(actual, TABLE[name]), "\n".join(differences(actual, TABLE[name]))
    if name != "default":  # the global batch is the paper's on any number of ranks
        assert resolved_recipe(argv, world_size=8)["global_batch"] == TABLE[name]["global_batch"]


def test_the_embedded_default_is_the_run_with_no_arguments():
    assert resolved_recipe([]) == resolved_recipe(["--config", "default"]) == TABLE["default"]
    # a flag that names no data keeps it; naming data or a config drops it
    assert resolved_recipe(["--optim.max_steps=10"])["arch"] == "compclip-tiny-sincos"


def test_a_drifted_yaml_is_caught(tmp_path, manifest):
    """The comparison fails when a recipe drifts: degla.yaml with another lr and no EMA decay."""
    drifted = tmp_path / "degla.yaml"
    text = (ROOT / "configs" / "degla.yaml").read_text()
    drifted.write_text(text.replace("lr: 1.0e-6", "lr: 2.0e-6").replace("ema_decay: 0.9996", "ema_decay: 0.999"))
    found = differences(resolved_recipe(["--config", str(drifted), f"--data.train_manifest={manifest}"]),
                        TABLE["degla"])
    assert found == ["ema: resolved 0.999, table 0.9996", "lr: resolved 2e-06, table 1e-06"]


def recipe_markdown() -> str:
    """The table as docs/losses.md shows it."""
    rows = ["| recipe | model | terms | K | global batch | length | optimiser, schedule | precision, ZeRO |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in TABLE.items():
        model = f"{r['arch']} `{r['pretrained']}`" + (" (QuickGELU)" if r["quick_gelu"] else "")
        terms = " + ".join(f"{w:g} {t}" for t, w in r["terms"].items())
        terms += "".join(f"; {t} " + ", ".join(f"{k}={v}" for k, v in o.items()) for t, o in r["options"].items())
        terms += f"; EMA α {r['ema']:g}" if "ema" in r else ""
        length = f"{r['epochs']} epochs" + (f", at most {r['steps']} steps" if r["steps"] else "")
        optimiser = (f"lr {r['lr']:g}, AdamW β ({r['betas'][0]:g}, {r['betas'][1]:g}), ε {r['eps']:g}, "
                     f"wd {r['weight_decay']:g}, {r['warmup']} warm-up steps, {r['schedule']}, "
                     f"clip {r['grad_clip']:g}")
        rows.append(f"| `{name}` | {model} | {terms} | {r['K']} | {r['global_batch']} | {length} | {optimiser} | "
                    f"{r['precision']}, {r['zero']} |")
    return "\n".join(rows) + "\n"


def test_docs_show_the_table():
    assert recipe_markdown() in (ROOT / "docs" / "losses.md").read_text(), (
        "docs/losses.md's recipe table differs from configs/recipes.yaml; paste:\n" + recipe_markdown())
