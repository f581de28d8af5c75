"""The toy demo: a short run, its evaluation and figure against hand-made references, its flag checks."""
import re
import runpy
import statistics

import pytest
import torch

import train_toy
from coto import CoTo, block_groups, coto_prob
from lora import inject_lora, lora_layers, lora_state_dict

SMALL = dict(n_train=512, pretrain_steps=60, steps=80, batch_size=64)


def adapted(cfg, seed: int) -> train_toy.ToyNet:
    """A ToyNet with LoRA on fc1 / fc2 whose B factors are random (nonzero), in eval mode."""
    torch.manual_seed(seed)
    model = train_toy.ToyNet(cfg)
    inject_lora(model, ["fc1", "fc2"], r=cfg.r, alpha=cfg.alpha)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_()
    return model.eval()


def test_toy_demo_smoke(tmp_path, device, capsys):
    cfg = train_toy.Config(n_train=1024, pretrain_steps=150, steps=200, batch_size=128, out_dir=str(tmp_path),
                           device=str(device))
    results = train_toy.main(cfg)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"output: {tmp_path} | data: generated (seed 1234) | device: {device}"
    assert lines[-1] == f"wrote {tmp_path / 'toy.png'}"
    assert [line.split(" | loss ")[0] for line in lines if line.startswith("pretrain")] == ["pretrain | step 150"]
    coto = [line for line in lines if line.startswith("coto s0 | step")]
    assert [line.split(" | loss ")[0] for line in coto] == ["coto s0 | step 100", "coto s0 | step 200"]
    assert all(" | p " in line and " | active " in line and " | test acc " in line for line in coto)
    assert not any(" | p " in line for line in lines if line.startswith(("pretrain", "lora")))
    table = lines[lines.index("| downstream test accuracy              | LoRA  | CoTo  |"):][:5]  # markdown: lab.results reads it
    assert table[1] == "|---|---|---|" and [row.split(" | ")[1:] for row in table[2:]] == [
        [f"{results['lora'][k]:.3f}", f"{results['coto'][k]:.3f} |"] for k in ("acc", "interp_0.5", "prune_every_other")]
    for method in ("lora", "coto"):  # adaptation helps: the frozen backbone is mostly wrong on the rotated task
        assert results[method]["acc"] > results["base_target_acc"] + 0.1, (method, results)
    assert (tmp_path / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_runs_print_the_same_digits(tmp_path, capsys):
    """The README promises the same output every run: no timings, no unseeded randomness."""
    outputs = []
    for _ in range(2):
        train_toy.main(train_toy.Config(**SMALL, out_dir=str(tmp_path), device="cpu"))
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and "downstream test accuracy" in outputs[0]


def test_evaluate_against_hand_made_references():
    """Averaging at lambda = 0.5 is the model with the mean of the two seeds' A and of their B; pruning is
    the model with the odd blocks' adapters switched off by hand; an adapter averaged with itself is itself."""
    cfg = train_toy.Config(n_train=256)
    x, y = train_toy.make_tasks(cfg)["target"][1]
    a, b = adapted(cfg, 0), adapted(cfg, 1)
    r = train_toy.evaluate(cfg, [a, b], x, y)
    acc = lambda m: (m(x).argmax(-1) == y).float().mean().item()  # noqa: E731
    ref = adapted(cfg, 0)
    ref.load_state_dict({k: (v + lora_state_dict(b)[k]) / 2 for k, v in lora_state_dict(a).items()}, strict=False)
    with torch.no_grad():
        assert r["interp_0.5"] == acc(ref) and r["acc"] == statistics.fmean([acc(a), acc(b)])
        pruned = []
        for m in (a, b):
            for i, block in enumerate(m.blocks):
                block.fc1.active = block.fc2.active = i % 2 == 0
            pruned.append(acc(m))
            for block in m.blocks:
                block.fc1.active = block.fc2.active = True
    assert r["prune_every_other"] == statistics.fmean(pruned) and r["acc"] != r["prune_every_other"]
    same = train_toy.evaluate(cfg, [a, a], x, y)
    with torch.no_grad():
        assert same["interp_0.5"] == same["acc"] == acc(a)
    assert all(layer.active for layer in lora_layers(a).values())  # every switch restored


def test_toy_coto_active_fraction_follows_the_schedule():
    """The loop calls coto.step(step) before every optimizer step: the fraction of blocks on follows p(t)
    (p + (1 - p)^n / n: at least one group is always on), and stage 2 is plain LoRA."""
    cfg = train_toy.Config(n_train=512, steps=400, batch_size=8)
    model = adapted(cfg, 0).train()
    coto = CoTo(block_groups(model), cfg.steps, cfg.p0, cfg.stage1_ratio, seed=0)
    history = train_toy.train(model, train_toy.make_tasks(cfg)["target"], cfg.steps, cfg.lr, cfg.batch_size, 0, coto)
    n, ps = cfg.n_blocks, [coto_prob(t, cfg.steps, cfg.p0, cfg.stage1_ratio) for t in range(cfg.steps)]
    active = torch.tensor([h["active"] for h in history])
    # mean over 400 steps x 6 blocks; its standard deviation is below 0.01
    assert abs(active.mean().item() - statistics.fmean(p + (1 - p) ** n / n for p in ps)) < 0.03
    assert (active[300:] == 1).all() and (active[:100] < 1).any()


def nan_loss_at(monkeypatch, call: int) -> None:
    """F.cross_entropy returns NaN on its `call`-th call: a run that diverges at a step chosen by the test,
    on any CPU (where float32 first overflows depends on the CPU's kernels)."""
    calls, real = [0], torch.nn.functional.cross_entropy

    def cross_entropy(*a, **k):
        calls[0] += 1
        return real(*a, **k) * (float("nan") if calls[0] == call else 1.0)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)


def test_a_diverging_run_stops_before_the_step_and_says_what_to_do(monkeypatch):
    cfg = train_toy.Config(n_train=256, batch_size=32)
    model = adapted(cfg, 0).train()
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    nan_loss_at(monkeypatch, 3)
    with pytest.raises(FloatingPointError, match=r"^lora s0: at step 3 the loss is nan: training diverged; rerun with "
                                                 r"a lower learning rate than 0\.01 \(--lr, or --pretrain-lr"):
        train_toy.train(model, train_toy.make_tasks(cfg)["target"], 20, cfg.lr, cfg.batch_size, 0, name="lora s0")
    after = lora_state_dict(model)  # two steps taken, the NaN one not
    assert all(torch.isfinite(t).all() for t in after.values()) and any(not torch.equal(before[k], after[k]) for k in after)


def test_the_command_line_ends_a_diverging_run_in_one_line(monkeypatch, tmp_path):
    nan_loss_at(monkeypatch, 2)
    monkeypatch.setattr("sys.argv", ["train_toy.py", "--pretrain-steps", "5", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(train_toy.__file__, run_name="__main__")
    assert str(e.value.code).startswith("train_toy.py: error: pretrain: at step 2 the loss is nan: training diverged")
    assert "\n" not in str(e.value.code)


@pytest.mark.parametrize("flags, message", [
    (["--rotation", "nan"], "--rotation nan: give a finite number"),  # labelled everything class 0: accuracy 1.000
    (["--batch-size", "0"], "--batch-size 0: give a finite number, 1 <= batch_size"),
    (["--seeds", "1"], "--seeds 1: give a finite number, 2 <= seeds"),  # two seeds are averaged
    (["--r", "65"], "--r 65: give a finite number, 1 <= r <= 64"),
    (["--p0", "1.5"], "--p0 1.5: give a finite number, 0 <= p0 <= 1"),
    (["--out-dir", ""], "--out-dir '': give a folder that can be written"),  # would write into the current folder
    (["--out-dir", "FILE"], "--out-dir 'FILE': give a folder that can be written"),
    (["--out-dir", "FILE/sub"], "--out-dir 'FILE/sub': give a folder that can be written"),
    (["--device", "tpu"], "--device tpu: not a device this torch has here; choose auto, cpu, cuda or mps"),
])
def test_bad_flags_are_one_line_before_any_work(flags, message, tmp_path, capsys):
    (tmp_path / "FILE").write_text("not a folder")
    flags = [f.replace("FILE", str(tmp_path / "FILE")) for f in flags]
    with pytest.raises(SystemExit):
        train_toy.parse_args(train_toy.Config, "doc", "example", argv=flags)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].endswith("[--flag ...]")  # the short usage line, then the error
    assert err[1].split(": error: ", 1)[1].startswith(message.replace("FILE", str(tmp_path / "FILE")))


def test_device_the_machine_lacks_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: not a device this torch has here"):
        train_toy.Config(device="cuda")
    assert train_toy.pick_device("auto").type in ("cpu", "mps")


def test_help_explains_every_flag_and_ends_with_an_example(capsys):
    with pytest.raises(SystemExit):
        train_toy.parse_args(train_toy.Config, train_toy.__doc__, "python train_toy.py --steps 400", argv=["--help"])
    out = capsys.readouterr().out
    helps = {chunk.split()[0]: " ".join(chunk.split()[1:]) for chunk in re.split(r"\n  (?=--)", out)[1:]}
    assert set(helps) == {"--" + name.replace("_", "-") for name in train_toy.Config.__dataclass_fields__}
    for flag, text in helps.items():  # more than the flag's own name: --r R "LoRA rank of every adapter ..."
        words = text.split(" (default:")[0].split()[1:]  # after the metavar
        assert len(words) >= len(flag.strip("-").split("-")) + 2, (flag, text)
    assert out.rstrip().endswith("example:\n  python train_toy.py --steps 400")


def test_toy_plot_draws_the_printed_accuracies(tmp_path):
    """The bars are the accuracies main() prints (in %), the backbone a line, the loss curve a 15-step
    moving average (shorter at the ends), the dashed curve p(t)."""
    cfg = train_toy.Config(steps=20)
    results = {"base_target_acc": 0.3, **{m: {"acc": a, "interp_0.5": a - 0.2, "prune_every_other": a - 0.4}
                                           for m, a in (("lora", 0.9), ("coto", 0.85))}}
    histories = {(m, 0): [{"loss": float(t + k), "active": 0.5} for t in range(20)]
                 for k, m in enumerate(("lora", "coto"))}
    fig = train_toy.plot(cfg, results, histories, tmp_path / "toy.png")
    assert (tmp_path / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bars, loss, schedule = fig.axes
    assert [p.get_height() for p in bars.patches] == pytest.approx([90, 70, 50, 85, 65, 45])
    assert bars.lines[-1].get_ydata()[0] == pytest.approx(30)  # the frozen backbone
    # loss t + 1 at step t: the mean of t - 7 .. t + 7 inside 0..19, plus 1
    expected = [statistics.fmean(range(max(0, t - 7), min(20, t + 8))) + 1 for t in range(20)]
    assert list(loss.lines[1].get_ydata()) == pytest.approx(expected)
    assert list(schedule.lines[1].get_ydata()) == [coto_prob(t, 20) for t in range(20)]
