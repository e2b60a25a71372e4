"""Restricted unpickling of the published pickle formats and weights_only-safe RNG states.

Malicious files carry objects whose `__reduce__` would create a file (`os.system("touch ...")`, `exec(...)`);
loading them must raise an error that names the file and the refused global, and the file must not appear.
Legitimate payloads (numpy arrays, dtypes, scalars, builtins containers, every pickle protocol, numpy 1.x's
`numpy.core` names) must load equal to `pickle.loads` / `np.load`."""
import os
import pickle
import random

import numpy as np
import pytest
import torch

from compclip.data.importers import import_c2lip, import_ceclip
from compclip.safe_pickle import (SafeUnpickler, UnsafePickleError, load_npy, load_pickle, rng_state_from_safe,
                                  rng_state_to_safe)


class _Touch:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


class _Exec:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return exec, (f"open({self.target!r}, 'w').write('pwned')",)


def _sample(payload):
    return {"image_path": "a.jpg", "caption": "a dog", "nounphrases": ["a dog"], "relation_aug_caption": payload}


@pytest.mark.parametrize("payload, refused", [(_Touch, f"{os.system.__module__}.system"), (_Exec, "builtins.exec")])
def test_c2lip_malicious_pickle_is_refused(tmp_path, payload, refused):
    target = tmp_path / "written"
    path = tmp_path / "train.pkl"
    path.write_bytes(pickle.dumps([_sample(payload(target))]))
    with pytest.raises(UnsafePickleError) as error:
        import_c2lip(str(path))
    assert str(path) in str(error.value) and refused in str(error.value)
    assert not target.exists()


@pytest.mark.parametrize("payload, refused", [(_Touch, f"{os.system.__module__}.system"), (_Exec, "builtins.exec")])
def test_ceclip_malicious_npy_is_refused(tmp_path, payload, refused):
    target = tmp_path / "written"
    path = tmp_path / "train.npy"
    np.save(path, np.array([_sample(payload(target))], dtype=object), allow_pickle=True)
    with pytest.raises(UnsafePickleError) as error:
        import_ceclip(str(path))
    assert str(path) in str(error.value) and refused in str(error.value)
    assert not target.exists()
    with pytest.raises(UnsafePickleError):  # and the bare loader, for a 0-d object array too
        np.save(path, np.array(_sample(payload(target)), dtype=object), allow_pickle=True)
        load_npy(str(path))
    assert not target.exists()


def _same(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and all(
            _same(x, y) for x, y in zip(a.ravel().tolist(), b.ravel().tolist()))
    if isinstance(a, dict):
        return type(a) is type(b) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


_LEGIT = {"f": np.arange(6, dtype=np.float32).reshape(2, 3), "fortran": np.asfortranarray(np.ones((2, 3))),
          "scalar": np.int64(3), "f16": np.float16(0.5), "dtype": np.dtype("<U4"), "strings": np.array(["a", "bc"]),
          "object": np.array([{"caption": "x"}, ["y"]], dtype=object), "set": {1, 2}, "frozen": frozenset("ab"),
          "complex": 1 + 2j, "bytes": b"xy", "bytearray": bytearray(b"z"), "tuple": (1, None, 2.5, True)}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_legitimate_payloads_load_under_every_protocol(tmp_path, protocol):
    data = pickle.dumps(_LEGIT, protocol=protocol)
    path = tmp_path / "ok.pkl"
    path.write_bytes(data)
    assert _same(load_pickle(str(path)), pickle.loads(data))


def test_numpy_1_core_names_are_accepted():
    data = pickle.dumps(_LEGIT, protocol=2)  # GLOBAL opcodes are text: rename to what numpy 1.x wrote
    assert b"numpy._core.multiarray" in data
    old = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    import io

    assert _same(SafeUnpickler(io.BytesIO(old)).load(), pickle.loads(data))


@pytest.mark.parametrize("array", [np.arange(12, dtype=np.int16).reshape(3, 4),
                                   np.asfortranarray(np.linspace(0, 1, 6).reshape(2, 3)),
                                   np.array([{"caption": "x", "valid_caption": [True, False]}], dtype=object),
                                   np.array({"caption": "x"}, dtype=object)])
def test_load_npy_matches_numpy(tmp_path, array):
    path = tmp_path / "a.npy"
    np.save(path, array, allow_pickle=True)
    got, want = load_npy(str(path)), np.load(path, allow_pickle=True)
    assert _same(got, want) and got.flags.f_contiguous == want.flags.f_contiguous


def test_rng_states_round_trip_through_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn(1)  # leave cached Gaussians in both states
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    want = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist())
    path = tmp_path / "extras.pt"
    torch.save({"rng": rng_state_to_safe(state), "data": {"epoch": 1, "consumed": [3, 4]}}, path)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    loaded = rng_state_from_safe(torch.load(path, map_location="cpu", weights_only=True)["rng"])
    random.setstate(loaded["python"])
    np.random.set_state(loaded["numpy"])
    torch.set_rng_state(loaded["torch"])
    got = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist())
    assert got == want
    with pytest.raises(pickle.UnpicklingError):  # the raw numpy state is what weights_only refuses
        torch.save({"rng": state}, path)
        torch.load(path, weights_only=True)


def test_checkpoint_extras_with_safe_rng_load_weights_only(tmp_path):
    """What the trainer's `compclip_rank{r}.pt` holds (RNG, CE-CLIP threshold, EMA teacher, data position, counters)
    loads with `weights_only=True` once the RNG goes through `rng_state_to_safe`."""
    from compclip.trainer.ema import EMATeacher
    from compclip.losses import CMRThreshold

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))

    teacher = EMATeacher(build(), build, 0.9)
    teacher.update()
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "cuda": [torch.get_rng_state()]}  # stand-in for torch.cuda.get_rng_state_all(): a list of ByteTensors
    extras = {"rng": rng_state_to_safe(state), "method": {"name": "ceclip", "weights": {"negclip": 1.0, "cmr": 0.2},
                                                            "threshold": CMRThreshold(4).state_dict()},
              "nonfinite": 0, "teacher": teacher.state_dict(), "epoch": 1, "micro_in_epoch": 3, "global_step": 7,
              "data": {"epoch": 1, "batch": 3, "skipped": 0, "consumed": [12, 12]}}
    path = tmp_path / "compclip_rank0.pt"
    torch.save(extras, path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["teacher"]["shapes"] == extras["teacher"]["shapes"]
    assert all(torch.equal(a, b) for a, b in zip(loaded["teacher"]["storage"], extras["teacher"]["storage"]))
    assert torch.equal(loaded["method"]["threshold"]["value"], extras["method"]["threshold"]["value"])
    restored = rng_state_from_safe(loaded["rng"])
    assert restored["python"] == state["python"] and torch.equal(restored["cuda"][0], state["cuda"][0])
    assert all(_same(a, b) for a, b in zip(restored["numpy"], state["numpy"]))
