"""utils.py: safetensors by hand against the reference library, atomic writes, the CLI builder."""
from dataclasses import dataclass

import pytest
import safetensors.torch  # installed with transformers (requirements-test.txt): the reference
import torch

from utils import atomic_save, atomic_write_text, parse_config, read_safetensors, write_safetensors

TENSORS = {"a.weight": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64).reshape(2, 3),
           "half": torch.randn(5).to(torch.bfloat16), "flag": torch.tensor([True, False]),
           "empty": torch.zeros(0, 2)}


def test_safetensors_round_trip_with_the_reference_library(tmp_path):
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(TENSORS, ours, metadata={"format": "pt"})
    safetensors.torch.save_file(TENSORS, str(theirs))
    for name, loaded in (("ours read by the library", safetensors.torch.load_file(str(ours))),
                         ("the library's read by ours", read_safetensors(theirs))):
        assert loaded.keys() == TENSORS.keys(), name
        for k, t in TENSORS.items():
            assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), (name, k)


def test_bad_safetensors_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="header is not JSON"):
        read_safetensors(bad)


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


@dataclass
class Demo:
    steps: int = 10
    lr: float = 1e-3
    name: str = "x"
    coto: bool = True
    seeds: tuple = (0, 1)


def test_parse_config_builds_every_field_type():
    assert parse_config(Demo, []) == Demo()
    cfg = parse_config(Demo, ["--steps", "3", "--lr", "2", "--name", "y", "--no-coto", "--seeds", "4", "5", "6"])
    assert cfg == Demo(steps=3, lr=2.0, name="y", coto=False, seeds=(4, 5, 6))
    assert isinstance(cfg.lr, float)
