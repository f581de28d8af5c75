"""bench.py: its FLOP model against torch's own counter (the classroom layer and the lab kernels), its
harness against a fake clock, backward truncation against the expected list, and tiny runs of main()."""
import dataclasses
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from lab import bench
from lab.kernels import use_fast_kernels
from coto import block_groups
from train_toy import parse_args
from test_utils import assert_every_flag_explained

TINY = dict(embed_dim=16, depth=3, num_heads=2)
CPU = torch.device("cpu")


ALL = ("qkv", "proj", "fc1", "fc2")
# lora.py and lab/kernels.py add the low-rank product into the base output in place (addmm_), which
# the counter does not count by default: the same FLOPs as addmm
IN_PLACE = {torch.ops.aten.addmm_: flop_registry[torch.ops.aten.addmm].__wrapped__}


WIDE = dict(embed_dim=64, depth=2, num_heads=2)  # one image (17 tokens): LoRA's thin products


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("variant, targets, size, batch", [
    ("lora", ALL, TINY, 4), ("dora", ALL, TINY, 4), ("hira", ALL, TINY, 4), ("lora", ("proj", "fc2"), TINY, 4),
    ("hira", ("proj", "fc2"), TINY, 4), ("lora", ALL, WIDE, 1), ("dora", ALL, WIDE, 1)])
def test_flop_model_matches_flop_counter(variant, targets, size, batch, fast):
    """The hand count equals what FlopCounterMode sees in a real step, for every mask (the MATH
    attention backend makes the attention matmuls visible to the counter on CPU). The classroom
    layer runs the two thin products; the fast kernels build W + s B A with 4 images, and run the
    thin products with one image of the wider ViT."""
    cfg = bench.Config(r=2, targets=",".join(targets))
    model = bench.lora_vit(size, variant, cfg, CPU)
    if fast:
        use_fast_kernels(model)
    groups = block_groups(model)
    x, y = bench.batch_of(batch, model.num_classes, CPU, 0)
    for mask in itertools.product([False, True], repeat=size["depth"]):
        if not any(mask):
            continue  # CoTo always keeps one group on
        bench.set_mask(groups, mask)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=IN_PLACE) as counter:
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        assert bench.vit_step_flops(model, batch, 2, variant, mask, cfg.targets, fast) == counter.get_total_flops(), mask


def test_alternate_against_a_fake_clock(monkeypatch):
    """Case b takes exactly twice case a while the machine slows down from repeat to repeat: the
    medians and the per-repeat ratio come out as computed by hand, and warm-up is not timed."""
    clock, calls = [0.0], {"a": 0, "b": 0}
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def case(name, cost):
        def run(i):
            calls[name] += 1
            slow = 1 + calls[name] // 4  # drift: each repeat (3 calls) is slower than the last
            clock[0] += cost * slow * (i + 1)
        return run

    res = bench.alternate({"a": case("a", 1.0), "b": case("b", 2.0)}, calls=3, repeats=3, warmup=1)
    assert calls == {"a": 10, "b": 10}  # 1 warm-up + 3 repeats x 3 calls
    # call k (1-based, warm-up is call 1) of a case costs cost * (1 + k // 4) * (i + 1)
    per_rep = [sum((1 + k // 4) * (i + 1) for i, k in zip(range(3), range(2 + 3 * r, 5 + 3 * r)))
               for r in range(3)]
    assert res["a"]["s"] == pytest.approx(sorted(per_rep)[1])
    assert res["b"]["s"] == pytest.approx(2 * sorted(per_rep)[1])
    assert res["b"]["ratio"] == pytest.approx(2.0) and res["a"]["ratio"] == pytest.approx(1.0)


def test_backward_stops_below_the_lowest_active_block():
    """Nothing below the lowest active block requires grad, and after backward only the active
    block's adapters and the head have gradients."""
    model = bench.lora_vit(TINY, "lora", bench.Config(r=2), CPU)
    groups = block_groups(model)
    x, y = bench.batch_of(4, model.num_classes, CPU, 0)
    for lowest in range(TINY["depth"]):
        bench.set_mask(groups, [k == lowest for k in range(TINY["depth"])])
        assert bench.grad_per_block(model, x) == [k >= lowest for k in range(TINY["depth"])]
        F.cross_entropy(model(x), y).backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == {n for n, p in model.named_parameters()
                             if n.startswith("head.") or (n.startswith(f"blocks.{lowest}.") and "lora_" in n)}
        model.zero_grad(set_to_none=True)


def test_coto_masks_follow_the_schedule():
    """Stage 2 (from ceil(0.75 T)) has every block on; every mask has at least one block on."""
    masks = bench.coto_masks(depth=4, total_steps=100, points=34, p0=0.0, stage1_ratio=0.75, seed=0)
    steps = [round(k * 99 / 33) for k in range(34)]
    assert all(any(m) for m in masks)
    assert all(all(m) for t, m in zip(steps, masks) if t >= 75)
    assert not all(all(m) for t, m in zip(steps, masks) if t < 75)


def test_main_tiny(tmp_path, device, capsys):
    cfg = bench.Config(**TINY, device=str(device), large_embed_dim=16, large_depth=4, large_num_heads=2,
                       r=2, batch_size=4, schedule_points=3, repeats=1, warmup=0, shapley_blocks="3",
                       shapley_batch=8, naive_samples=8, layer_shape="68,16,64", out=str(tmp_path),
                       threads=0)
    res = bench.main(cfg)
    peft = ["PEFT lora", "PEFT dora"]  # PEFT's layers beside ours, same adapters on the same targets
    fp32 = [r["layer"] for r in res["layer"] if r["dtype"] == "fp32"]
    assert fp32 == ["nn.Linear", "lora", "dora", "hira", "fast lora", "fast dora", "fast hira", *peft]
    trainable = {(r["model"], r["method"]): r["trainable"] for r in res["memory"]}
    assert all(trainable[m, v] == trainable[m, f"PEFT {v}"]
               for m in ("default", "large") for v in ("lora", "dora"))
    assert [(r["model"], r["variant"]) for r in res["coto"]] == \
        [(m, v) for m in ("default", "large") for v in ("lora", "dora", "hira")]
    # the two ways to build the coalition table agree, with the evaluation counts of games.py
    shap = {r["method"].split(",")[0].split(" ")[0]: r for r in res["shapley"]}
    assert list(shap) == ["naive", "prefix"] and shap["prefix"]["max_abs_diff"] < 1e-5  # float32
    assert shap["naive"]["block_evals"] == 3 * 2 ** 3 and shap["prefix"]["block_evals"] == 2 ** 4 - 2
    trunc = [r for r in res["truncation"] if r["variant"] == "lora"]
    assert all(r["no_grad_below"] for r in res["truncation"])
    assert all(a["predicted"] > b["predicted"] for a, b in zip(trunc, trunc[1:]))
    # full fine-tuning holds at least weights, grads and AdamW's two moments at its peak (fp32)
    for r in res["memory"]:
        model = bench.lora_vit(bench.vit_sizes(cfg)[r["model"]], None, cfg, CPU)
        n = sum(p.numel() for p in model.parameters())
        assert r["peak_mb"] * 2 ** 20 >= 4 * n + 12 * r["trainable"], r
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["table"] == res["table"] and "5. Peak memory" in res["table"]
    lines = capsys.readouterr().out.splitlines()
    assert f"bench.json and bench.md go to {tmp_path}" in lines[0]
    assert lines[-1].startswith(f"wrote {tmp_path / 'bench.json'} and {tmp_path / 'bench.md'}")


def test_layer_only_runs_the_layer_race_alone(tmp_path, capsys):
    cfg = bench.Config(**TINY, repeats=1, warmup=0, layer_shape="68,16,64", out=str(tmp_path), peft=False)
    res = bench.main(dataclasses.replace(cfg, layer_only=True))
    assert [r["layer"] for r in res["layer"]] == ["nn.Linear", "lora", "dora", "hira", "fast lora", "fast dora",
                                                  "fast hira"]
    assert not {"coto", "truncation", "merged", "shapley", "memory"} & set(res)
    assert all(r["ms"] > 0 for r in res["layer"]) and res["layer"][0]["ratio"] == 1.0
    assert "3. The layer race" in res["table"] and "1. Training step" not in res["table"]


@pytest.mark.parametrize("argv, says", [
    (["--threads", "-1"], "--threads -1: give 0 (torch's default) or a number of threads >= 1"),
    (["--threads", "1.5"], "argument --threads: invalid int value: '1.5'"),
    (["--depth", "1"], "--embed-dim 128 --depth 1 --num-heads 4: give depth >= 2"),  # crashed after the first runs
    (["--embed-dim", "10"], "--embed-dim 10 --depth 6 --num-heads 4: give depth >= 2 (CoTo needs a block to skip) "
                            "and num-heads >= 1 dividing embed-dim"),
    (["--large-depth", "1"], "--large-embed-dim 192 --large-depth 1 --large-num-heads 3: give large-depth 0"),
    (["--variants", "lora,qlora"], "--variants lora,qlora: give comma-separated, any of lora, dora, hira"),
    (["--variants", ""], "--variants '': give comma-separated, any of lora, dora, hira"),
    (["--targets", "qkv,head"], "--targets qkv,head: give comma-separated, any of qkv, proj, fc1, fc2"),
    (["--shapley-blocks", "6,13"], "--shapley-blocks 6,13: give comma-separated depths in 1..12"),
    (["--shapley-blocks", "6 12"], "--shapley-blocks 6 12: give comma-separated depths in 1..12"),
    (["--layer-shape", "64,16"], "--layer-shape 64,16: give three comma-separated integers >= 1: tokens,in,out"),
    (["--repeats", "0"], "--repeats 0: give an integer >= 1"),
    (["--p0", "nan"], "--p0 nan: give a probability in [0, 1]"),
    (["--out", ""], "--out '': give a folder that can be written"),
    (["--out", "tests/test_bench.py"], "--out tests/test_bench.py: give a folder that can be written"),  # a file
    (["--out", "tests/test_bench.py/runs"], "--out tests/test_bench.py/runs: give a folder that can be written")])
def test_every_bad_flag_is_one_line_before_any_benchmark(argv, says, monkeypatch, capsys):
    """Refused while the flags are parsed (bench.main never starts), in one line naming the flag and what it takes."""
    monkeypatch.chdir(Path(__file__).parents[1])
    monkeypatch.setattr(bench, "main", lambda cfg: pytest.fail("the benchmark started"))
    with pytest.raises(SystemExit) as e:
        parse_args(bench.Config, "", "", argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and says in err[-1] and len(err) == 2, err  # argparse's usage line, then the error


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_device_cuda_without_cuda_is_one_line():
    with pytest.raises(ValueError, match="--device cuda: not a device this torch has here"):
        bench.Config(device="cuda")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_folder_is_refused_before_the_benchmark(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="--out .*: give a folder that can be written"):
            bench.Config(out=str(tmp_path / "bench"))
    finally:
        tmp_path.chmod(0o755)


def test_help_explains_every_flag_and_ends_with_an_example():
    proc = subprocess.run([sys.executable, "-m", "lab.bench", "--help"], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=120)
    assert proc.returncode == 0 and "python -m lab.bench" in proc.stdout.splitlines()[-1]
    assert_every_flag_explained(proc.stdout, bench.Config)
