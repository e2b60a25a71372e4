"""Test-wide setup. Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on
before any kernel module is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture
def one_process(monkeypatch):
    """A world of one for in-process DeepSpeed runs, created once per test process and kept: DeepSpeed caches
    groups derived from the default group, so it must outlive every engine built on it."""
    from compclip.distributed import free_port
    from compclip.trainer.engine import init_process_group

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)  # DeepSpeed reads them at every initialize
    if not torch.distributed.is_initialized():
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        init_process_group()
    yield


class Fuzz:
    """What the fuzz tests (tests/test_config_fuzz.py, tests/trainer/test_checkpoint_fuzz.py) share: Hypothesis
    settings with a fixed seed and a bounded number of cases (`COMPCLIP_FUZZ_CASES=N` per test for a longer run), a
    time bound per case, and the count of cases and outcomes per reader. With `COMPCLIP_FUZZ_RECORD=<file.json>`
    the counts are merged into that file at the end of the session (under a lock: xdist workers share it)."""

    def __init__(self):
        self.cases = int(os.environ.get("COMPCLIP_FUZZ_CASES", "0"))
        self.counts = {}

    def settings(self, ci_cases: int):
        from hypothesis import HealthCheck, Phase, settings

        # No explain phase: it traces every line, which makes a case many times slower and the time bound flaky.
        return settings(max_examples=self.cases or ci_cases, derandomize=True, database=None, deadline=None,
                        suppress_health_check=list(HealthCheck), print_blob=True,
                        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])

    def bound(self, seconds: float = 10.0):
        """A context manager that raises TimeoutError when its block runs longer than `seconds` (a hang)."""
        import contextlib
        import signal

        @contextlib.contextmanager
        def bounded():
            def expired(signum, frame):
                raise TimeoutError(f"a fuzz case ran longer than {seconds}s")

            previous = signal.signal(signal.SIGALRM, expired)
            signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                yield
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        return bounded()

    def record(self, reader: str, outcome: str) -> None:
        per_reader = self.counts.setdefault(reader, {})
        per_reader[outcome] = per_reader.get(outcome, 0) + 1

    def write(self, path: str) -> None:
        import fcntl
        import json

        with open(path, "a+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            text = handle.read()
            merged = json.loads(text) if text.strip() else {"readers": {}}
            for reader, outcomes in self.counts.items():
                target = merged["readers"].setdefault(reader, {})
                for outcome, count in outcomes.items():
                    target[outcome] = target.get(outcome, 0) + count
            for outcomes in merged["readers"].values():
                outcomes["cases"] = sum(v for k, v in outcomes.items() if k != "cases")
            handle.seek(0), handle.truncate()
            handle.write(json.dumps(merged, indent=1, sort_keys=True) + "\n")


@pytest.fixture(scope="session")
def fuzz():
    state = Fuzz()
    yield state
    if os.environ.get("COMPCLIP_FUZZ_RECORD"):
        state.write(os.environ["COMPCLIP_FUZZ_RECORD"])
