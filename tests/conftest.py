import json

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: one thread is faster, and far faster on a busy 2-core machine
    (two threads on two shared cores spin against each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    """Runs a test once per device: always on the CPU, and on CUDA where a GPU is present
    (skipped elsewhere, CI included). A test that compares against a reference computes the
    reference on a device it names itself."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device(request.param)


@pytest.fixture
def without_timings():
    """without_timings(folder): a run's result.json and metrics.jsonl minus the fields that hold
    wall-clock times (which must be there), to compare a resumed run with an uninterrupted one."""
    def strip(folder) -> tuple:
        result = json.loads((folder / "result.json").read_text())
        for k in ("train_time_s", "ms_per_step"):
            assert result.pop(k) > 0
        assert result.pop("warmup_s") >= 0
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        for r in result["history"] + records:
            r.pop("ms", None)  # evaluation records have none
        return result, records
    return strip
