"""A short smoke run of the toy demo, checked against identities that a bug would break."""
import pytest
import torch

import train_toy
from coto import coto_prob


def test_toy_demo_smoke(tmp_path, device, capsys):
    cfg = train_toy.Config(n_train=1024, n_test=1024, pretrain_steps=150, steps=80, batch_size=128,
                           seeds=(0, 0), log_every=40, out_dir=str(tmp_path), device=str(device))
    results = train_toy.main(cfg)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"output: {tmp_path} | data: generated (seed 1234) | device: {device}"
    assert lines[-1] == f"wrote {tmp_path / 'toy.png'}"
    pretrain_lines = [line for line in lines if line.lstrip().startswith("pretrain step")]
    coto_lines = [line for line in lines if line.lstrip().startswith("coto s0 step")]  # seeds (0, 0): twice
    assert len(pretrain_lines) == 2 and not any("| p " in line or "active" in line for line in pretrain_lines)
    assert len(coto_lines) == 6 and all("| p " in line and "| active " in line for line in coto_lines)
    for method in ("lora", "coto"):
        r = results[method]
        # adaptation helps: the frozen backbone is mostly wrong on the rotated task
        assert r["acc"] > results["base_target_acc"] + 0.1, (method, r, results["base_target_acc"])
        # the same seed twice: averaging the two adapters at lambda = 0.5 is the adapter itself
        assert r["accs"][0] == r["accs"][1] == r["interp_0.5"]
    assert (tmp_path / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_toy_coto_active_fraction_follows_the_schedule():
    cfg = train_toy.Config(n_train=512, n_test=256, pretrain_steps=1, steps=400, batch_size=8,
                           log_every=0)
    tasks = train_toy.make_tasks(cfg)
    backbone = train_toy.ToyNet(cfg).state_dict()
    _, history = train_toy.finetune(cfg, backbone, tasks, seed=0, use_coto=True)
    n = cfg.n_blocks
    expected = [p + (1 - p) ** n / n for p in
                (coto_prob(t, cfg.steps, cfg.p0, cfg.stage1_ratio) for t in range(cfg.steps))]
    assert [h["p"] for h in history] == [coto_prob(t, cfg.steps, cfg.p0, cfg.stage1_ratio)
                                         for t in range(cfg.steps)]
    active = torch.tensor([h["active"] for h in history])
    # mean over 400 steps x 6 blocks; its standard deviation is below 0.01
    assert abs(active.mean().item() - sum(expected) / cfg.steps) < 0.03
    assert (active[300:] == 1).all()  # stage 2: plain LoRA


def test_toy_diverging_run_stops_with_a_clear_error():
    cfg = train_toy.Config(n_train=256, n_test=64, steps=20, batch_size=32, lr=1e4, log_every=0)
    tasks = train_toy.make_tasks(cfg)
    backbone = train_toy.ToyNet(cfg).state_dict()
    with pytest.raises(FloatingPointError, match=r"coto s0: at step \d+ the loss is .* training diverged; rerun "
                                                 r"with a lower learning rate"):
        train_toy.finetune(cfg, backbone, tasks, seed=0, use_coto=True)
