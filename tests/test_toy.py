"""A short smoke run of the toy demo, checked against identities that a bug would break."""
import statistics

import pytest
import torch

import train_toy
from coto import coto_prob


def test_toy_demo_smoke(tmp_path, device, capsys):
    cfg = train_toy.Config(n_train=1024, n_test=1024, pretrain_steps=150, steps=80, batch_size=128,
                           log_every=40, out_dir=str(tmp_path), device=str(device))
    results = train_toy.main(cfg)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"output: {tmp_path} | data: generated (seed 1234) | device: {device}"
    assert lines[-1] == f"wrote {tmp_path / 'toy.png'}"
    pretrain_lines = [line for line in lines if line.startswith("pretrain | step")]
    coto_lines = [line for line in lines if line.startswith("coto s0 | step") and "| loss" in line]
    assert len(pretrain_lines) == 1 and not any("| p " in line or "active" in line for line in pretrain_lines)
    assert len(coto_lines) == 2 and all("| p " in line and "| active " in line for line in coto_lines)
    assert "coto s1 | step 40 | test acc " in "\n".join(lines)  # eval mode, every adapter on
    for method in ("lora", "coto"):
        r = results[method]
        # adaptation helps: the frozen backbone is mostly wrong on the rotated task
        assert r["acc"] > results["base_target_acc"] + 0.1, (method, r, results["base_target_acc"])
        assert r["acc"] == sum(r["accs"]) / 2 and len(r["accs"]) == 2
    assert (tmp_path / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_toy_averaging_one_adapter_with_itself_changes_nothing():
    """lambda = 0.5 between an adapter and itself is the adapter; the pruned accuracy is the one of
    the model with the odd blocks' adapters switched off by hand."""
    cfg = train_toy.Config(n_train=512, n_test=512, pretrain_steps=50, steps=40, batch_size=64, log_every=0)
    tasks = train_toy.make_tasks(cfg)
    backbone = train_toy.pretrain(cfg, tasks)
    model, _ = train_toy.finetune(cfg, backbone, tasks, seed=0, use_coto=True)
    r = train_toy.evaluate_method(cfg, [model, model], tasks)
    assert r["accs"][0] == r["accs"][1] == r["interp_0.5"]
    for i, block in enumerate(model.blocks):
        for layer in (block.fc1, block.fc2):
            layer.active = i % 2 == 0
    assert r["prune_every_other"] == train_toy.accuracy(model, *tasks["target"][1])


def test_toy_needs_two_seeds():
    with pytest.raises(ValueError, match="--seeds 1: give at least 2"):
        train_toy.main(train_toy.Config(seeds=1))


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
    with pytest.raises(FloatingPointError, match=r"coto s0: at step \d+ the loss is .* training diverged\. Rerun "
                                                 r"with a lower learning rate"):
        train_toy.finetune(cfg, backbone, tasks, seed=0, use_coto=True)


def test_toy_plot_draws_the_printed_accuracies(tmp_path):
    """The bars are the accuracies main() prints (in %), the dots each seed's, the loss curve a
    15-step moving average (shorter at the ends)."""
    cfg = train_toy.Config(steps=20, seeds=2)
    results = {"base_target_acc": 0.3, **{m: {"acc": a, "accs": [a - 0.01, a + 0.01], "interp_0.5": a - 0.2,
                                               "prune_every_other": a - 0.4, "prune_accs": [a - 0.42, a - 0.38]}
                                           for m, a in (("lora", 0.9), ("coto", 0.85))}}
    histories = {m: [{"loss": float(t + k), "p": min(t / 15, 1.0), "active": 0.5} for t in range(20)]
                 for k, m in enumerate(("lora", "coto"))}
    path = tmp_path / "toy.png"
    drawn = train_toy.plot(cfg, results, histories, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn["bars"]["lora"] == pytest.approx([90, 70, 50]) and drawn["bars"]["coto"] == pytest.approx([85, 65, 45])
    assert drawn["dots"]["coto"] == [pytest.approx([84, 86]), [], pytest.approx([43, 47])]
    assert drawn["base"] == pytest.approx(30)
    # loss t + 1 at step t: the mean of t - 7 .. t + 7 inside 0..19, plus 1
    expected = [statistics.fmean(range(max(0, t - 7), min(20, t + 8))) + 1 for t in range(20)]
    assert drawn["loss"]["coto"] == pytest.approx(expected)
    assert drawn["p"] == [min(t / 15, 1.0) for t in range(20)]
