"""lab/utils.py: safetensors by hand against the reference library, atomic writes, checkpoints, run_script."""
import dataclasses
import json
import math
import os
import pickle
import re
import struct
import tracemalloc
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import safetensors
import safetensors.torch  # the reference (requirements-test.txt)
import torch

from lab import utils
from train_toy import get_lr, parse_args
from train_vit import check_finite, method_name
from lab.utils import (TrainLog, atomic_save, atomic_write_text, finished_run, load_checkpoint,
                   load_weights, read_safetensors, read_safetensors_metadata,
                   save_checkpoint, save_result, seed_table, truncate_jsonl, write_safetensors)

TENSORS = {"a.weight": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
           "half": torch.randn(5).to(torch.bfloat16), "flag": torch.tensor([True, False]),
           "empty": torch.zeros(0, 2), "bn.num_batches_tracked": torch.tensor(7),  # 0-d, as in BatchNorm
           "f8": torch.randn(4).to(torch.float8_e4m3fn),
           "u16": torch.arange(3, dtype=torch.int16).view(torch.uint16),
           "c": torch.randn(2, dtype=torch.complex64), "t": torch.randn(3, 2).t()}  # not contiguous


def _bits(t):
    """The raw bytes: compares every dtype (float8 has no torch.equal) and NaN payloads exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_safetensors_round_trip_with_the_reference_library(tmp_path):
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(TENSORS, ours, metadata={"format": "pt", "r": 4})
    safetensors.torch.save_file({k: t.contiguous() for k, t in TENSORS.items()}, str(theirs),
                                metadata={"format": "pt"})
    for name, loaded in (("ours read by the library", safetensors.torch.load_file(str(ours))),
                         ("the library's read by ours", read_safetensors(theirs))):
        assert loaded.keys() == TENSORS.keys(), name
        for k, t in TENSORS.items():
            assert loaded[k].dtype == t.dtype and loaded[k].shape == t.shape, (name, k)
            assert torch.equal(_bits(loaded[k]), _bits(t)), (name, k)
    with safetensors.safe_open(str(ours), "pt") as f:
        assert f.metadata() == read_safetensors_metadata(ours) == {"format": "pt", "r": "4"}
    assert read_safetensors_metadata(theirs) == {"format": "pt"}


def _file(header, data=b"", length=None):
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head) if length is None else length) + head + data


def _f32(shape, offsets):
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets}


DAMAGED = {  # name: (file, what our error says)
    "empty file": (b"", "0 bytes"),
    "shorter than the length": (b"\x10\x00\x00", "3 bytes"),
    "header length 2**63": (_file({"a": _f32([1], [0, 4])}, bytes(4), length=2**63), "larger than the file"),
    "header length past the end": (_file({"a": _f32([1], [0, 4])}, bytes(4), length=100),
                                   "larger than the file"),
    "not JSON": (_file(b"not json at all!"), "not JSON"),
    "not UTF-8": (_file(b'{"\xff": 1}'), "not JSON"),
    "a list header": (_file([1, 2]), "not a JSON object"),
    "an entry not an object": (_file({"a": [0, 4]}, bytes(4)), "not an object with dtype"),
    "an entry without offsets": (_file({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)),
                                 "not an object with dtype"),
    "unknown dtype": (_file({"a": {**_f32([1], [0, 4]), "dtype": "F31"}}, bytes(4)), "unknown dtype"),
    "shape -1": (_file({"a": _f32([-1], [0, 4])}, bytes(4)), "shape"),
    "shape not integers": (_file({"a": _f32([1.0], [0, 4])}, bytes(4)), "shape"),
    "negative offset": (_file({"a": _f32([1], [-4, 0])}, bytes(4)), "data_offsets"),
    "end before start": (_file({"a": _f32([0], [4, 0])}, bytes(4)), "data_offsets"),
    "offsets past the end": (_file({"a": _f32([2], [0, 8])}, bytes(4)), "the file holds 4"),
    "bytes after the last tensor": (_file({"a": _f32([1], [0, 4])}, bytes(8)), "the file holds 8"),
    "overlapping offsets": (_file({"a": _f32([2], [0, 8]), "b": _f32([2], [4, 12])}, bytes(12)), "overlap"),
    "a gap": (_file({"a": _f32([1], [0, 4]), "b": _f32([1], [8, 12])}, bytes(12)), "a gap"),
    "size not shape times dtype": (_file({"a": _f32([3], [0, 8])}, bytes(8)), "needs 12"),
    "metadata not strings": (_file({"__metadata__": {"r": 4}, "a": _f32([1], [0, 4])}, bytes(4)),
                             "__metadata__"),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_safetensors_file_is_rejected_as_the_library_rejects_it(tmp_path, case):
    data, says = DAMAGED[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(safetensors.SafetensorError):  # the reference refuses the file too
        safetensors.torch.load_file(str(path))
    for read in (read_safetensors, read_safetensors_metadata):
        with pytest.raises(ValueError, match="bad.safetensors is not a valid safetensors file") as e:
            read(path)
        assert says in str(e.value)


def test_duplicate_names_in_a_safetensors_header_are_rejected(tmp_path):
    """The library keeps one of the two silently; which tensor a name means must not be a guess."""
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    path = tmp_path / "dup.safetensors"
    path.write_bytes(_file(f'{{"a": {entry}, "a": {entry}}}'.encode(), bytes(4)))
    with pytest.raises(ValueError, match="repeats the key 'a'"):
        read_safetensors(path)


@pytest.mark.parametrize("case", ["tensors out of order", "empty tensors share an offset", "null metadata",
                                  "an extra field", "0-d"])
def test_unusual_valid_safetensors_files_load_as_the_library_loads_them(tmp_path, case):
    data = torch.arange(8, dtype=torch.float32).numpy().tobytes()
    header = {"tensors out of order": {"b": _f32([4], [16, 32]), "a": _f32([2, 2], [0, 16])},
              "empty tensors share an offset": {"e": _f32([0, 3], [0, 0]), "a": _f32([8], [0, 32]),
                                                "z": _f32([0], [32, 32])},
              "null metadata": {"__metadata__": None, "a": _f32([8], [0, 32])},
              "an extra field": {"a": {**_f32([8], [0, 32]), "note": 1}},
              "0-d": {"a": _f32([], [0, 4]), "b": _f32([7], [4, 32])}}[case]
    path = tmp_path / "x.safetensors"
    path.write_bytes(_file(header, data))
    theirs, ours = safetensors.torch.load_file(str(path)), read_safetensors(path)
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


def test_reading_safetensors_takes_no_more_memory_than_the_file(tmp_path):
    path = tmp_path / "big.safetensors"
    write_safetensors({f"w{i}": torch.randn(256, 1024) for i in range(8)}, path)  # 8 MiB
    tracemalloc.start()
    try:
        state = read_safetensors(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(state) == 8
    assert peak < 1.1 * path.stat().st_size  # the tensors themselves, no second copy of the file


def test_atomic_writes_leave_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left
    atomic_write_text(tmp_path / "r.json", '{"acc": 0.5}')
    assert (tmp_path / "r.json").read_text() == '{"acc": 0.5}'


def test_atomic_writes_leave_other_processes_temporary_files_alone(tmp_path):
    """Processes sharing a folder: another's write in flight (its .tmp file) survives this one's writes of
    the same file, and both writers' files are whole."""
    (tmp_path / "ckpt.pt.x1y2.tmp").write_bytes(b"another process's write, in flight")
    for step in range(3):
        atomic_save({"step": step}, tmp_path / "ckpt.pt")
        atomic_write_text(tmp_path / "r.json", f'{{"step": {step}}}')
    assert (tmp_path / "ckpt.pt.x1y2.tmp").read_bytes() == b"another process's write, in flight"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "ckpt.pt.x1y2.tmp", "r.json"]
    assert torch.load(tmp_path / "ckpt.pt") == {"step": 2} and json.loads((tmp_path / "r.json").read_text()) == {"step": 2}


@dataclass
class Demo:
    steps: int = 10  # optimizer steps
    lr: float = 1e-3  # peak learning rate
    name: str = "x"  # the run's name
    coto: bool = True  # stage 1 lasts 75 % of the steps
    # a comment of its own, about nothing
    seeds: int = 2  # runs, one per seed

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")


def run_demo(monkeypatch, argv, main=lambda cfg: None):
    """run_script(main, Demo, ...) as `python demo.py *argv` runs it."""
    monkeypatch.setattr("sys.argv", ["demo.py", *argv])
    utils.run_script(main, Demo, "A demo.", "demo.py", interrupted="run it again", example="python demo.py --steps 3")


def test_run_script_builds_every_field_type_with_the_classrooms_flags(monkeypatch):
    """The lab's scripts take their flags from train_toy.parse_args: ints, floats, strings, --x / --no-x."""
    seen = []
    run_demo(monkeypatch, [], seen.append)
    run_demo(monkeypatch, ["--steps", "3", "--lr", "2", "--name", "y", "--no-coto"], seen.append)
    assert seen == [Demo(), Demo(steps=3, lr=2.0, name="y", coto=False)] and isinstance(seen[1].lr, float)


def test_run_script_help_shows_each_fields_comment_and_default(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        run_demo(monkeypatch, ["--help"])
    out = capsys.readouterr().out
    text = " ".join(out.split())  # undo argparse's line wrapping
    for line in ("A demo.", "--steps STEPS optimizer steps (default: 10)", "--lr LR peak learning rate (default: 0.001)",
                 "--coto, --no-coto stage 1 lasts 75 % of the steps (default: True)"):
        assert line in text, (line, text)
    assert e.value.code == 0 and "about nothing" not in text and text.count("(default:") == 5  # once per field
    assert_every_flag_explained(out, Demo)


def option_helps(text: str) -> dict:
    """{flag: its help, unwrapped, without "(default: ...)"} from argparse's --help output."""
    helps, flag = {}, None
    for line in text.split("\noptions:\n")[1].split("\n\nexample")[0].splitlines():
        if line.startswith("  -"):  # the flag, then its help on the same line or the next ones
            invocation, _, rest = line.strip().partition("  ")
            flag = invocation.split()[0].rstrip(",")
            helps[flag] = rest.strip()
        elif flag:
            helps[flag] += " " + line.strip()
    return {k: re.sub(r"\s*\(default: .*\)$", "", v.strip()) for k, v in helps.items()}


def assert_every_flag_explained(text: str, cls) -> None:
    """Every field of cls is a flag whose --help says more than the flag's own name; the text ends with an example."""
    helps = option_helps(text)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        words = helps[flag].lower().split()
        assert len(words) > len(f.name.split("_")) and words != f.name.split("_"), (flag, helps[flag])
    assert text.rstrip().splitlines()[-2:][0] == "example:" and "python" in text.rstrip().splitlines()[-1]


def test_help_of_a_subclass_explains_the_inherited_flags(capsys):
    """A Config extending another (lab.vit_runs' of train_vit's) shows the base's comments as help."""
    @dataclass
    class More(Demo):
        rounds: int = 2  # rounds of the demo
        steps: int = 20  # optimizer steps, overridden

    with pytest.raises(SystemExit):
        parse_args(More, "A demo.", "python demo.py --rounds 3", ["--help"])
    helps = option_helps(capsys.readouterr().out)
    assert helps["--coto"] == "stage 1 lasts 75 % of the steps" and helps["--rounds"] == "rounds of the demo"
    assert helps["--steps"] == "optimizer steps, overridden"


@pytest.mark.parametrize("argv, says", [(["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
                                        (["--steps", "0"], "steps=0 must be >= 1"),
                                        (["--stpes", "3"], "unrecognized arguments: --stpes 3"),
                                        (["--seed", "3"], "unrecognized arguments: --seed 3")])  # not --seeds
def test_a_bad_flag_is_one_line_not_a_traceback(monkeypatch, capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        run_demo(monkeypatch, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("error: " + says) and len(err) == 2  # the one-line usage, then the error


@pytest.mark.parametrize("raised, says", [(ValueError("--x 1: too big"), "demo.py: error: --x 1: too big"),
                                          (FileNotFoundError("no data"), "demo.py: error: no data"),
                                          (KeyboardInterrupt(), "\ninterrupted: run it again")])
def test_what_main_raises_is_one_line_that_says_what_to_do(monkeypatch, raised, says):
    def main(cfg):
        raise raised
    with pytest.raises(SystemExit) as e:
        run_demo(monkeypatch, [], main)
    assert e.value.code == says


CONFIG = {"r": 2, "alpha": 4.0, "lr": 0.01, "tasks": ("rot90", "flip")}


def _train_setup():
    torch.manual_seed(0)  # the same base model, as a resumed run rebuilds it
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # a frozen base weight: not in the checkpoint
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    return model, opt


def _train_step(model, opt):
    x = torch.randn(5, 4)  # drawn from the global generator: a resumed run must draw the same
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_checkpoint_resume_continues_bit_identically(tmp_path):
    model, opt = _train_setup()
    _train_step(model, opt)
    extra = {"history": [{"step": 1, "loss": 0.5}], "elapsed": 1.5, "active": torch.tensor([3, 1])}
    save_checkpoint(tmp_path / "ckpt.pt", model, opt, 1, {"epoch": 0, "pos": 5}, config=CONFIG, extra=extra)
    _train_step(model, opt)  # the uninterrupted run

    resumed, opt2 = _train_setup()
    with torch.no_grad():  # other trainable weights and RNG state: the checkpoint must restore both
        resumed[1].weight.add_(1.0)
    torch.manual_seed(1)
    step, data, extra2 = load_checkpoint(tmp_path / "ckpt.pt", resumed, opt2, config=dict(CONFIG))
    assert (step, data) == (1, {"epoch": 0, "pos": 5})
    assert extra2["history"] == extra["history"] and extra2["elapsed"] == 1.5
    assert torch.equal(extra2["active"], extra["active"])
    _train_step(resumed, opt2)
    for (n, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_checkpoint_of_another_configuration_lists_every_difference(tmp_path):
    model, opt = _train_setup()
    save_checkpoint(tmp_path / "ckpt.pt", model, opt, 3, None, config=CONFIG)
    before = [p.clone() for p in model.parameters()]
    other = {"r": 8, "alpha": 4.0, "lr": 0.1, "tasks": ("rot90", "flip"), "p0": 0.5}
    with pytest.raises(ValueError) as e:
        load_checkpoint(tmp_path / "ckpt.pt", model, opt, config=other)
    msg = str(e.value)
    for text in ("r: 2 in the checkpoint, 8 now", "lr: 0.01 in the checkpoint, 0.1 now",
                 "p0: '(absent)' in the checkpoint, 0.5 now", "same flags", "--resume", "ckpt.pt"):
        assert text in msg, (text, msg)
    assert "alpha" not in msg and "tasks" not in msg  # only the fields that differ
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    bigger = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 5))  # all trainable, wider
    with pytest.raises(ValueError, match=r"differ in name or shape: 0\.weight, 1\.bias, 1\.weight\)"):
        load_checkpoint(tmp_path / "ckpt.pt", bigger, torch.optim.AdamW(bigger.parameters()), config=CONFIG)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "a list", "a pickle"])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    path = tmp_path / "ckpt.pt"
    model, opt = _train_setup()
    save_checkpoint(path, model, opt, 3, None, config=CONFIG)
    good = path.read_bytes()
    if damage == "a list":
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes({"empty": b"", "truncated": good[:len(good) // 2], "garbage": os.urandom(len(good)),
                          "a pickle": pickle.dumps(ValueError("x"))}[damage])
    with pytest.raises(ValueError) as e:
        load_checkpoint(path, model, opt, config=CONFIG)
    msg = str(e.value)
    assert str(path) in msg and "delete" in msg and "--resume" in msg
    assert "weights_only" not in msg


class _Payload:
    def __reduce__(self):  # unpickling this would create a file: code from the weights file runs
        return (open, (self.marker, "w"))


def test_weights_file_with_python_objects_is_refused_without_running_them(tmp_path):
    payload = _Payload()
    payload.marker = str(tmp_path / "ran")
    path = tmp_path / "w.pt"
    path.write_bytes(pickle.dumps({"w": payload}))
    with pytest.raises(ValueError) as e:
        load_weights(path)
    assert "w.pt is damaged or not a file of tensors" in str(e.value) and "weights_only" not in str(e.value)
    assert not (tmp_path / "ran").exists()
    torch.save({"model": {"w": torch.ones(2)}}, path)  # the usual nesting still loads
    assert torch.equal(load_weights(path)["w"], torch.ones(2))


def test_truncate_jsonl_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"event": "start"}] + [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')  # killed mid-line
    truncate_jsonl(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3]
    truncate_jsonl(tmp_path / "none.jsonl", 2)  # no log yet: nothing to do
    assert not (tmp_path / "none.jsonl").exists()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path, umask):
    before = os.umask(umask)
    try:
        (tmp_path / "plain.txt").write_text("x")  # the reference: what open() gives
        atomic_write_text(tmp_path / "r.json", "{}")
        atomic_save({"step": 1}, tmp_path / "ckpt.pt")
        write_safetensors({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    finally:
        os.umask(before)
    want = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert want == 0o666 & ~umask
    for name in ("r.json", "ckpt.pt", "a.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name


def test_lr_schedule_formula():
    assert get_lr(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert get_lr(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert get_lr(55, 100, 1.0, 10) == pytest.approx(0.5)  # halfway through the cosine
    assert get_lr(100, 100, 1.0, 10) == pytest.approx(0.0)
    for t in range(0, 80, 7):  # no warmup: the plain cosine from lr to 0
        assert get_lr(t, 80, 3e-3, 0) == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * t / 80)))


def test_method_names_are_one_rule():
    assert [method_name(SimpleNamespace(variant=v, coto=c)) for v in ("lora", "dora", "hira") for c in (False, True)] == [
        "lora", "coto", "dora", "dora-coto", "hira", "hira-coto"]


def test_check_finite_stops_at_a_nan_gradient_behind_a_finite_loss():
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.tensor([1.0, float("nan"), 0.0])
    check_finite(torch.tensor(0.5), [torch.nn.Parameter(torch.ones(1))], 1, 0.1, "x")  # no grad: fine
    with pytest.raises(FloatingPointError, match=r"^rot90 coto s0: at step 7 the loss is 0.5 and the gradient "
                                                 r"norm nan: training diverged\. Rerun with a lower learning rate .*peak: 0.1\)"):
        check_finite(torch.tensor(0.5), [w], 7, 0.1, "rot90 coto s0")


class FakeCoTo:
    def __init__(self, mask):
        self.mask, self.p = torch.tensor(mask), 0.5


def test_train_log_lines_records_and_warm_up_apart(tmp_path, monkeypatch, capsys):
    """Step times 300 (compiling), 2, 1, 2, 4, 2 ms: the 300 is warm-up (over 5x the median), ms/step
    the mean of the others; log lines and records hold the interval means; a resumed log reports the same."""
    clock = iter([0.0, 0.300, 0.302, 0.303, 0.305, 0.309, 0.311])
    monkeypatch.setattr(utils, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    log = TrainLog("t", total_steps=6, log_every=4, path=tmp_path / "m.jsonl")
    losses = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    for step, loss in enumerate(losses, 1):
        log.step(step, 0.1, FakeCoTo([True, False]) if step <= 4 else FakeCoTo([True, True]), loss=loss)
    out = capsys.readouterr().out.splitlines()
    assert out == ["t | step 4 | loss 4.500 | p 0.50 | active 1/2 | 76 ms | eta 0:00:00",
                   "t | step 6 | loss 1.500 | p 0.50 | active 2/2 | 3 ms | eta 0:00:00"]
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert records == log.state["history"]
    assert records[0] == {"tag": "t", "step": 4, "loss": 4.5, "ms": pytest.approx(305 / 4), "lr": 0.1, "p": 0.5}
    s = log.summary()
    assert s["warmup_s"] == pytest.approx(0.300) and s["train_time_s"] == pytest.approx(0.311)
    assert s["ms_per_step"] == pytest.approx((2 + 1 + 2 + 4 + 2) / 5)  # the compiling step excluded
    assert s["active_frac"] == pytest.approx((4 * 0.5 + 2 * 1.0) / 6)
    monkeypatch.undo()
    resumed = TrainLog("t", 6, 4)
    resumed.state = json.loads(json.dumps(log.state))  # what a checkpoint holds
    assert resumed.summary() == s


def test_seed_table_against_hand_computed_statistics():
    runs = [{"task": t, "method": m, "seed": s, "acc": a} for t, m, s, a in [
        ("a", "lora", 0, 0.80), ("a", "lora", 1, 0.84), ("a", "lora", 2, 0.83),
        ("a", "coto", 0, 0.81), ("a", "coto", 1, 0.82), ("a", "coto", 2, 0.86),
        ("b", "lora", 0, 0.70), ("b", "lora", 1, 0.72), ("b", "lora", 2, 0.71),
        ("b", "coto", 0, 0.69), ("b", "coto", 1, 0.75), ("b", "coto", 2, 0.70)]]

    def ms(v):  # mean and sample standard deviation (n - 1), by the formula
        m = sum(v) / len(v)
        return f"{m:.1f} ± {math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)):.1f}"

    table = seed_table("acc", runs, "task", {"a": 77.0, "b": 60.0}, "probe", lambda r: 100 * r["acc"]).splitlines()
    assert table[:2] == ["acc, seeds 0, 1, 2: mean ± std", "| task | probe | lora | coto | coto - lora per seed |"]
    assert table[3] == f"| a | 77.0 | {ms([80, 84, 83])} | {ms([81, 82, 86])} | 1.0 -2.0 3.0 |"
    assert table[4] == f"| b | 60.0 | {ms([70, 72, 71])} | {ms([69, 75, 70])} | -1.0 3.0 -1.0 |"
    assert table[5] == f"| mean | 68.5 | {ms([75, 78, 77])} | {ms([75, 78.5, 78])} | 0.0 0.5 1.0 |"
    one = seed_table("acc", [r for r in runs if r["seed"] == 0 and r["method"] == "lora"], "task",
                     {"a": 1.0, "b": 2.0}, "probe", lambda r: 100 * r["acc"]).splitlines()
    assert one[:2] == ["acc, seed 0", "| task | probe | lora |"] and one[3] == "| a | 1.0 | 80.0 |"  # no ±


def test_finished_runs_are_kept_only_with_their_configuration(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    assert finished_run(tmp_path, {"r": 2}) is None
    save_result(tmp_path, {"acc": 0.5}, {"r": 2, "resume": True, "log_every": 5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # finished: no checkpoint
    assert json.loads((tmp_path / "result.json").read_text()) == {"acc": 0.5, "config": {"r": 2, "log_every": 5}}
    assert finished_run(tmp_path, {"r": 2}, not_in_result=("log_every",))["acc"] == 0.5
    with pytest.raises(ValueError, match=r"another configuration \(log_every: 5 then, '\(absent\)' now; r: 2 then, "
                                         r"4 now\)\. Rerun with its flags"):
        finished_run(tmp_path, {"r": 4})
    (tmp_path / "result.json").write_text("{")
    with pytest.raises(ValueError, match=r"result\.json is damaged; delete it"):
        finished_run(tmp_path, {"r": 2})


def test_a_locked_run_folder_stops_a_second_writer_in_one_line(tmp_path):
    held = utils.lock_folder(tmp_path / "run")
    with pytest.raises(ValueError, match=r"run is in use by another process: wait for it, or use another --out-dir"):
        utils.lock_folder(tmp_path / "run")
    with pytest.raises(ValueError, match="in use by another process"):  # train_gpt2's runs start through resume()
        utils.resume(tmp_path / "run", False, None, None, None, None, {}, utils.TrainLog("x", 1, 0))
    held.close()
    log = utils.TrainLog("x", 1, 0)
    assert utils.resume(tmp_path / "run", False, None, None, None, None, {}, log) == 0 and log.lock is not None
