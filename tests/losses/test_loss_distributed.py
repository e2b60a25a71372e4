"""Data-parallel gradient contract of ``compclip.losses.terms`` on 2 gloo processes (CPU, float64).

For every term on every rank: the returned value equals the single-process loss (functional API) on the
concatenated batch, the gradient of each local feature equals the matching slice of the single-process gradient,
and the ranks' partial gradients of the shared ``logit_scale`` / ``logit_bias`` sum to the single-process ones.
The CE-CLIP threshold update is checked the same way. One spawn checks everything (spawning costs seconds).
Concepts per rank differ (4 vs 2) so the unequal-size gather path runs too.
"""
import datetime
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import compclip.losses as losses
from compclip import distributed
from compclip.distributed import free_port
from compclip.losses.terms import TERMS, CMRThreshold, Features

WORLD = 2
LOCAL_B, K, D, TOKENS = 3, 3, 6, 4
CONCEPTS_PER_RANK = (4, 2)
GRAD_FIELDS = ("image", "text", "negatives", "tokens", "concepts")
SHARED = ("logit_scale", "logit_bias")


def _batch():
    """The global batch, identical on every rank (fixed seed); concepts ordered by owner, i.e. by rank."""
    generator = torch.Generator().manual_seed(1234)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)

    batch = WORLD * LOCAL_B
    owner = []
    for rank, count in enumerate(CONCEPTS_PER_RANK):
        local = torch.randint(0, LOCAL_B, (count,), generator=generator).sort().values + rank * LOCAL_B
        owner.append(local)
    valid = torch.rand(batch, K, generator=generator) > 0.3
    valid[:, K - 1] = False  # a type without any valid negative in the global batch: θ keeps its previous value
    valid[0, 0] = True
    return {
        "image": unit(batch, D),
        "text": unit(batch, D),
        "negatives": unit(batch, K, D),
        "valid": valid,
        "teacher_image": unit(batch, D),
        "teacher_text": unit(batch, D),
        "teacher_negatives": unit(batch, K, D),
        "tokens": unit(batch, TOKENS, D),
        "concepts": unit(sum(CONCEPTS_PER_RANK), D),
        "owner": torch.cat(owner),
        "logit_scale": torch.tensor(7.0, dtype=torch.float64),
        "logit_bias": torch.tensor(-3.0, dtype=torch.float64),
    }


def _local_rows(rank):
    """Row slice of every batch field held by ``rank``."""
    images = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    start = sum(CONCEPTS_PER_RANK[:rank])
    concepts = slice(start, start + CONCEPTS_PER_RANK[rank])
    return {name: concepts if name in ("concepts", "owner") else images for name in _batch()}


def _leaves(batch, rows=None):
    leaves = {}
    for name, value in batch.items():
        value = value[rows[name]] if rows is not None and value.dim() > 0 else value
        value = value.clone()
        if value.is_floating_point() and (name in GRAD_FIELDS or name in SHARED):
            value.requires_grad_(True)
        leaves[name] = value
    if rows is not None:
        leaves["owner"] = leaves["owner"] - rows["image"].start  # Features.owner is a local image index
    return leaves


def _reference(name, t, threshold):
    """Single-process loss of term ``name`` through the functional API."""
    s, b = t["logit_scale"], t["logit_bias"]
    teacher = (t["teacher_image"], t["teacher_text"], t["teacher_negatives"])
    calls = {
        "clip": lambda: losses.clip_loss(t["image"], t["text"], s),
        "negclip": lambda: losses.negclip_loss(t["image"], t["text"], t["negatives"], s),
        "cmr": lambda: losses.ceclip_cmr_loss(t["image"], t["text"], t["negatives"], t["valid"], s, threshold),
        "imc": lambda: losses.ceclip_imc_loss(t["image"], t["text"], t["negatives"], s),
        "imc_released": lambda: losses.ceclip_imc_loss(t["image"], t["text"], t["negatives"], s, variant="released"),
        "igc": lambda: losses.degla_igc_loss(t["image"], t["text"], t["negatives"], s),
        "tgc": lambda: losses.degla_tgc_loss(t["text"], t["teacher_text"], t["negatives"], 10.0),
        "tgc_released": lambda: losses.degla_tgc_loss(t["text"], t["teacher_text"], t["negatives"], 7.5,
                                                      variant="released"),
        "distill": lambda: losses.degla_distill_loss(t["image"], t["text"], t["negatives"], *teacher),
        "siglip": lambda: losses.siglip_loss(t["image"], t["text"], s, b),
        "npc": lambda: losses.c2lip_npc_loss(t["image"], t["concepts"], t["owner"], s, b),
        "xac": lambda: losses.c2lip_xac_loss(t["tokens"], t["concepts"], t["owner"], s, b, 0.5),
    }
    return calls[name]()


def _cases(threshold):
    """(case, term name, options) for every term and variant."""
    return [
        ("clip", "clip", {}),
        ("negclip", "negclip", {}),
        ("cmr", "cmr", {"threshold": threshold}),
        ("imc", "imc", {}),
        ("imc_released", "imc", {"variant": "released"}),
        ("igc", "igc", {}),
        ("tgc", "tgc", {}),
        ("tgc_released", "tgc", {"variant": "released", "scale": 7.5}),
        ("distill", "distill", {}),
        ("siglip", "siglip", {}),
        ("npc", "npc", {}),
        ("xac", "xac", {"temperature": 0.5}),
    ]


def _worker(rank, port, failures_path):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    failures = []

    def check(what, actual, expected):
        try:
            torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11)
        except AssertionError as error:
            failures.append(f"rank {rank} {what}: {error}")

    try:
        assert distributed.get_world_size() == WORLD and distributed.get_rank() == rank
        rows = _local_rows(rank)
        check("global_row_offset", torch.tensor(distributed.global_row_offset(LOCAL_B)), torch.tensor(rank * LOCAL_B))
        flags = torch.tensor([True, False][: rank + 1])  # unequal sizes, a dtype gloo cannot gather as is
        check("all_gather_no_grad", distributed.all_gather_no_grad(flags), torch.tensor([True, True, False]))

        # CE-CLIP threshold: global-batch statistics, clamp, previous value kept for the all-invalid type.
        batch = _batch()
        previous = torch.tensor([0.5, 0.25, 1.5], dtype=torch.float64)
        expected_theta = losses.ceclip_threshold(batch["image"], batch["text"], batch["negatives"], batch["valid"],
                                                 batch["logit_scale"], upper=2.0, previous=previous)
        threshold = CMRThreshold(K, upper=2.0)
        threshold.load_state_dict({"value": previous})
        local = _leaves(batch, rows)
        threshold.update(Features(**{k: v for k, v in local.items()}))
        check("CMRThreshold.update", threshold.value, expected_theta)
        check("CMRThreshold keeps previous", threshold.value[K - 1], previous[K - 1])

        for case, term, options in _cases(threshold):
            full = _leaves(batch)
            expected = _reference(case, full, threshold.value)
            expected.backward()
            local = _leaves(batch, rows)
            loss = TERMS[term](Features(**local), **options)
            loss.backward()
            check(f"{case} value", loss.detach(), expected.detach())
            for field in GRAD_FIELDS:
                want = full[field].grad
                want = torch.zeros_like(full[field]) if want is None else want[rows[field]]
                got = local[field].grad
                check(f"{case} grad {field}", torch.zeros_like(want) if got is None else got, want)
            for field in SHARED:
                got = local[field].grad
                got = torch.zeros_like(local[field]) if got is None else got.clone()
                dist.all_reduce(got)  # each rank holds its partial gradient of the shared scalar
                want = full[field].grad
                check(f"{case} grad {field} (summed over ranks)", got,
                      torch.zeros_like(got) if want is None else want)
    finally:
        dist.destroy_process_group()
    if failures:
        with open(f"{failures_path}.{rank}", "w") as handle:
            handle.write("\n".join(failures))


def test_terms_match_single_process_on_two_ranks(tmp_path):
    failures_path = str(tmp_path / "failures")
    mp.start_processes(_worker, args=(free_port(), failures_path), nprocs=WORLD, start_method="spawn")
    reports = [open(os.path.join(tmp_path, name)).read() for name in sorted(os.listdir(tmp_path))]
    assert not reports, "\n".join(reports)


def test_single_process_helpers_without_process_group():
    assert distributed.get_world_size() == 1 and distributed.get_rank() == 0
    assert distributed.gather_sizes(5) == [5] and distributed.global_row_offset(5) == 0
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.all_gather_with_grad(x) is x
    assert distributed.sum_across_ranks(x) is x
    gathered = distributed.all_gather_no_grad(x)
    assert not gathered.requires_grad and torch.equal(gathered, x)
