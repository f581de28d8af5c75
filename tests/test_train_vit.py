"""train_vit.py: data loaders against hand-written files, task transforms against index formulas, the backbone
file checked against the flags and the data, flags checked before any work, bf16 evaluation against float32, and
what the script prints (its tables against a direct computation); with lab.vit_runs, which pretrains the backbones:
their cache tied to what it depends on, DDP ranks == each other == one process, --init. The run folders
(checkpoints, resume, result files) are tested in tests/test_vit_runs.py."""
import dataclasses
import gzip
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_vit
from lora import lora_state_dict
from train_toy import parse_args
from lab import vit_report, vit_runs
from lab.vit_runs import pretrain
from train_vit import Batches, Config, evaluate, finetune, load_data, main, make_tasks

TINY = vit_runs.Config(embed_dim=16, depth=2, num_heads=2, pretrain_steps=5, steps=6, batch_size=32, n_train=200, n_test=100,
              tasks="new5,rot90", warmup=2, log_every=3, r=2, alpha=4.0, lr=1e-2, head="learned", seeds=1)


def write_idx(path: Path, array: torch.Tensor) -> None:
    magic = 0x0800 | array.dim()  # unsigned bytes, ndim dimensions
    raw = struct.pack(">I", magic) + struct.pack(f">{array.dim()}I", *array.shape) + array.numpy().tobytes()
    with gzip.open(path, "wb") as f:
        f.write(raw)


def fake_fashion(folder: Path, seed: int = 0, n_train: int = 600, n_test: int = 300) -> str:
    """Fashion-MNIST's four IDX files in `folder`, of a tiny 10-class set a few steps learn: class k is a bright
    square at place k, on noise. Returns the folder, for --data-dir."""
    g, corners = torch.Generator().manual_seed(seed), [(0, 0), (0, 7), (0, 14), (0, 21), (7, 0), (7, 14), (14, 7),
                                                       (14, 21), (21, 0), (21, 14)]
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = torch.randint(10, (n,), generator=g, dtype=torch.uint8)
        x = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
        for i, k in enumerate(y.tolist()):
            x[i, corners[k][0]:corners[k][0] + 7, corners[k][1]:corners[k][1] + 7] = 200
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", y)
    return str(folder)


def tiny(tmp_path, **kw) -> vit_runs.Config:
    """TINY (the lab's flags: pretraining too) on the fake Fashion-MNIST in tmp_path/data, writing into tmp_path/runs."""
    data_dir = fake_fashion(tmp_path / "data") if not (tmp_path / "data").is_dir() else str(tmp_path / "data")
    return vit_runs.Config(**{**dataclasses.asdict(TINY), "data_dir": data_dir, "out_dir": str(tmp_path / "runs"), **kw})


def classroom(cfg: vit_runs.Config, pretrained: bool = True) -> Config:
    """cfg's train_vit.py flags; --backbone the lab's pretraining of cfg (pretrained now unless told not to)."""
    if pretrained:
        pretrain(cfg, load_data(cfg))
    own = {f.name for f in dataclasses.fields(Config)}
    path = next(Path(cfg.out_dir).glob("pretrain-*/backbone.pt"), Path(cfg.out_dir) / "none.pt")
    return Config(**{**{k: v for k, v in dataclasses.asdict(cfg).items() if k in own}, "backbone": str(path)})


def test_fashion_mnist_loader_reads_idx_files(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    arrays = {"train-images-idx3-ubyte": torch.randint(0, 256, (7, 28, 28), generator=g, dtype=torch.uint8),
              "train-labels-idx1-ubyte": torch.randint(0, 10, (7,), generator=g, dtype=torch.uint8),
              "t10k-images-idx3-ubyte": torch.randint(0, 256, (3, 28, 28), generator=g, dtype=torch.uint8),
              "t10k-labels-idx1-ubyte": torch.randint(0, 10, (3,), generator=g, dtype=torch.uint8)}
    for name, a in arrays.items():
        write_idx(tmp_path / f"{name}.gz", a)
    d = load_data(Config(data_dir=str(tmp_path)))
    assert torch.equal(d["x_train"], arrays["train-images-idx3-ubyte"][:, None])
    assert torch.equal(d["y_test"], arrays["t10k-labels-idx1-ubyte"].long())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()  # not gzipped works too
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 0x801, 3) + arrays["t10k-labels-idx1-ubyte"].numpy().tobytes())
    assert torch.equal(load_data(Config(data_dir=str(tmp_path)))["y_test"], d["y_test"])
    # nothing anywhere: the message says how to get the files
    monkeypatch.setattr(train_vit, "DEBIAN_DIR", str(tmp_path / "no-debian"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(FileNotFoundError, match="apt install dataset-fashion-mnist"):
        load_data(Config())


def test_a_named_data_folder_is_the_only_one_searched(tmp_path, monkeypatch):
    """--data-dir that is missing or lacks the files stops the run, even when the files are in a folder
    that would be searched without it."""
    monkeypatch.chdir(fake_fashion(tmp_path / "cwd" / "data") and tmp_path / "cwd")  # ./data holds the files
    assert load_data(Config())["folder"] == "data"
    with pytest.raises(FileNotFoundError, match=r"--data-dir .*nowhere: no such folder"):
        load_data(Config(data_dir=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match=rf"(?s)not found .*in: {tmp_path}\."):
        load_data(Config(data_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match=r"--data-dir .*nowhere: no such folder"):
        vit_runs.load_data(vit_runs.Config(dataset="cifar10", patch_size=4, data_dir=str(tmp_path / "nowhere")))
    # checked with the other flags, before any data is read
    monkeypatch.setattr(train_vit, "load_data", lambda c: pytest.fail("read the data before checking the flags"))
    with pytest.raises(FileNotFoundError, match="--data-dir .*nowhere: no such folder"):
        main(classroom(tiny(tmp_path, data_dir=str(tmp_path / "nowhere")), pretrained=False))


def test_cifar10_loader_reads_the_binary_batches(tmp_path):
    """Records of 1 label byte + 3072 pixel bytes, the red plane first; a damaged batch is refused by name."""
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    g, batches = torch.Generator().manual_seed(0), {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        x = torch.randint(0, 256, (4, 3072), generator=g, dtype=torch.uint8)
        y = torch.randint(0, 10, (4,), generator=g, dtype=torch.uint8)
        batches[name] = (x, y)
        (folder / name).write_bytes(torch.cat([y[:, None], x], 1).numpy().tobytes())
    d = vit_runs.load_data(vit_runs.Config(dataset="cifar10", patch_size=4, data_dir=str(tmp_path)))
    assert d["x_train"].shape == (20, 3, 32, 32) and d["x_test"].shape == (4, 3, 32, 32)
    assert torch.equal(d["x_train"][4, 0].flatten(), batches["data_batch_2.bin"][0][0, :1024])  # red plane
    assert torch.equal(d["x_train"][5, 2, 31], batches["data_batch_2.bin"][0][1, -32:])  # blue plane's last row
    assert torch.equal(d["y_test"], batches["test_batch.bin"][1].long())
    (folder / "test_batch.bin").write_bytes((folder / "test_batch.bin").read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"cifar-10-batches-bin: test_batch.bin is not records of 1 label \+ 3072"):
        vit_runs.load_data(vit_runs.Config(dataset="cifar10", patch_size=4, data_dir=str(tmp_path)))


def test_tasks_match_index_formulas(tmp_path):
    data = load_data(Config(data_dir=fake_fashion(tmp_path)))
    x, y = data["x_train"], data["y_train"]
    tasks = make_tasks(data, ["new5", "rot90", "invert", "shuffle"], [0, 1, 2, 3, 4], 7, seed=3)
    idx = torch.randperm(600, generator=torch.Generator().manual_seed(3))  # the order of seed 3's subset
    rot, W = tasks["rot90"], x.shape[-1]
    i, j = 3, 20  # counter-clockwise: out[i, j] = in[j, W - 1 - i]
    assert torch.equal(rot.x_train[:, 0, i, j], x[idx, 0, j, W - 1 - i]) and torch.equal(rot.y_train, y[idx])
    assert torch.equal(tasks["invert"].x_train, 255 - x[idx])
    members = (y >= 5).nonzero().flatten()
    members = members[torch.randperm(len(members), generator=torch.Generator().manual_seed(3))]
    assert torch.equal(tasks["new5"].y_train, y[members] - 5) and torch.equal(tasks["new5"].x_train, x[members])
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1234))
    for t in range(16):  # tile t of the output is tile perm[t] of the input (row-major tiles)
        src = perm[t].item()
        assert torch.equal(tasks["shuffle"].x_train[:, :, 7 * (t // 4):7 * (t // 4) + 7, 7 * (t % 4):7 * (t % 4) + 7],
                           x[idx, :, 7 * (src // 4):7 * (src // 4) + 7, 7 * (src % 4):7 * (src % 4) + 7])
    few = make_tasks(data, ["rot90"], [0], 7, n_per_class=3, seed=1)["rot90"]
    assert torch.equal(torch.bincount(few.y_train, minlength=10), torch.full((10,), 3))
    with pytest.raises(ValueError, match="--n-per-class 500: class .* has only"):
        make_tasks(data, ["rot90"], [0], 7, n_per_class=500)


def test_batches_are_epochs_and_resume_from_their_generator_and_queue():
    b = Batches(10, 4, seed=0)
    first = torch.cat([b.next() for _ in range(5)])  # 20 indices = two epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    state, queue = b.generator.get_state(), b.queue.clone()  # what a checkpoint keeps (lab.vit_runs)
    ahead = [b.next() for _ in range(3)]
    b2 = Batches(10, 4, seed=99)
    b2.generator.set_state(state)
    b2.queue = queue
    assert all(torch.equal(a, b2.next()) for a in ahead)


def run_dir(cfg: Config, task: str) -> Path:
    """Where lab.vit_runs puts cfg's run of `task`: under the backbone made from cfg's data."""
    return vit_runs.run_dir(cfg, vit_runs.backbone_key(cfg, vit_runs.load_data(cfg)), task)


def _tiny_setup(cfg):
    data = load_data(cfg)
    backbone = pretrain(cfg, data)
    task = make_tasks(data, ["rot90"], [0, 1, 2, 3, 4], cfg.patch_size, cfg.n_train, cfg.n_test)["rot90"]
    return backbone, task


def test_task_init_gives_each_task_its_own_adapter_init(tmp_path, monkeypatch):
    """Without task_init a seed's tasks of one shape (10 classes) start from one A; with it each
    task draws its own, the same on every call."""
    monkeypatch.setattr(train_vit, "train_loop", lambda *a, **kw: {})  # the initial adapters only
    cfg = tiny(tmp_path, seed=3)
    data = load_data(cfg)
    backbone = pretrain(cfg, data)
    tasks = make_tasks(data, ["rot90", "invert"], [0, 1, 2, 3, 4], cfg.patch_size, cfg.n_train, cfg.n_test)

    def a_matrices(task_init: bool, name: str) -> list:
        model, _ = finetune(dataclasses.replace(cfg, task_init=task_init), tasks[name], backbone)
        return [v for k, v in lora_state_dict(model).items() if k.endswith("lora_A")]
    shared = {name: a_matrices(False, name) for name in tasks}
    own = {name: a_matrices(True, name) for name in tasks}
    assert all(torch.equal(a, b) for a, b in zip(shared["invert"], shared["rot90"]))
    assert not any(torch.equal(a, b) for a, b in zip(own["invert"], own["rot90"]))
    assert all(torch.equal(a, b) for a, b in zip(own["rot90"], a_matrices(True, "rot90")))
    assert not torch.equal(own["rot90"][0], shared["rot90"][0])


def test_a_damaged_cached_backbone_is_pretrained_again(tmp_path, capsys):
    cfg = tiny(tmp_path, device="cpu")  # pretrained twice: bit-identical on the CPU
    data = load_data(cfg)
    backbone = pretrain(cfg, data)
    cached = next((tmp_path / "runs").glob("pretrain-*/backbone.pt"))
    cached.write_bytes(cached.read_bytes()[:-50])  # cut short
    again = pretrain(cfg, data)  # not reused: trained again, the same backbone (same seed)
    assert f"{cached} is damaged" in capsys.readouterr().out
    assert all(torch.equal(backbone[k], again[k]) for k in backbone)
    assert torch.load(cached, weights_only=True)["state"].keys() == backbone.keys()


def _ddp_worker(rank, world, port, cfg, backbone, task, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    masks = []

    class RecordingCoTo(train_vit.CoTo):
        def step(self, t):
            masks.append(super().step(t).clone())
            return self.mask

    train_vit.CoTo = RecordingCoTo
    model, _ = finetune(cfg, task, backbone, run=vit_runs.Ranks())
    torch.save({"masks": masks, "lora": lora_state_dict(model)}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_gloo_ranks_agree_with_each_other_and_one_process(tmp_path):
    cfg = tiny(tmp_path, coto=True, steps=5, device="cpu")  # gloo ranks and the reference alike
    backbone, task = _tiny_setup(cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, cfg, backbone, task, tmp_path), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(r0["masks"], r1["masks"])) and len(r0["masks"]) == 5
    assert not all(m.all() for m in r0["masks"])  # p0 = 0: some adapters were bypassed
    for k in r0["lora"]:
        assert torch.equal(r0["lora"][k], r1["lora"][k]), k
    single, _ = finetune(cfg, task, backbone)  # the same global batches in one process
    for k, v in lora_state_dict(single).items():
        torch.testing.assert_close(r0["lora"][k], v, rtol=1e-4, atol=1e-5)


def test_init_from_timm_file_and_wrong_file(tmp_path):
    cfg = tiny(tmp_path, tasks="new5", seeds=1, compare=False, coto=False, steps=3)
    from vit import VisionTransformer
    src = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=1000, embed_dim=16, depth=2,
                            num_heads=2)
    torch.save(src.state_dict(), tmp_path / "vit.pt")
    res = vit_runs.main(dataclasses.replace(cfg, init=str(tmp_path / "vit.pt")))
    assert not list((tmp_path / "runs").glob("pretrain-*"))  # no pretraining: the file is the backbone
    # the probe saw exactly the file's backbone: refit it by hand and compare
    data = load_data(cfg)
    task = make_tasks(data, ["new5"], [0, 1, 2, 3, 4], 7, cfg.n_train, cfg.n_test)["new5"]
    _, acc = train_vit.linear_probe(src, task)
    assert res["probe"]["new5"] == acc
    deeper = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=5, embed_dim=16, depth=3,
                               num_heads=2)
    torch.save(deeper.state_dict(), tmp_path / "deeper.pth")
    with pytest.raises(ValueError, match=r"(?s)deeper\.pth.*unexpected keys \(12\): blocks\.2\.norm1\.weight"):
        vit_runs.main(dataclasses.replace(cfg, init=str(tmp_path / "deeper.pth")))
    (tmp_path / "vit.safetensors").write_bytes(b"\x08" + bytes(15))  # not a torch file: says how to convert one
    with pytest.raises(ValueError, match=r"--init .*vit\.safetensors: .*python -m lab\.vit_weights"):
        vit_runs.main(dataclasses.replace(cfg, init=str(tmp_path / "vit.safetensors")))


def test_pretrain_is_cached_by_exactly_what_it_depends_on(tmp_path, monkeypatch):
    cfg = tiny(tmp_path)
    data = load_data(cfg)
    first = pretrain(cfg, data)
    monkeypatch.setattr(train_vit, "train_loop", lambda *a, **k: pytest.fail("pretrained again"))
    # fine-tuning settings do not touch the backbone
    again = pretrain(dataclasses.replace(cfg, batch_size=64, weight_decay=0.1, warmup=5, lr=1.0, seed=3, r=8), data)
    assert all(torch.equal(first[k], again[k]) for k in first)
    for change in ({"pretrain_lr": 2e-3}, {"pretrain_batch_size": 16}, {"pretrain_warmup": 1}, {"pretrain_seed": 1}):
        with pytest.raises(pytest.fail.Exception):  # another pretraining setting is another backbone
            pretrain(dataclasses.replace(cfg, **change), data)


def test_cli_builds_the_config():
    argv = ["--no-coto", "--steps", "7", "--variant", "dora", "--p0", "0.1", "--tasks", "rot90"]
    cfg = parse_args(Config, "", "", argv)
    assert cfg == dataclasses.replace(Config(), coto=False, steps=7, variant="dora", p0=0.1, tasks="rot90")


@pytest.mark.parametrize("flags, message", [
    (dict(tasks="rot90,rot91"), "--tasks 'rot90,rot91': unknown task 'rot91'; choose from new5, rot90, invert, shuffle"),
    (dict(head="probes"), "--head 'probes': choose probe_init, learned, probe"),
    (dict(source_classes="0-x"), "--source-classes '0-x': write classes 0..9"),
    (dict(source_classes="0-12"), "--source-classes '0-12': write classes 0..9"),
    (dict(source_classes="0-9"), "leaving some for new5"), (dict(r=0), "--r 0: must be an integer >= 1"),
    (dict(lr=float("nan")), "--lr nan: must be > 0"), (dict(lr=-1.0), "--lr -1.0: must be > 0"),
    (dict(weight_decay=-0.1), "--weight-decay -0.1: must be >= 0"), (dict(mlp_ratio=0.0), "--mlp-ratio 0.0: must be > 0"),
    (dict(batch_size=0), "--batch-size 0: must be an integer >= 1"), (dict(warmup=-3), "--warmup -3: must be an integer >= 0"),
    (dict(log_every=-2), "--log-every -2: must be"), (dict(n_train=-5), "--n-train -5: must be"),
    (dict(n_test=-1), "--n-test -1: must be"), (dict(n_per_class=-2), "--n-per-class -2: must be"),
    (dict(out_dir=""), "--out-dir '': name a folder")])
def test_every_flag_is_checked_when_the_config_is_made(flags, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(Config(), **flags)


@pytest.mark.parametrize("flags, message", [
    (dict(variant="lorra"), "unknown variant 'lorra': choose one of lora, dora, hira"),
    (dict(shape="cosine"), "unknown shape 'cosine'"), (dict(r=17), "rank r=17 must be an integer in 1..16"),
    (dict(alpha=0.0), "alpha=0.0 must be a finite number > 0"), (dict(lora_dropout=1.0), "dropout=1.0 must be"),
    (dict(targets="qkv,fc3"), r"targets \['fc3'\] match no nn.Linear; the linear layers are: blocks.0.attn.qkv"),
    (dict(p0=1.5), "p0=1.5 and stage1_ratio=0.75 must both be in"), (dict(num_heads=5), "not divisible by num_heads 5"),
    (dict(patch_size=5), "img_size 28 is not a multiple of patch_size 5")])
def test_what_lora_coto_and_the_vit_refuse_stops_the_job_before_any_work(tmp_path, monkeypatch, flags, message):
    """The flags lora.py, coto.py and vit.py check themselves: their messages, before the backbone is read (or, in
    the lab, pretrained)."""
    with pytest.raises(ValueError, match=message):
        main(classroom(tiny(tmp_path, **flags), pretrained=False), backbone=lambda *a: pytest.fail("read the backbone"))
    monkeypatch.setattr(vit_runs, "pretrain", lambda *a: pytest.fail("pretrained before checking the flags"))
    with pytest.raises(ValueError, match=message):
        vit_runs.main(tiny(tmp_path, **flags))


def test_lab_flags_are_checked_when_the_config_is_made():
    for flags, message in ((dict(dataset="mnist"), "--dataset 'mnist': choose fashion-mnist, cifar10"),
                           (dict(progressive_dropout=True), "--progressive-dropout decays --lora-dropout to 0"),
                           (dict(eval_every=-1), "--eval-every -1: must be an integer >= 0"),
                           (dict(ckpt_every=-1), "--ckpt-every -1: must be an integer >= 0"),
                           (dict(pretrain_steps=0), "--pretrain-steps 0: must be an integer >= 1"),
                           (dict(pretrain_lr=float("nan")), "--pretrain-lr nan: must be > 0"),
                           (dict(backbone="x.pt"), "--backbone is train_vit.py's: lab.vit_runs pretrains")):
        with pytest.raises(ValueError, match=message):
            vit_runs.Config(**flags)


def test_bad_flags_and_places_stop_before_any_data_is_read_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(train_vit, "load_data", lambda c: pytest.fail("read the data before checking the flags"))
    with pytest.raises(ValueError, match="--out-dir .*a-file/runs: cannot write there"):
        main(dataclasses.replace(TINY, out_dir=str(tmp_path / "a-file" / "runs")))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: not a device this torch has here"):
            main(tiny(tmp_path, device="cuda"))
    monkeypatch.setattr(vit_runs, "load_data", lambda c: pytest.fail("read the data before checking the flags"))
    with pytest.raises(FileNotFoundError, match="--init .*nope.pt: no such file"):
        vit_runs.main(tiny(tmp_path, init=str(tmp_path / "nope.pt")))
    for argv, says in ((["--tasks", "rot91"], "--tasks 'rot91': unknown task 'rot91'; choose from new5, rot90, invert, "
                                              "shuffle"), (["--batch-size", "0"], "--batch-size 0: must be an integer >= 1")):
        proc = subprocess.run([sys.executable, "train_vit.py", *argv, "--out-dir", str(tmp_path)], capture_output=True,
                              text=True, cwd=Path(train_vit.__file__).parent, timeout=120)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.splitlines()[-1] == f"train_vit.py: error: {says}"
    proc = subprocess.run([sys.executable, "train_vit.py", "--device", "cuda" if not torch.cuda.is_available() else "mps",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True,
                          cwd=Path(train_vit.__file__).parent, timeout=120)
    assert proc.returncode == 1 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1  # no traceback


def test_main_tiny_says_what_it_did(tmp_path, device, capsys):
    cfg = classroom(tiny(tmp_path, tasks="rot90", device=str(device)))
    capsys.readouterr()
    res = main(cfg)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"output: {cfg.out_dir}", f"data: fashion-mnist from {cfg.data_dir}"]
    assert lines[-1] == f"wrote {cfg.out_dir}/results.json (its figure: python -m lab.vit_report {cfg.out_dir})"
    assert any(line.startswith("rot90 coto s0 | step 3 | loss") for line in lines)
    # the table: probe, both methods, their difference; then ms/step with the warm-up steps apart
    lora, coto = (100 * r["acc"] for r in res["runs"])
    assert f"| rot90 | {100 * res['probe']['rot90']:.1f} | {lora:.1f} | {coto:.1f} | {coto - lora:.1f} |" in lines
    assert any(line.startswith("coto: ") and " ms/step (steady state) + " in line for line in lines)
    assert [r["method"] for r in res["runs"]] == ["lora", "coto"]
    assert "seed interpolation needs two seeds' runs: run with --seeds 2 (or more)" in lines
    # files: results.json beside the backbone (the lab's), nothing per run (that is lab.vit_runs')
    assert sorted(str(f.relative_to(tmp_path / "runs")) for f in (tmp_path / "runs").rglob("*") if f.is_file()) == \
        sorted(["results.json", str(next((tmp_path / "runs").glob("pretrain-*/backbone.pt")).relative_to(tmp_path / "runs"))])
    assert json.loads((tmp_path / "runs" / "results.json").read_text())["runs"] == json.loads(json.dumps(res["runs"]))
    proc = subprocess.run([sys.executable, "-m", "lab.vit_report", cfg.out_dir], capture_output=True, text=True,
                          cwd=Path(train_vit.__file__).parent, timeout=120)  # the job's figure, from results.json
    assert proc.returncode == 0 and (tmp_path / "runs" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_prints_the_robustness_numbers_of_a_direct_computation(tmp_path, capsys):
    """Rebuilt by hand from the saved files (lab.vit_runs writes them; its tables are main()'s): every other
    block (depth 2: block 1's lora_B zeroed, so its delta W is 0) and the two seeds' lora_A, lora_B and head
    averaged, each evaluated as a model."""
    # trained long enough that the adapters decide the predictions (tiny's 6 steps stay at chance)
    cfg = tiny(tmp_path, tasks="rot90", seeds=2, device="cpu", pretrain_steps=200, steps=20, n_train=600, n_test=300)
    res = vit_runs.main(cfg)
    lines = capsys.readouterr().out.splitlines()
    backbone, task = _tiny_setup(cfg)

    def acc_of(state):  # 100 * test accuracy of a model loaded from `state`
        torch.save({"state": state, "metadata": metadata}, tmp_path / "state.pt")
        model = vit_runs.load_adapters(cfg, task, backbone, tmp_path / "state.pt")
        return 100 * evaluate(model, task.x_test, task.y_test)[0]

    every_other, interp = {}, {}
    for method, coto in (("lora", False), ("coto", True)):
        saved = [torch.load(run_dir(dataclasses.replace(cfg, coto=coto, seed=s), "rot90") / "adapters.pt")
                 for s in (0, 1)]
        metadata, (a, b) = saved[0]["metadata"], (f["state"] for f in saved)
        every_other[method] = [acc_of({k: torch.zeros_like(v) if k.startswith("blocks.1.") and k.endswith("lora_B")
                                       else v for k, v in s.items()}) for s in (a, b)]
        assert every_other[method] != [100 * r["acc"] for r in res["runs"] if r["method"] == method]  # it did prune
        interp[method] = acc_of({k: (a[k] + b[k]) / 2 for k in a})
    assert [100 * r["acc"] for r in res["robustness"]["every_other"]] == \
        [every_other[m][s] for s in (0, 1) for m in ("lora", "coto")]
    assert [(r["seed"], 100 * r["acc"]) for r in res["robustness"]["interp"]] == \
        [("0+1", interp["lora"]), ("0+1", interp["coto"])]
    probe = 100 * res["probe"]["rot90"]
    cell = lambda v: f"{statistics.fmean(v):.1f} ± {statistics.stdev(v):.1f}"  # noqa: E731
    lo, co = every_other["lora"], every_other["coto"]
    at = lines.index("only every other block's adapters on (blocks 0, 2, ...), test accuracy in %, seeds 0, 1: "
                     "mean ± std")
    assert lines[at + 3] == f"| rot90 | {probe:.1f} | {cell(lo)} | {cell(co)} | " \
                            f"{co[0] - lo[0]:.1f} {co[1] - lo[1]:.1f} |"
    at = lines.index("two seeds' adapters interpolated at lambda 0.5 (every adapter tensor and the head averaged), "
                     "test accuracy in %, seed 0+1")
    assert lines[at + 3] == f"| rot90 | {probe:.1f} | {interp['lora']:.1f} | {interp['coto']:.1f} | " \
                            f"{interp['coto'] - interp['lora']:.1f} |"
    assert json.loads((tmp_path / "runs" / "results.json").read_text())["robustness"] == res["robustness"]


def test_the_lab_under_torchrun_closes_its_process_group(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)  # what torchrun --nproc_per_node 1 sets
    seen = []
    monkeypatch.setattr(train_vit, "main", lambda *a, **k: seen.append(dist.get_world_size()))
    vit_runs.main(tiny(tmp_path, device="cpu"))
    assert seen == [1] and not dist.is_initialized()


def test_bf16_autocast_evaluation_matches_float32(tmp_path, device, monkeypatch):
    """evaluate() under bf16 autocast (what CUDA runs) against float32 on the same device: bf16
    keeps 8 bits of mantissa, so a few near-tie predictions may flip; at most 2 % of them, and the
    mean loss within 2 %."""
    cfg = tiny(tmp_path, device=str(device), pretrain_steps=200, steps=20, n_train=600, n_test=300)
    backbone, task = _tiny_setup(cfg)
    model, _ = finetune(cfg, task, backbone)
    monkeypatch.setattr(train_vit, "autocast", lambda d: nullcontext())
    acc32, loss32 = evaluate(model, task.x_test, task.y_test)
    monkeypatch.setattr(train_vit, "autocast", lambda d: torch.autocast(d.type, dtype=torch.bfloat16))
    acc16, loss16 = evaluate(model, task.x_test, task.y_test)
    assert abs(acc16 - acc32) <= 0.02 and abs(loss16 - loss32) <= 0.02 * loss32
    assert acc32 > 0.5  # a trained model, not chance (0.1)


def test_plot_results_draws_the_seed_means_and_spreads(tmp_path):
    """The figure's bars are the mean over seeds and their standard deviation (n - 1), the "mean" row
    averages the tasks seed by seed; the curves average the seeds' records; p(t) is coto_prob."""
    def run(task, method, seed, acc, losses):
        return {"task": task, "method": method, "seed": seed, "acc": acc,
                "history": [{"step": 5 * (i + 1), "loss": v} for i, v in enumerate(losses)]}

    results = {"probe": {"rot90": 0.60, "invert": 0.50}, "runs": [
        run("rot90", "lora", 0, 0.90, [2.0, 1.0]), run("rot90", "coto", 0, 0.88, [2.2, 1.2]),
        run("rot90", "lora", 1, 0.92, [1.8, 0.8]), run("rot90", "coto", 1, 0.86, [2.4, 1.0]),
        run("invert", "lora", 0, 0.80, [1.0, 0.5]), run("invert", "coto", 0, 0.84, [1.1, 0.7]),
        run("invert", "lora", 1, 0.82, [1.2, 0.5]), run("invert", "coto", 1, 0.80, [1.3, 0.9])]}
    cfg = vit_runs.Config(**{**dataclasses.asdict(TINY), "steps": 10, "p0": 0.1})
    path = tmp_path / "results.png"
    drawn = vit_report.plot_results(results, cfg, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn["rows"] == ["rot90", "invert", "mean"]
    assert drawn["acc"]["linear probe"] == pytest.approx([60.0, 50.0, 55.0])
    assert drawn["acc"]["lora"] == pytest.approx([91.0, 81.0, 86.0])
    assert drawn["acc"]["coto"] == pytest.approx([87.0, 82.0, 84.5])
    # seed 0's task mean 85 (lora) / 86 (coto), seed 1's 87 / 83: std = |a - b| / sqrt(2)
    assert drawn["err"]["lora"] == pytest.approx([2 / 2 ** 0.5, 2 / 2 ** 0.5, 2 / 2 ** 0.5])
    assert drawn["err"]["coto"] == pytest.approx([2 / 2 ** 0.5, 4 / 2 ** 0.5, 3 / 2 ** 0.5])
    assert drawn["curves"]["rot90"]["coto"] == ([5, 10], pytest.approx([2.3, 1.1]))
    assert drawn["curves"]["invert"]["lora"] == ([5, 10], pytest.approx([1.1, 0.5]))
    assert drawn["p"][0] == list(range(11))
    assert drawn["p"][1] == pytest.approx([min(0.1 + 0.9 * t / 8, 1.0) for t in range(11)])  # ceil(0.75 * 10) = 8


def test_the_shipped_backbone_is_what_the_default_flags_pretrain_on_fashion_mnist():
    """runs/vit holds the backbone of the default flags (so that the main job starts at the probes): it must sit
    under those flags' and the real data's key, else the job pretrains again; its source accuracy as recorded."""
    if not Path(train_vit.DEBIAN_DIR, "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST is not in {train_vit.DEBIAN_DIR}: sudo apt install dataset-fashion-mnist")
    cfg = vit_runs.Config(data_dir=train_vit.DEBIAN_DIR)
    data = load_data(cfg)
    path = Path(train_vit.__file__).parent / cfg.out_dir / vit_runs.backbone_key(cfg, data) / "backbone.pt"
    assert path == Path(train_vit.__file__).parent / Config().backbone  # train_vit.py's default is the lab's cache
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["config"] == {**{f: getattr(cfg, f) for f in vit_runs.PRETRAIN_FIELDS}, "data_sha1": data["sha1"]}
    model = train_vit.build_model(cfg, data["x_train"], 5)
    model.load_state_dict(saved["state"])  # every key and shape
    source = data["y_test"] < 5  # classes 0-4, labels unchanged
    acc, _ = evaluate(model, data["x_test"][source], data["y_test"][source])
    assert abs(acc - saved["source_acc"]) < 0.005 and saved["source_acc"] > 0.85  # other CPUs: a near tie may flip


def test_a_backbone_of_other_flags_or_data_is_refused_by_name(tmp_path):
    cfg = classroom(tiny(tmp_path))
    data = load_data(cfg)
    saved = torch.load(cfg.backbone, weights_only=True)
    loaded = train_vit.load_backbone(cfg, data)
    assert loaded.keys() == saved["state"].keys() and all(torch.equal(loaded[k], saved["state"][k]) for k in loaded)
    with pytest.raises(ValueError, match=r"was pretrained with depth=2 \(this run: 3\): .*python -m lab\.vit_runs"):
        train_vit.load_backbone(dataclasses.replace(cfg, depth=3), data)
    other = load_data(dataclasses.replace(cfg, data_dir=fake_fashion(tmp_path / "other", seed=1)))
    with pytest.raises(ValueError, match=rf"data_sha1={data['sha1']} \(this run: {other['sha1']}\)"):
        train_vit.load_backbone(cfg, other)
    with pytest.raises(FileNotFoundError, match=r"--backbone .*none\.pt: no such file; python -m lab\.vit_runs"):
        train_vit.load_backbone(dataclasses.replace(cfg, backbone=str(tmp_path / "none.pt")), data)
