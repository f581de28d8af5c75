"""train_vit.py: data loaders against hand-written files, task transforms against index formulas,
resume == uninterrupted, DDP ranks == each other == one process, --init, and a real-data smoke run."""
import dataclasses
import gzip
import os
import pickle
import socket
import struct
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_vit
from lora import lora_state_dict
from train_vit import (Batches, Config, evaluate, finetune, get_lr, load_adapters, load_cifar10,
                       load_data, load_fashion_mnist, main, make_task, make_tasks, pretrain)
from utils import parse_config, write_safetensors

TINY = Config(dataset="synthetic", embed_dim=16, depth=2, num_heads=2, pretrain_steps=5, steps=6,
              batch_size=32, n_train=200, n_test=100, tasks="new5,rot90", warmup=2, log_every=3,
              ckpt_every=3, r=2, alpha=4.0, lr=1e-2, head="learned")


def tiny(tmp_path, **kw) -> Config:
    return dataclasses.replace(TINY, out_dir=str(tmp_path / "runs"), **kw)


def write_idx(path: Path, array: torch.Tensor) -> None:
    magic = 0x0800 | array.dim()  # unsigned bytes, ndim dimensions
    raw = struct.pack(">I", magic) + struct.pack(f">{array.dim()}I", *array.shape) + array.numpy().tobytes()
    with gzip.open(path, "wb") as f:
        f.write(raw)


def test_fashion_mnist_loader_reads_idx_files(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    arrays = {"train-images-idx3-ubyte": torch.randint(0, 256, (7, 28, 28), generator=g, dtype=torch.uint8),
              "train-labels-idx1-ubyte": torch.randint(0, 10, (7,), generator=g, dtype=torch.uint8),
              "t10k-images-idx3-ubyte": torch.randint(0, 256, (3, 28, 28), generator=g, dtype=torch.uint8),
              "t10k-labels-idx1-ubyte": torch.randint(0, 10, (3,), generator=g, dtype=torch.uint8)}
    for name, a in arrays.items():
        write_idx(tmp_path / f"{name}.gz", a)
    d = load_fashion_mnist(str(tmp_path))
    assert torch.equal(d["x_train"], arrays["train-images-idx3-ubyte"][:, None])
    assert torch.equal(d["y_test"], arrays["t10k-labels-idx1-ubyte"].long())
    # nothing anywhere: the message says how to get the files
    monkeypatch.setattr(train_vit, "DEBIAN_DIR", str(tmp_path / "no-debian"))
    monkeypatch.delenv("COTO_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path / "..")
    with pytest.raises(FileNotFoundError, match="apt install dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path / "empty"))


def test_cifar10_loader_reads_pickle_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = torch.randint(0, 256, (4, 3072), generator=g, dtype=torch.uint8)
        y = torch.randint(0, 10, (4,), generator=g)
        batches[name] = (x, y)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": x.numpy(), b"labels": y.tolist()}, f)
    d = load_cifar10(str(tmp_path))
    assert d["x_train"].shape == (20, 3, 32, 32)
    # channel-major rows: the first 1024 bytes of a row are the red plane
    assert torch.equal(d["x_train"][4, 0].flatten(), batches["data_batch_2"][0][0, :1024])
    assert torch.equal(d["y_test"], batches["test_batch"][1])


def test_tasks_match_index_formulas():
    data = load_data(Config(dataset="synthetic"))
    x, y = data["x_train"], data["y_train"]
    rot = make_task(data, "rot90", [0, 1, 2, 3, 4], 7)
    W = x.shape[-1]
    i, j = 3, 20  # counter-clockwise: out[i, j] = in[j, W - 1 - i]
    assert torch.equal(rot.x_train[:, 0, i, j], x[:, 0, j, W - 1 - i])
    assert torch.equal(make_task(data, "invert", [0], 7).x_train, 255 - x)
    new5 = make_task(data, "new5", [0, 1, 2, 3, 4], 7)
    assert torch.equal(new5.y_train, y[y >= 5] - 5) and torch.equal(new5.x_train, x[y >= 5])
    shuf = make_task(data, "shuffle", [0], 7)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1234))
    for t in range(16):  # tile t of the output is tile perm[t] of the input (row-major tiles)
        src = perm[t].item()
        assert torch.equal(shuf.x_train[:, :, 7 * (t // 4):7 * (t // 4) + 7, 7 * (t % 4):7 * (t % 4) + 7],
                           x[:, :, 7 * (src // 4):7 * (src // 4) + 7, 7 * (src % 4):7 * (src % 4) + 7])
    few = make_tasks(data, ["rot90"], [0], 7, n_per_class=3, seed=1)["rot90"]
    assert torch.equal(torch.bincount(few.y_train, minlength=10), torch.full((10,), 3))


def test_batches_are_epochs_and_resume():
    b = Batches(10, 4, seed=0)
    first = torch.cat([b.next() for _ in range(5)])  # 20 indices = two epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    state = b.state_dict()
    ahead = [b.next() for _ in range(3)]
    b2 = Batches(10, 4, seed=99)
    b2.load_state_dict(state)
    assert all(torch.equal(a, b2.next()) for a in ahead)


def test_lr_schedule_formula():
    assert get_lr(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert get_lr(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert get_lr(55, 100, 1.0, 10) == pytest.approx(0.5)  # halfway through the cosine
    assert get_lr(100, 100, 1.0, 10) == pytest.approx(0.0)


def _tiny_setup(cfg):
    data = load_data(cfg)
    backbone = pretrain(cfg, data)
    task = make_tasks(data, ["rot90"], [0, 1, 2, 3, 4], cfg.patch_size, cfg.n_train, cfg.n_test)["rot90"]
    return backbone, task


def test_resume_ends_exactly_where_an_uninterrupted_run_ends(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, lora_dropout=0.1, coto=True, head="probe_init")  # dropout: RNG state restored too
    backbone, task = _tiny_setup(cfg)
    probe_model = train_vit.build_model(cfg, task.x_train, 5)
    train_vit.load_pretrained(probe_model, backbone)
    probe, _ = train_vit.linear_probe(probe_model, task)
    full, m_full = finetune(cfg, task, backbone, probe, out_dir=tmp_path / "full")

    real_get_lr = train_vit.get_lr

    def crash_at_4(step, *a):
        if step == 4:
            raise KeyboardInterrupt  # as if the run were killed after the step-3 checkpoint
        return real_get_lr(step, *a)

    monkeypatch.setattr(train_vit, "get_lr", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, task, backbone, probe, out_dir=tmp_path / "cut")
    monkeypatch.setattr(train_vit, "get_lr", real_get_lr)
    resumed, m_res = finetune(dataclasses.replace(cfg, resume=True), task, backbone, probe, out_dir=tmp_path / "cut")
    a, b = lora_state_dict(full), lora_state_dict(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(full.head.weight, resumed.head.weight)
    assert m_full["acc"] == m_res["acc"]
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if k.endswith("lora_B"))


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
    model, _ = finetune(cfg, task, backbone)
    torch.save({"masks": masks, "lora": lora_state_dict(model)}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_gloo_ranks_agree_with_each_other_and_one_process(tmp_path):
    cfg = tiny(tmp_path, coto=True, steps=5)
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
    write_safetensors(src.state_dict(), tmp_path / "vit.safetensors")
    res = main(dataclasses.replace(cfg, init=str(tmp_path / "vit.safetensors")))
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
        main(dataclasses.replace(cfg, init=str(tmp_path / "deeper.pth")))


def test_pretrain_is_cached_by_config(tmp_path, monkeypatch):
    cfg = tiny(tmp_path)
    data = load_data(cfg)
    first = pretrain(cfg, data)
    monkeypatch.setattr(train_vit, "train_loop", lambda *a, **k: pytest.fail("pretrained again"))
    again = pretrain(cfg, data)
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(pytest.fail.Exception):  # another config is another backbone
        pretrain(dataclasses.replace(cfg, pretrain_lr=2e-3), data)


def test_cli_builds_the_config():
    cfg = parse_config(Config, ["--no-coto", "--steps", "7", "--variant", "dora", "--p0", "0.1", "--tasks", "rot90"])
    assert cfg == dataclasses.replace(Config(), coto=False, steps=7, variant="dora", p0=0.1, tasks="rot90")


def test_real_fashion_mnist_smoke(tmp_path):
    """Reads the Debian package's files (CI installs dataset-fashion-mnist), trains a few steps, and
    checks the saved adapters reproduce the reported accuracy."""
    data = load_fashion_mnist()
    assert data["x_train"].shape == (60000, 1, 28, 28)
    assert torch.equal(torch.bincount(data["y_test"]), torch.full((10,), 1000))  # balanced test split
    cfg = dataclasses.replace(tiny(tmp_path), dataset="fashion-mnist", tasks="invert", n_train=256, n_test=200,
                              compare=False, steps=4)
    res = main(cfg)
    run = res["runs"][0]
    task = make_tasks(data, ["invert"], [0, 1, 2, 3, 4], 7, 256, 200)["invert"]
    backbone = pretrain(cfg, data)
    folder = train_vit.run_dir(dataclasses.replace(cfg, seed=0), "invert")
    model = load_adapters(cfg, task, backbone, folder / "adapters.safetensors")
    assert evaluate(model, task.x_test, task.y_test)[0] == run["acc"]
