"""train_vit.py: data loaders against hand-written files (and a CIFAR batch that would run code),
task transforms against index formulas, resume == uninterrupted (weights and report files), runs
tied to their configuration, damaged files, divergence, DDP ranks == each other == one process,
--init, bf16 evaluation against float32, what the script prints, and a real-data smoke run."""
import dataclasses
import gzip
import io
import json
import os
import pickle
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
from train_vit import (Batches, Config, evaluate, finetune, load_adapters, load_cifar10,
                       load_data, load_fashion_mnist, main, make_task, make_tasks, pretrain)
from lab.utils import parse_config, write_safetensors

TINY = Config(dataset="synthetic", embed_dim=16, depth=2, num_heads=2, pretrain_steps=5, steps=6,
              batch_size=32, n_train=200, n_test=100, tasks="new5,rot90", warmup=2, log_every=3,
              ckpt_every=3, r=2, alpha=4.0, lr=1e-2, head="learned", plot=False, seeds=1)


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
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(FileNotFoundError, match="apt install dataset-fashion-mnist"):
        load_fashion_mnist()


def test_a_named_data_folder_is_the_only_one_searched(tmp_path, monkeypatch):
    """--data-dir (or $COTO_DATA_DIR) that is missing or lacks the files stops the run, even when
    the files are in a folder that would be searched without it."""
    monkeypatch.setenv("COTO_DATA_DIR", train_vit.DEBIAN_DIR)  # holds the files where installed
    with pytest.raises(FileNotFoundError, match=r"--data-dir .*nowhere: no such folder"):
        load_fashion_mnist(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=rf"(?s)not found .*in: {tmp_path}\)"):
        load_fashion_mnist(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"--data-dir .*nowhere: no such folder"):
        load_cifar10(str(tmp_path / "nowhere"))
    monkeypatch.setenv("COTO_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match=r"\$COTO_DATA_DIR .*gone: no such folder"):
        load_fashion_mnist()
    # checked with the other flags, before any data is read
    with pytest.raises(FileNotFoundError, match="--data-dir .*nowhere: no such folder"):
        main(tiny(tmp_path, data_dir=str(tmp_path / "nowhere")))


class Python2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2 pickled its str (BINSTRING), as CIFAR-10's files were written;
    Python 3's protocol 2 would call _codecs.encode instead."""
    dispatch = pickle._Pickler.dispatch.copy()

    def save_str2(self, obj: bytes) -> None:
        self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj if len(obj) < 256
                   else pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_str2


def python2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Python2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_cifar_batch(path: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    """A batch as CIFAR-10's files hold it: protocol 2 from Python 2, numpy.core names."""
    raw = python2_pickle({b"batch_label": b"batch", b"labels": y.tolist(), b"data": x.numpy(),
                          b"filenames": [b"x.png"] * len(y)})
    path.write_bytes(raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def test_cifar10_loader_reads_pickle_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = torch.randint(0, 256, (4, 3072), generator=g, dtype=torch.uint8)
        y = torch.randint(0, 10, (4,), generator=g)
        batches[name] = (x, y)
        write_cifar_batch(folder / name, x, y)
    assert b"cnumpy.core.multiarray\n_reconstruct" in (folder / "test_batch").read_bytes()
    d = load_cifar10(str(tmp_path))
    assert d["x_train"].shape == (20, 3, 32, 32)
    # channel-major rows: the first 1024 bytes of a row are the red plane
    assert torch.equal(d["x_train"][4, 0].flatten(), batches["data_batch_2"][0][0, :1024])
    assert torch.equal(d["y_test"], batches["test_batch"][1])


class MakesAMarker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):  # what a crafted file does: call any function while loading
        return open, (self.path, "w")


def test_cifar10_loader_refuses_a_batch_that_would_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", torch.zeros(2, 3072, dtype=torch.uint8), torch.zeros(2))
    marker = tmp_path / "marker"
    evil = python2_pickle({b"data": MakesAMarker(marker), b"labels": [0]})
    (folder / "test_batch").write_bytes(evil)
    with pytest.raises(ValueError, match=r"test_batch is not a CIFAR-10 batch \(it refers to .*open"):
        load_cifar10(str(tmp_path))
    assert not marker.exists()
    pickle.loads(evil)  # the file is a real attack: plain pickle runs it
    assert marker.exists()


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
    state = b.get_state()
    ahead = [b.next() for _ in range(3)]
    b2 = Batches(10, 4, seed=99)
    b2.set_state(state)
    assert all(torch.equal(a, b2.next()) for a in ahead)


def _tiny_setup(cfg):
    data = load_data(cfg)
    backbone = pretrain(cfg, data)
    task = make_tasks(data, ["rot90"], [0, 1, 2, 3, 4], cfg.patch_size, cfg.n_train, cfg.n_test)["rot90"]
    return backbone, task


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


def test_resume_with_other_settings_is_an_error(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, tasks="rot90", compare=False)
    first = main(cfg)
    # finished runs: skipped when unchanged (nothing retrained), an error naming the fields when not
    monkeypatch.setattr(train_vit, "finetune", lambda *a, **k: pytest.fail("retrained a finished run"))
    again = main(dataclasses.replace(cfg, resume=True, log_every=1))  # logging is not part of the result
    assert [{k: v for k, v in r.items() if k != "config"} for r in again["runs"]] == first["runs"]
    monkeypatch.setattr(train_vit, "load_data", lambda c: pytest.fail("read the data before checking the flags"))
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


def test_damaged_checkpoint_and_cached_backbone(tmp_path, capsys, monkeypatch):
    cfg = tiny(tmp_path, steps=4, device="cpu")  # pretrained twice: bit-identical on the CPU
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
    cached = next((tmp_path / "runs").glob("pretrain-*/backbone.safetensors"))
    cached.write_bytes(cached.read_bytes()[:-50])
    data = load_data(cfg)
    again = pretrain(cfg, data)  # not reused: trained again, the same backbone (same seed)
    assert f"{cached}" in capsys.readouterr().out
    assert all(torch.equal(backbone[k], again[k]) for k in backbone)
    assert train_vit.read_safetensors(cached).keys() == backbone.keys()


def test_a_diverging_run_stops_at_its_first_nan_and_keeps_the_last_checkpoint(tmp_path):
    """lr 1e4: the step-3 gradient is NaN while its loss is finite (a bypassed block hides it)."""
    cfg = tiny(tmp_path, lr=1e4, steps=8, ckpt_every=2, log_every=1, device="cpu")  # where it diverges: float32
    backbone, task = _tiny_setup(cfg)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"rot90 coto s0: at step 3 the loss is .* and the gradient norm nan: "
                                                 r"training diverged\. Rerun with a lower learning rate"):
        finetune(cfg, task, backbone, out_dir=out)
    assert sorted(f.name for f in out.iterdir()) == ["ckpt.pt", "metrics.jsonl"]  # no adapters, no result
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 2 and all(torch.isfinite(t).all() for t in ck["trainable"].values())
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


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
    cfg = parse_config(Config, ["--no-coto", "--steps", "7", "--variant", "dora", "--p0", "0.1", "--tasks", "rot90"])
    assert cfg == dataclasses.replace(Config(), coto=False, steps=7, variant="dora", p0=0.1, tasks="rot90")


def test_bad_flags_stop_before_any_data_is_read_in_one_line(tmp_path):
    for flags, message in ((dict(variant="lorra"), "--variant 'lorra': choose lora, dora or hira"),
                           (dict(tasks="rot90,rot91"), "--tasks 'rot90,rot91': unknown task 'rot91'"),
                           (dict(head="probes"), "--head 'probes'"), (dict(shape="cosine"), "--shape 'cosine'"),
                           (dict(source_classes="0-x"), "--source-classes '0-x'")):
        with pytest.raises(ValueError, match=message):
            train_vit.check_config(dataclasses.replace(Config(), **flags))
    proc = subprocess.run([sys.executable, "train_vit.py", "--tasks", "rot91", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=Path(train_vit.__file__).parent, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == "train_vit.py: error: --tasks 'rot91': unknown task 'rot91'; choose from " \
                          "new5, rot90, invert, shuffle, coarse\n"


def test_main_tiny_says_what_it_did(tmp_path, device, capsys):
    cfg = tiny(tmp_path, tasks="rot90", device=str(device), plot=True)
    res = main(cfg)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"output: {cfg.out_dir}", "data: synthetic from (generated)"]
    assert lines[-1].startswith(f"wrote {cfg.out_dir}/results.json and {cfg.out_dir}/results.png;")
    assert (tmp_path / "runs" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith("rot90 coto s0 | step 3 | loss") for line in lines)
    # the table: probe, both methods, their difference; then ms/step with the warm-up steps apart
    lora, coto = (100 * r["acc"] for r in res["runs"])
    assert f"| rot90 | {100 * res['probe']['rot90']:.1f} | {lora:.1f} | {coto:.1f} | {coto - lora:.1f} |" in lines
    assert any(line.startswith("coto: ") and " ms/step (steady state) + " in line for line in lines)
    tags = [json.loads(r)["tag"] for r in (train_vit.run_dir(cfg, "rot90") / "metrics.jsonl").read_text().splitlines()]
    assert set(tags) == {"rot90 coto s0"}  # no trailing separator
    assert [r["method"] for r in res["runs"]] == ["lora", "coto"]
    assert "seed interpolation needs two seeds' runs: run with --seeds 2 (or more)" in lines
    # the saved adapters give the reported accuracy, and record what they are
    backbone, task = _tiny_setup(cfg)
    path = train_vit.run_dir(cfg, "rot90") / "adapters.safetensors"
    assert evaluate(load_adapters(cfg, task, backbone, path), task.x_test, task.y_test)[0] == res["runs"][1]["acc"]
    with pytest.raises(ValueError, match="saved as variant=lora, this model has variant=hira"):
        load_adapters(dataclasses.replace(cfg, variant="hira"), task, backbone, path)
    main(dataclasses.replace(cfg, resume=True))
    assert "skipping rot90 coto s0: finished" in capsys.readouterr().out
    main(cfg)
    assert "overwriting rot90 coto s0, which had finished" in capsys.readouterr().out


def test_main_prints_the_robustness_numbers_of_a_direct_computation(tmp_path, capsys):
    """Rebuilt by hand from the saved files: every other block (depth 2: block 1's lora_B zeroed, so
    its delta W is 0) and the two seeds' lora_A, lora_B and head averaged, each evaluated as a model."""
    # trained long enough that the adapters decide the predictions (tiny's 6 steps stay at chance)
    cfg = tiny(tmp_path, tasks="rot90", seeds=2, device="cpu", pretrain_steps=200, steps=20, n_train=600, n_test=300)
    res = main(cfg)
    lines = capsys.readouterr().out.splitlines()
    backbone, task = _tiny_setup(cfg)

    def acc_of(state):  # 100 * test accuracy of a model loaded from `state`
        path = tmp_path / "state.safetensors"
        write_safetensors(state, path, metadata=metadata)
        return 100 * evaluate(load_adapters(cfg, task, backbone, path), task.x_test, task.y_test)[0]

    every_other, interp = {}, {}
    for method, coto in (("lora", False), ("coto", True)):
        paths = [train_vit.run_dir(dataclasses.replace(cfg, coto=coto, seed=s), "rot90") / "adapters.safetensors"
                 for s in (0, 1)]
        metadata = train_vit.read_safetensors_metadata(paths[0])
        a, b = (train_vit.read_safetensors(p) for p in paths)
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


def test_main_under_torchrun_closes_its_process_group(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)  # what torchrun --nproc_per_node 1 sets
    seen = []
    monkeypatch.setattr(train_vit, "run_all", lambda cfg: seen.append(dist.get_world_size()))
    main(tiny(tmp_path, device="cpu"))
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


def test_real_fashion_mnist_smoke(tmp_path):
    """Reads the Debian package's files (CI installs dataset-fashion-mnist), trains a few steps, and
    checks the saved adapters reproduce the reported accuracy."""
    if not Path(train_vit.DEBIAN_DIR, "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST is not in {train_vit.DEBIAN_DIR}: sudo apt install dataset-fashion-mnist")
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
    cfg = dataclasses.replace(TINY, steps=10, p0=0.1)
    path = tmp_path / "results.png"
    drawn = train_vit.plot_results(results, cfg, path)
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
