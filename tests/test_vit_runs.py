"""lab.vit_runs: train_vit.py's runs in folders. Resume == uninterrupted (weights and report files), runs
tied to their configuration and to their data, runs sharing a folder, damaged files named, finished runs kept
(and trained again when their adapters are gone), diverging runs keeping their last checkpoint, and the real
data's saved adapters giving the reported accuracy."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_vit
from lab import vit_runs
from lab.utils import atomic_write_text, lock_folder
from lab.vit_runs import Config, Run, load_adapters, main
from lora import lora_state_dict
from test_utils import assert_every_flag_explained
from test_train_vit import _tiny_setup, classroom, fake_fashion, run_dir, tiny as tiny_vit
from lab.vit_runs import pretrain
from train_vit import evaluate, load_data, make_tasks


def tiny(tmp_path, **kw) -> Config:
    """test_train_vit's tiny job with run folders, a checkpoint every 3 steps."""
    return tiny_vit(tmp_path, **{"ckpt_every": 3, **kw})


def finetune(cfg: Config, task, backbone, probe=None, out_dir=None) -> tuple:
    """train_vit.finetune with its run's files in out_dir (lab.vit_runs.Run)."""
    return train_vit.finetune(cfg, task, backbone, probe, run=Run(out_dir, cfg, task) if out_dir else None)


def crash_at(monkeypatch, n: int) -> None:
    """Optimizer step n + 1 raises KeyboardInterrupt (from get_lr), as if the run were killed after n steps."""
    real_get_lr = train_vit.get_lr

    def get_lr(step, *a):
        if step == n:
            raise KeyboardInterrupt
        return real_get_lr(step, *a)
    monkeypatch.setattr(train_vit, "get_lr", get_lr)


def test_resume_ends_exactly_where_an_uninterrupted_run_ends(tmp_path, monkeypatch, without_timings):
    """Cut after step 4 (logs every 2 steps, checkpoints every 3): the resumed run's adapters, and
    its result.json and metrics.jsonl apart from timings, equal an uninterrupted run's."""
    # lora_dropout: the RNG state is restored too
    cfg = tiny(tmp_path, lora_dropout=0.1, coto=True, head="probe_init", log_every=2, eval_every=2)
    backbone, task = _tiny_setup(cfg)
    probe_model = train_vit.build_model(cfg, task.x_train, 5)
    train_vit.load_pretrained(probe_model, backbone)
    probe, _ = train_vit.linear_probe(probe_model, task)
    full, m_full = finetune(cfg, task, backbone, probe, out_dir=tmp_path / "full")

    crash_at(monkeypatch, 4)  # as if the run were killed after step 4, the checkpoint being step 3's
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, task, backbone, probe, out_dir=tmp_path / "cut")
    logged = [json.loads(r)["step"] for r in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 2, 4, 4]  # train and eval records; step 4 is past the checkpoint
    (tmp_path / "cut" / "ckpt.pt.x1y2.tmp").write_bytes(b"half")  # a kill -9 during a checkpoint write
    monkeypatch.undo()
    resumed, m_res = finetune(dataclasses.replace(cfg, resume=True), task, backbone, probe, out_dir=tmp_path / "cut")
    a, b = lora_state_dict(full), lora_state_dict(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(full.head.weight, resumed.head.weight)
    assert m_full["acc"] == m_res["acc"]
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if k.endswith("lora_B"))
    full_files, cut_files = without_timings(tmp_path / "full"), without_timings(tmp_path / "cut")
    assert full_files == cut_files
    assert [r["step"] for r in full_files[0]["history"]] == [2, 4, 6]  # the whole run, not the last segment
    assert 0 < full_files[0]["active_frac"] < 1
    assert sorted(f.name for f in (tmp_path / "cut").iterdir()) == sorted(f.name for f in (tmp_path / "full").iterdir())
    assert not (tmp_path / "cut" / "ckpt.pt.x1y2.tmp").exists()  # swept: the run's folder is locked to the run


def test_resume_with_other_settings_is_an_error(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, tasks="rot90", compare=False)
    first = main(cfg)
    # finished runs: skipped when unchanged (nothing retrained), an error naming the fields when not
    monkeypatch.setattr(train_vit, "finetune", lambda *a, **k: pytest.fail("retrained a finished run"))
    again = main(dataclasses.replace(cfg, resume=True, log_every=1))  # logging is not part of the result
    assert [{k: v for k, v in r.items() if k != "config"} for r in again["runs"]] == first["runs"]
    monkeypatch.setattr(vit_runs, "pretrain", lambda *a: pytest.fail("pretrained before checking the flags"))
    with pytest.raises(ValueError, match=r"another configuration \(alpha: 4.0 then, 64.0 now; r: 2 then, 8 now\)"):
        main(dataclasses.replace(cfg, resume=True, r=8, alpha=64.0))
    # an unfinished run: its checkpoint refuses another configuration
    monkeypatch.undo()
    backbone, task = _tiny_setup(cfg)
    out = tmp_path / "cut"
    crash_at(monkeypatch, 4)  # killed after step 4 of 5, the checkpoint being step 3's
    with pytest.raises(KeyboardInterrupt):
        finetune(dataclasses.replace(cfg, steps=5), task, backbone, out_dir=out)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"ckpt\.pt .*another configuration .*lr: 0\.01 .*0\.1 now; steps: 5 .*6 now"):
        finetune(dataclasses.replace(cfg, resume=True, lr=0.1), task, backbone, out_dir=out)


def test_damaged_checkpoint_is_named(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, steps=4)
    backbone, task = _tiny_setup(cfg)
    out = tmp_path / "run"
    finetune(cfg, task, backbone, out_dir=out)
    assert not (out / "ckpt.pt").exists()  # a finished run keeps no checkpoint: result.json marks it
    crash_at(monkeypatch, 3)  # the checkpoint of step 3 (ckpt_every 3) is on disk
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, task, backbone, out_dir=out)
    ckpt = out / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # cut short
    monkeypatch.undo()
    with pytest.raises(ValueError, match=rf"{ckpt} is damaged.*delete {ckpt} \(or run without --resume\)") as e:
        finetune(dataclasses.replace(cfg, resume=True), task, backbone, out_dir=out)
    assert "weights_only" not in str(e.value)


def test_a_diverging_run_stops_at_its_first_nan_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A NaN put into the gradient of the final norm's output at step 3 (the loss stays finite): the run stops
    there, before the step reaches the weights, keeping step 2's checkpoint and log."""
    cfg = tiny(tmp_path, steps=8, ckpt_every=2, log_every=1)
    backbone, task = _tiny_setup(cfg)
    real_build, forwards = train_vit.build_model, []

    def build_model(*a):  # a model whose 3rd training forward hands a NaN gradient back from its final norm
        model = real_build(*a)

        def poison(module, inputs, out):
            if module.training:
                forwards.append(1)
                if len(forwards) == 3:
                    out.register_hook(lambda grad: grad * float("nan"))
        model.norm.register_forward_hook(poison)
        return model
    monkeypatch.setattr(train_vit, "build_model", build_model)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"rot90 coto s0: at step 3 the loss is [0-9.]+ and the gradient "
                                                 r"norm nan: training diverged\. Rerun with a lower learning rate"):
        finetune(cfg, task, backbone, out_dir=out)
    assert sorted(f.name for f in out.iterdir()) == [".lock", "ckpt.pt", "metrics.jsonl"]  # no adapters, no result
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 2 and all(torch.isfinite(t).all() for t in ck["trainable"].values())
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_real_fashion_mnist_smoke(tmp_path):
    """Reads the Debian package's files (CI installs dataset-fashion-mnist), trains a few steps, and
    checks the saved adapters reproduce the reported accuracy."""
    if not Path(train_vit.DEBIAN_DIR, "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST is not in {train_vit.DEBIAN_DIR}: sudo apt install dataset-fashion-mnist")
    data = load_data(Config())
    assert data["x_train"].shape == (60000, 1, 28, 28)
    assert torch.equal(torch.bincount(data["y_test"]), torch.full((10,), 1000))  # balanced test split
    cfg = tiny(tmp_path, data_dir="", tasks="invert", n_train=256, n_test=200, compare=False, steps=4)
    res = main(cfg)
    run = res["runs"][0]
    task = make_tasks(data, ["invert"], [0, 1, 2, 3, 4], 7, 256, 200)["invert"]
    backbone = pretrain(cfg, data)
    folder = vit_runs.run_dir(dataclasses.replace(cfg, seed=0), vit_runs.backbone_key(cfg, data), "invert")
    model = load_adapters(cfg, task, backbone, folder / "adapters.pt")
    assert evaluate(model, task.x_test, task.y_test)[0] == run["acc"]


def test_runs_are_named_by_their_data_and_init_file_not_by_its_path(tmp_path, monkeypatch, capsys):
    """Other data (or another --init file at the same path) in the same --out-dir is another backbone and
    other runs: --resume never reports the first data's accuracy as the second's."""
    cfg = tiny(tmp_path, tasks="rot90", compare=False)
    first = main(cfg)
    fake_fashion(tmp_path / "data", seed=1)  # the same --dataset and --data-dir, other images
    second = main(dataclasses.replace(cfg, resume=True))
    assert "skipping" not in capsys.readouterr().out  # trained on the new images, its accuracy theirs:
    assert second["probe"] != first["probe"] or second["runs"][0]["loss"] != first["runs"][0]["loss"]
    assert len(list((tmp_path / "runs").glob("pretrain-*/backbone.pt"))) == 2 and len(list(
        (tmp_path / "runs").glob("pretrain-*/rot90/coto/seed0/adapters.pt"))) == 2
    from vit import VisionTransformer
    keys = []
    for seed in (0, 1):  # an init file replaced at the same path
        torch.manual_seed(seed)
        torch.save(VisionTransformer(embed_dim=16, depth=2, num_heads=2).state_dict(), tmp_path / "vit.pt")
        keys.append(vit_runs.backbone_key(dataclasses.replace(cfg, init=str(tmp_path / "vit.pt")), load_data(cfg)))
    assert keys[0] != keys[1] and all(k.startswith("init-") for k in keys)


def test_two_processes_on_one_run_folder(tmp_path):
    """The second process on a run's folder stops with one line; atomic writes use this process's own
    temporary file and leave other processes' alone."""
    cfg = tiny(tmp_path)
    backbone, task = _tiny_setup(cfg)
    out = tmp_path / "run"
    out.mkdir()
    other = lock_folder(out)  # as another process holds it while training
    with pytest.raises(ValueError, match=rf"{out} is in use by another process: wait for it, or use another --out-dir"):
        finetune(cfg, task, backbone, out_dir=out)
    other.close()
    (tmp_path / "results.json.99999999.tmp").write_text("another process's write in flight")
    atomic_write_text(tmp_path / "results.json", "{}")  # how the runs' files are written
    assert (tmp_path / "results.json.99999999.tmp").read_text() == "another process's write in flight"
    assert sorted(f.name for f in tmp_path.glob("results.json*")) == ["results.json", "results.json.99999999.tmp"]


def test_resume_reruns_a_finished_run_whose_adapters_are_gone_and_names_damaged_files(tmp_path, capsys):
    cfg = tiny(tmp_path, tasks="rot90", compare=False)
    first = main(cfg)
    folder = run_dir(cfg, "rot90")
    (folder / "adapters.pt").unlink()
    again = main(dataclasses.replace(cfg, resume=True))
    assert "adapters.pt is gone: training it again" in capsys.readouterr().out
    assert (folder / "adapters.pt").is_file() and again["runs"][0]["acc"] == first["runs"][0]["acc"]
    (folder / "result.json").write_text('{"acc": 0.5, "conf')  # cut short
    with pytest.raises(ValueError, match=rf"{folder / 'result.json'} is damaged; delete it"):
        main(dataclasses.replace(cfg, resume=True))
    (folder / "result.json").unlink()
    (folder / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=rf"{folder / 'metrics.jsonl'} line 2 is damaged"):
        main(dataclasses.replace(cfg, resume=True))


def test_main_keeps_each_run_in_its_folder(tmp_path, device, capsys):
    """The tables are train_vit.main()'s, digit for digit; beside them each run's metrics.jsonl, adapters.pt
    (giving the reported accuracy) and result.json; --resume keeps finished runs, a rerun without it says so."""
    cfg = tiny(tmp_path, tasks="rot90", device=str(device))
    res = main(cfg)
    lines = capsys.readouterr().out.splitlines()
    plain = train_vit.main(classroom(cfg))  # train_vit.py's own flags, the lab's backbone
    tables = lambda out: [line for line in out if line.startswith("|")]  # noqa: E731
    assert tables(lines) == tables(capsys.readouterr().out.splitlines()) and plain["probe"] == res["probe"]
    tags = [json.loads(r)["tag"] for r in (run_dir(cfg, "rot90") / "metrics.jsonl").read_text().splitlines()]
    assert set(tags) == {"rot90 coto s0"}  # no trailing separator
    # the saved adapters give the reported accuracy, and record what they are
    backbone, task = _tiny_setup(cfg)
    path = run_dir(cfg, "rot90") / "adapters.pt"
    assert evaluate(load_adapters(cfg, task, backbone, path), task.x_test, task.y_test)[0] == res["runs"][1]["acc"]
    with pytest.raises(ValueError, match="saved as variant=lora, this model has variant=hira"):
        load_adapters(dataclasses.replace(cfg, variant="hira"), task, backbone, path)
    assert json.loads((run_dir(cfg, "rot90") / "result.json").read_text())["acc"] == res["runs"][1]["acc"]
    proc = subprocess.run([sys.executable, "-m", "lab.vit_report", cfg.out_dir], capture_output=True, text=True,
                          cwd=Path(train_vit.__file__).parent, timeout=120)  # the job's figure, from results.json
    assert proc.returncode == 0 and (tmp_path / "runs" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    main(dataclasses.replace(cfg, resume=True))
    assert "skipping rot90 coto s0: finished" in capsys.readouterr().out
    main(cfg)
    assert "overwriting rot90 coto s0, which had finished" in capsys.readouterr().out




def test_ckpt_every_is_checked_with_the_other_flags():
    with pytest.raises(ValueError, match="--ckpt-every -2: must be an integer >= 0"):
        Config(ckpt_every=-2)
    with pytest.raises(ValueError, match="--r 0: must be an integer >= 1"):  # train_vit.py's checks too
        Config(r=0)


def test_the_command_line_runs_the_job_and_says_how_to_resume(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lab.vit_runs", "--ckpt-every", "-1"], capture_output=True, text=True,
                          cwd=Path(train_vit.__file__).parent, timeout=120)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].endswith("--ckpt-every -1: must be an integer >= 0")
    proc = subprocess.run([sys.executable, "-m", "lab.vit_runs", "--help"], capture_output=True, text=True,
                          cwd=Path(train_vit.__file__).parent, timeout=120)
    assert "--resume" in proc.stdout and "--lora-dropout" in proc.stdout and "python -m lab.vit_runs" in proc.stdout
    assert_every_flag_explained(proc.stdout, Config)  # train_vit.Config's flags too, with train_vit.py's help
