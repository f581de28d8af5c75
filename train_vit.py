"""Pretrain a small ViT on real images, then adapt it to new tasks with LoRA, with and without CoTo.

No pretrained ViT can be downloaded here, so the script makes its own backbone: it trains vit.py's
VisionTransformer on a source task (Fashion-MNIST classes 0-4), caches it under runs/, then freezes
it and fine-tunes LoRA adapters (qkv, proj, fc1, fc2 of every block) plus a task head on downstream
tasks the backbone does not solve by itself (unseen classes, rotated, inverted, patch-shuffled
images), once as plain LoRA and once with CoTo (coto.py; method.md section 2), and prints both side
by side with a frozen-backbone linear probe (and draws them with the loss curves: results.png), then
the two robustness numbers CoTo is about (games.py): accuracy with only every other block's adapters
on, and of two seeds' adapters interpolated at lambda 0.5.

    python train_vit.py                          # a few minutes on a 2-core CPU
    python train_vit.py --variant dora --seeds 3
    torchrun --nproc_per_node 2 train_vit.py     # DDP (gloo on CPU, nccl on CUDA)
    python train_vit.py --init my_vit.safetensors  # start from timm-format weights, no pretraining

Data: Fashion-MNIST's four IDX .gz files (Debian/Ubuntu: `apt install dataset-fashion-mnist`), or
CIFAR-10's python batches (`--dataset cifar10`); nothing is downloaded.
"""
import dataclasses
import functools
import gzip
import hashlib
import json
import math
import os
import pickle
import statistics
import struct
import time
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from coto import SHAPES, CoTo, block_groups, coto_prob
from games import block_subsets, coalition, interpolate, use_adapter
from lora import (inject_lora, load_lora_state_dict, lora_layers, lora_metadata, lora_state_dict,
                  mark_only_lora_as_trainable)
from lab.utils import (TrainLog, atomic_write_text, check_finite, ddp_wrap, distributed, finished_run, format_eta,
                   get_lr, method_name, pick_device, print_speed, rank_world, read_safetensors,
                   read_safetensors_metadata, resume, run_script, save_checkpoint, save_result, seed_runs,
                   seed_bars, seed_table, seed_values, skip_finished, write_results, write_safetensors)
from vit import VisionTransformer, load_pretrained, load_pretrained_file, reset_head

TASKS = ("new5", "rot90", "invert", "shuffle", "coarse")


@dataclass
class Config:
    # data
    dataset: str = "fashion-mnist"  # fashion-mnist | cifar10 | synthetic (tiny generated set, for tests)
    data_dir: str = ""  # the data files' folder, the only one searched; "" = $COTO_DATA_DIR, else ./data, Debian path
    # model (vit.py, timm names); image size and channels come from the dataset
    patch_size: int = 7  # 28x28 -> 16 patches + class token = 17 tokens
    embed_dim: int = 96
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    init: str = ""  # timm-format .safetensors/.pth to start from instead of pretraining
    # pretraining (full training on the source task; cached under out_dir/pretrain-<hash>/)
    source_classes: str = "0-4"  # training-split classes the backbone learns
    pretrain_steps: int = 500
    pretrain_lr: float = 1e-3
    pretrain_batch_size: int = 128
    pretrain_weight_decay: float = 0.01
    pretrain_warmup: int = 10  # linear warmup steps, then cosine to 0
    pretrain_seed: int = 0  # the backbone's initialisation and data order (fine-tuning seeds do not change it)
    # downstream tasks, built from the same data (see make_tasks)
    tasks: str = "new5,rot90,invert,shuffle"  # comma-separated, from TASKS
    n_train: int = 10000  # training examples per task (0 = all)
    n_test: int = 5000  # test examples per task (0 = the whole test split)
    n_per_class: int = 0  # few-shot: this many training examples per class (0 = use n_train)
    # LoRA
    targets: str = "qkv,proj,fc1,fc2"  # comma-separated nn.Linear name suffixes that get adapters
    r: int = 4
    alpha: float = 8.0
    rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r
    variant: str = "lora"  # lora | dora | hira
    lora_dropout: float = 0.0  # element-wise dropout on the adapter input (a baseline)
    progressive_dropout: bool = False  # lora_dropout decays to 0 on CoTo's stage-1 schedule (a baseline)
    head: str = "probe_init"  # probe_init: starts at the linear probe, trained | learned: fresh | probe: frozen probe
    # CoTo (method.md section 2)
    coto: bool = True  # main() runs plain LoRA and CoTo side by side; finetune() reads this switch
    compare: bool = True  # main(): also run the other setting of `coto` and print both
    p0: float = 0.0  # activation probability at step 0 (paper figure: 0; authors' snippet: 0.1)
    stage1_ratio: float = 0.75  # fraction of steps over which p rises to 1
    shape: str = "linear"  # linear | exp | sine ramp
    # optimisation (fine-tuning)
    steps: int = 150
    batch_size: int = 128  # global batch; split over DDP ranks
    lr: float = 1e-2
    weight_decay: float = 0.01
    warmup: int = 10  # linear warmup steps, then cosine to 0
    seed: int = 0  # first seed: initialisation, data order, CoTo draws
    seeds: int = 2  # main() runs seeds seed .. seed + seeds - 1 (2: enough for one interpolated pair)
    task_init: bool = False  # the adapters' init drawn from (seed, task): each task its own A (else one per seed)
    # running
    device: str = "auto"  # auto | cpu | cuda | mps
    compile: bool = False  # torch.compile each block (2 graphs per block: adapters on / off)
    out_dir: str = "runs/vit"
    resume: bool = False  # continue from each run's checkpoint (and skip finished runs)
    ckpt_every: int = 50  # steps between checkpoints (0 = none); a finished run keeps none: result.json marks it
    log_every: int = 10  # steps between log lines and the records the loss curves are drawn from
    eval_every: int = 0  # steps between test-set evaluations during fine-tuning (0 = only at the end)
    plot: bool = True  # write results.png into out_dir: accuracy per task, loss curves, p(t) (--no-plot: none)


# how a run is carried out, logged or listed, not what it computes: --resume allows other values
NOT_IN_RESULT = ("data_dir", "device", "compile", "out_dir", "resume", "ckpt_every", "log_every", "eval_every",
                 "plot", "tasks", "seeds", "compare")


def run_config(cfg: Config) -> dict:
    """What a fine-tuning run's result depends on (its task is its folder), recorded with it."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_RESULT}


def check_config(cfg: Config) -> None:
    """Every flag checked before any data is loaded: one ValueError (FileNotFoundError for a
    missing data folder) naming the flag."""
    if cfg.dataset not in ("fashion-mnist", "cifar10", "synthetic"):
        raise ValueError(f"--dataset {cfg.dataset!r}: choose fashion-mnist, cifar10 or synthetic")
    unknown = [t for t in cfg.tasks.split(",") if t not in TASKS]
    if unknown:
        raise ValueError(f"--tasks {cfg.tasks!r}: unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    if cfg.variant not in ("lora", "dora", "hira"):
        raise ValueError(f"--variant {cfg.variant!r}: choose lora, dora or hira")
    if cfg.head not in ("learned", "probe", "probe_init"):
        raise ValueError(f"--head {cfg.head!r}: choose learned, probe or probe_init")
    if cfg.shape not in SHAPES:
        raise ValueError(f"--shape {cfg.shape!r}: choose from {', '.join(SHAPES)}")
    if cfg.progressive_dropout and not cfg.lora_dropout > 0:
        raise ValueError("--progressive-dropout decays --lora-dropout to 0: set --lora-dropout > 0 (e.g. 0.5)")
    if cfg.steps < 1 or cfg.pretrain_steps < 1 or cfg.seeds < 1:
        raise ValueError(f"--steps {cfg.steps}, --pretrain-steps {cfg.pretrain_steps} and --seeds {cfg.seeds} "
                         "must be at least 1")
    try:
        parse_classes(cfg.source_classes)
    except ValueError:
        raise ValueError(f"--source-classes {cfg.source_classes!r}: write classes as 0-4 or 0,2,5") from None
    data_dirs(cfg.data_dir)  # a data folder the user named must exist


# ---------------------------------------------------------------------------------------------
# Data: everything is preloaded as uint8 tensors (N, C, H, W); batches are cut by index.

FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def data_dirs(data_dir: str, extra: str = "") -> list:
    """Where to look: only the folder the user named (--data-dir, else $COTO_DATA_DIR), which must
    exist; with none named, ./data, then `extra` (a system path)."""
    named = data_dir or os.environ.get("COTO_DATA_DIR", "")
    if named and not Path(named).is_dir():
        source = "--data-dir" if data_dir else "$COTO_DATA_DIR"
        raise FileNotFoundError(f"{source} {named}: no such folder; point it at the folder holding the data files")
    return [Path(named)] if named else [Path(d) for d in ("data", extra) if d]


def _read_idx(path: Path) -> torch.Tensor:
    """An IDX file (gzipped or not) as a uint8 tensor: images (N, 28, 28), labels (N,)."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    magic, = struct.unpack(">I", raw[:4])
    if magic >> 8 != 0x08:  # 0x00000803 images, 0x00000801 labels: unsigned bytes, 3 or 1 dims
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#010x})")
    ndim = magic & 0xFF
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def load_fashion_mnist(data_dir: str = "") -> dict:
    """{"x_train": (60000, 1, 28, 28) uint8, "y_train": (60000,) int64, "x_test", "y_test"}."""
    dirs = data_dirs(data_dir, DEBIAN_DIR)
    for d in dirs:
        paths = [next((p for p in (d / f"{f}.gz", d / f) if p.is_file()), None) for f in FASHION_FILES]
        if all(paths):
            xtr, ytr, xte, yte = (_read_idx(p) for p in paths)
            return {"x_train": xtr[:, None], "y_train": ytr.long(), "x_test": xte[:, None],
                    "y_test": yte.long(), "classes": 10, "folder": str(d)}
    raise FileNotFoundError(
        "Fashion-MNIST not found (looked for train-images-idx3-ubyte.gz and its three siblings in: "
        f"{', '.join(map(str, dirs))}).\n  On Debian/Ubuntu: sudo apt install dataset-fashion-mnist  "
        f"(installs them in {DEBIAN_DIR})\n  Elsewhere: download the four .gz files from "
        "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion) into ./data, or pass "
        "--data-dir FOLDER, or set COTO_DATA_DIR.")


class CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR-10's python batches and nothing else. A pickle may name any importable function
    and have it called while loading; those files hold only a dict of bytes, ints and one numpy
    uint8 array, rebuilt by numpy's _reconstruct (numpy.core in the files, numpy._core in numpy 2)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never holds")
        import numpy as np
        # _reconstruct from where this numpy keeps it (numpy 2 moved it; importing numpy.core warns there)
        return np.empty(0).__reduce__()[0] if name == "_reconstruct" else getattr(np, name)


def read_cifar_batch(path: Path) -> tuple:
    """One CIFAR-10 batch file: images (N, 3, 32, 32) uint8 (rows are channel-major), labels (N,)."""
    with open(path, "rb") as f:
        try:
            b = CifarUnpickler(f, encoding="bytes").load()  # the batches were pickled by Python 2
        except (pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{path} is not a CIFAR-10 batch ({e}): not loading it; replace it with the "
                             "file from cifar-10-python.tar.gz") from None
    return torch.tensor(b[b"data"]).reshape(-1, 3, 32, 32), torch.tensor(b[b"labels"])


def load_cifar10(data_dir: str = "") -> dict:
    """CIFAR-10 from its python pickle batches (data_batch_1..5, test_batch): (N, 3, 32, 32) uint8."""
    folders = [folder for d in data_dirs(data_dir) for folder in (d, d / "cifar-10-batches-py")]
    for folder in folders:
        if (folder / "test_batch").is_file():
            train = [read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
            xte, yte = read_cifar_batch(folder / "test_batch")
            return {"x_train": torch.cat([x for x, _ in train]), "y_train": torch.cat([y for _, y in train]),
                    "x_test": xte, "y_test": yte, "classes": 10, "folder": str(folder)}
    raise FileNotFoundError(
        f"CIFAR-10 python batches not found (looked for test_batch in: {', '.join(map(str, folders))}).\n  Download "
        "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, unpack it into ./data "
        "(giving ./data/cifar-10-batches-py/) or pass --data-dir FOLDER.")


def make_synthetic(n_train: int = 600, n_test: int = 300, seed: int = 0) -> dict:
    """A tiny generated 10-class set shaped like Fashion-MNIST, for tests: class k is a bright
    7x7 square at one of 10 fixed positions (an asymmetric layout, so rotations change the class
    geometry), on noise."""
    g = torch.Generator().manual_seed(seed)
    corners = [(0, 0), (0, 7), (0, 14), (0, 21), (7, 0), (7, 14), (14, 7), (14, 21), (21, 0), (21, 14)]

    def draw(n):
        y = torch.randint(10, (n,), generator=g)
        x = torch.randint(0, 60, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
        for i, k in enumerate(y.tolist()):
            r, c = corners[k]
            x[i, 0, r:r + 7, c:c + 7] = 200
        return x, y

    (xtr, ytr), (xte, yte) = draw(n_train), draw(n_test)
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte, "classes": 10, "folder": "(generated)"}


def load_data(cfg: Config) -> dict:
    if cfg.dataset == "fashion-mnist":
        return load_fashion_mnist(cfg.data_dir)
    if cfg.dataset == "cifar10":
        return load_cifar10(cfg.data_dir)
    if cfg.dataset == "synthetic":
        return make_synthetic()
    raise ValueError(f"unknown dataset {cfg.dataset!r}: choose fashion-mnist, cifar10 or synthetic")


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] (mean 0.5, std 0.5, as timm's ViTs normalise)."""
    return x.float().div_(127.5).sub_(1.0)


def parse_classes(spec: str) -> list:
    """"0-4" -> [0, 1, 2, 3, 4]; "0,2,5" -> [0, 2, 5]."""
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


@dataclass
class Task:
    name: str
    x_train: torch.Tensor  # (N, C, H, W) uint8
    y_train: torch.Tensor  # (N,) int64 in 0..num_classes-1
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def _shuffle_patches(x: torch.Tensor, p: int, perm: torch.Tensor) -> torch.Tensor:
    """Rearrange the p x p tiles of every image by the fixed permutation `perm`."""
    B, C, H, W = x.shape
    t = x.reshape(B, C, H // p, p, W // p, p).permute(0, 1, 2, 4, 3, 5).reshape(B, C, -1, p, p)
    t = t[:, :, perm].reshape(B, C, H // p, W // p, p, p).permute(0, 1, 2, 4, 3, 5)
    return t.reshape(B, C, H, W)


# Fashion-MNIST: 0 T-shirt, 1 trouser, 2 pullover, 3 dress, 4 coat, 5 sandal, 6 shirt, 7 sneaker,
# 8 bag, 9 ankle boot. "coarse": 0 top (0, 2, 4, 6), 1 trousers / dress (1, 3), 2 shoe (5, 7, 9), 3 bag.
COARSE = torch.tensor([0, 1, 0, 1, 0, 2, 0, 2, 3, 2])


def make_task(data: dict, name: str, source_classes: list, patch_size: int) -> Task:
    """One downstream task from the whole data set (before any subsampling).
    new5: the classes not used for pretraining; rot90: every class, images rotated 90 degrees;
    invert: every class, 255 - pixel; shuffle: every class, the patch_size tiles in a fixed random
    order; coarse: 4 super-classes of rotated images."""
    xtr, ytr, xte, yte, k = data["x_train"], data["y_train"], data["x_test"], data["y_test"], data["classes"]
    if name == "new5":
        new = torch.tensor([c for c in range(k) if c not in source_classes])
        remap = torch.full((k,), -1, dtype=torch.long)
        remap[new] = torch.arange(len(new))
        mtr, mte = remap[ytr] >= 0, remap[yte] >= 0
        return Task(name, xtr[mtr], remap[ytr[mtr]], xte[mte], remap[yte[mte]], len(new))
    if name in ("rot90", "coarse"):
        rot = lambda x: torch.rot90(x, 1, dims=(2, 3))  # noqa: E731
        if name == "rot90":
            return Task(name, rot(xtr), ytr, rot(xte), yte, k)
        return Task(name, rot(xtr), COARSE[ytr], rot(xte), COARSE[yte], int(COARSE.max()) + 1)
    if name == "invert":
        return Task(name, 255 - xtr, ytr, 255 - xte, yte, k)
    if name == "shuffle":
        n = (xtr.shape[-1] // patch_size) ** 2
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(1234))  # part of the task definition
        return Task(name, _shuffle_patches(xtr, patch_size, perm), ytr,
                    _shuffle_patches(xte, patch_size, perm), yte, k)
    raise ValueError(f"unknown task {name!r}: choose from {', '.join(TASKS)}")


def subsample(y: torch.Tensor, n: int, n_per_class: int, num_classes: int, generator) -> torch.Tensor:
    """Indices of a random subset: n_per_class of each class (few-shot), else n in all (0 = all)."""
    if n_per_class:
        idx = []
        for c in range(num_classes):
            members = (y == c).nonzero().flatten()
            if len(members) < n_per_class:
                raise ValueError(f"class {c} has only {len(members)} examples, fewer than "
                                 f"n_per_class={n_per_class}")
            idx.append(members[torch.randperm(len(members), generator=generator)[:n_per_class]])
        return torch.cat(idx)
    perm = torch.randperm(len(y), generator=generator)
    return perm[:n] if n else perm


def make_tasks(data: dict, names, source_classes: list, patch_size: int, n_train: int = 0,
               n_test: int = 0, n_per_class: int = 0, seed: int = 0) -> dict:
    """{name: Task}, each subsampled with its own generator (seed): n_train / n_test examples,
    or n_per_class training examples per class for few-shot."""
    tasks = {}
    for name in names:
        t = make_task(data, name, source_classes, patch_size)
        g = torch.Generator().manual_seed(seed)
        tr = subsample(t.y_train, n_train, n_per_class, t.num_classes, g)
        te = subsample(t.y_test, n_test, 0, t.num_classes, g)
        tasks[name] = Task(name, t.x_train[tr], t.y_train[tr], t.x_test[te], t.y_test[te], t.num_classes)
    return tasks


class Batches:
    """Endless shuffled mini-batches of indices, drawn with an explicit generator; resumable."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.queue = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        while len(self.queue) < self.batch_size:  # epochs are concatenated: batches may span two
            self.queue = torch.cat([self.queue, torch.randperm(self.n, generator=self.generator)])
        idx, self.queue = self.queue[:self.batch_size], self.queue[self.batch_size:]
        return idx

    def get_state(self) -> dict:  # torch.Generator's names: resume() restores either
        return {"generator": self.generator.get_state(), "queue": self.queue.clone()}

    def set_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.queue = state["queue"].clone()


# ---------------------------------------------------------------------------------------------
# Model and training


def build_model(cfg: Config, x: torch.Tensor, num_classes: int) -> VisionTransformer:
    """A VisionTransformer sized by cfg for square images like x (N, C, H, H)."""
    return VisionTransformer(img_size=x.shape[-1], patch_size=cfg.patch_size, in_chans=x.shape[1],
                             num_classes=num_classes, embed_dim=cfg.embed_dim, depth=cfg.depth,
                             num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio)


def autocast(device: torch.device):
    """bf16 autocast on CUDA only; CPU and MPS run in float32."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple:
    """(accuracy, mean cross-entropy) of `model` on uint8 images x (N, C, H, W), labels y (N), in
    eval mode (every adapter runs, whatever CoTo drew last)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch_size):
        xb, yb = to_float(x[i:i + batch_size]).to(device), y[i:i + batch_size].to(device)
        with autocast(device):
            logits = model(xb).float()  # (B, num_classes)
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    model.train(was_training)
    return correct / len(y), loss / len(y)


def train_loop(model, x, y, cfg: Config, *, total_steps: int, lr: float, batch_size: int, weight_decay: float,
               warmup: int, seed: int, out_dir=None, config: dict | None = None, coto=None, eval_fn=None,
               name: str = "train") -> dict:
    """Train the parameters of `model` that require grad on uint8 images x, labels y: AdamW, warmup
    + cosine LR, global batch `batch_size` (split over DDP ranks), one CoTo draw per step.
    eval_fn(model) -> (acc, loss) runs every cfg.eval_every steps. With out_dir: metrics.jsonl,
    checkpoints every cfg.ckpt_every steps tied to `config`, and resume (cfg.resume).
    Returns TrainLog.summary(): {"history", "train_time_s", "warmup_s", "ms_per_step", "active_frac"}."""
    rank, world = rank_world()
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be divisible by the {world} DDP ranks")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    batches = Batches(len(y), batch_size, seed)  # the same global batches on every rank
    log = TrainLog(name, total_steps, cfg.log_every, out_dir and Path(out_dir) / "metrics.jsonl", quiet=rank != 0)
    start = resume(out_dir, cfg.resume, model, opt, coto, batches, config, log)
    net = ddp_wrap(model, coto)
    model.train()
    for step in range(start, total_steps):
        lr_now = get_lr(step, total_steps, lr, warmup)
        for group in opt.param_groups:
            group["lr"] = lr_now
        if coto is not None:
            coto.step(step)  # CoTo: one draw per optimizer step, each block's adapters on with prob p(step)
        if cfg.progressive_dropout:  # a baseline: dropout decaying to 0 on CoTo's stage-1 schedule
            for layer in lora_layers(model).values():
                layer.lora_dropout.p = cfg.lora_dropout * (1 - coto_prob(step, total_steps, 0.0, cfg.stage1_ratio))
        idx = batches.next()[rank::world]  # this rank's share of the global batch
        xb, yb = to_float(x[idx]).to(device), y[idx].to(device)
        with autocast(device):
            logits = net(xb)  # (B, num_classes)
        loss = F.cross_entropy(logits.float(), yb)
        loss.backward()
        check_finite(loss, params, step + 1, lr, name)  # before the step reaches the weights
        opt.step()
        opt.zero_grad(set_to_none=True)  # bypassed adapters keep grad None: AdamW skips them
        done = step + 1
        log.step(done, lr_now, coto, loss=loss.item(), acc=(logits.argmax(1) == yb).float().mean().item())
        if eval_fn is not None and cfg.eval_every and done % cfg.eval_every == 0:
            eval_acc, eval_loss = eval_fn(model)  # in eval mode: every adapter runs
            log.eval(done, eval_loss=eval_loss, eval_acc=eval_acc)
        if out_dir and rank == 0 and cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < total_steps:
            save_checkpoint(Path(out_dir) / "ckpt.pt", model, opt, done, batches.get_state(), coto, config=config,
                            extra=log.state)
            log.restart_clock()
    if world > 1:
        dist.barrier()
    return log.summary()


# ---------------------------------------------------------------------------------------------
# Pretraining, probing, fine-tuning


PRETRAIN_FIELDS = ("dataset", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
                   "source_classes", "pretrain_steps", "pretrain_lr", "pretrain_batch_size",
                   "pretrain_weight_decay", "pretrain_warmup", "pretrain_seed")


def pretrain_key(cfg: Config) -> str:
    """Short hash of the fields that determine the pretrained backbone (its cache folder name)."""
    fields = {f: getattr(cfg, f) for f in PRETRAIN_FIELDS}
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def pretrain(cfg: Config, data: dict) -> dict:
    """The backbone's state dict (timm names): loaded from cfg.init, from the cache
    out_dir/pretrain-<hash>/backbone.safetensors, or trained on the source classes and cached."""
    source = parse_classes(cfg.source_classes)
    if cfg.init:
        model = build_model(cfg, data["x_train"], len(source))
        load_pretrained_file(model, cfg.init)
        return model.state_dict()
    folder = Path(cfg.out_dir) / f"pretrain-{pretrain_key(cfg)}"
    cached = folder / "backbone.safetensors"
    rank, _ = rank_world()
    if cached.is_file():
        try:
            return read_safetensors(cached)
        except ValueError as e:  # e.g. a copy cut short: train it again rather than fail or use it
            if rank == 0:
                print(f"{e}\nthe cached backbone is damaged: pretraining it again", flush=True)
    torch.manual_seed(cfg.pretrain_seed)
    model = build_model(cfg, data["x_train"], len(source)).to(pick_device(cfg.device))
    remap = torch.full((data["classes"],), -1, dtype=torch.long)
    remap[source] = torch.arange(len(source))
    mtr, mte = remap[data["y_train"]] >= 0, remap[data["y_test"]] >= 0
    if rank == 0:
        print(f"pretraining a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter ViT on "
              f"classes {cfg.source_classes} ({int(mtr.sum())} images) for {cfg.pretrain_steps} steps")
    train_loop(model, data["x_train"][mtr], remap[data["y_train"][mtr]], cfg, total_steps=cfg.pretrain_steps,
               lr=cfg.pretrain_lr, batch_size=cfg.pretrain_batch_size, weight_decay=cfg.pretrain_weight_decay,
               warmup=cfg.pretrain_warmup, seed=cfg.pretrain_seed, name="pretrain")
    acc, _ = evaluate(model, data["x_test"][mte], remap[data["y_test"][mte]])
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if rank == 0:
        print(f"pretrained: source test accuracy {acc:.4f}; cached in {cached}")
        write_safetensors(state, cached, metadata={"source_acc": acc, **{f: getattr(cfg, f) for f in PRETRAIN_FIELDS}})
        atomic_write_text(folder / "config.json", json.dumps({**dataclasses.asdict(cfg), "source_acc": acc}, indent=1))
    return state


def features(model: VisionTransformer, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Frozen (N, D) features: the class token after the final norm (what the head sees)."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            h = model.embed(to_float(x[i:i + batch_size]).to(device))
            for blk in model.blocks:
                h = blk(h)
            out.append(model.norm(h)[:, 0].float().cpu())
    return torch.cat(out)


def linear_probe(model: VisionTransformer, task: Task, weight_decay: float = 1e-4, iters: int = 100) -> tuple:
    """Fit a linear head on frozen features (full-batch L-BFGS, logistic regression).
    Returns ({"weight": (K, D), "bias": (K,)}, test accuracy)."""
    model.eval()
    ftr, fte = features(model, task.x_train), features(model, task.x_test)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6  # standardise for L-BFGS, folded back into the head below
    head = torch.nn.Linear(ftr.shape[1], task.num_classes)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe")
    ztr = (ftr - mu) / sd

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(ztr), task.y_train) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    w = head.weight.detach() / sd  # head((f - mu) / sd) == (W / sd) f + (b - (W / sd) mu)
    b = head.bias.detach() - w @ mu
    acc = ((fte @ w.T + b).argmax(1) == task.y_test).float().mean().item()
    return {"weight": w, "bias": b}, acc


def run_dir(cfg: Config, task: str) -> Path:
    """out_dir/<backbone hash>/<task>/<method>/seed<seed>: one fine-tuning run's files."""
    key = pretrain_key(cfg) if not cfg.init else "init-" + hashlib.sha1(cfg.init.encode()).hexdigest()[:8]
    return Path(cfg.out_dir) / key / task / method_name(cfg.variant, cfg.coto) / f"seed{cfg.seed}"


def run_name(cfg: Config, task: str) -> str:
    """"rot90 coto s0": how logs and messages name one fine-tuning run."""
    return f"{task} {method_name(cfg.variant, cfg.coto)} s{cfg.seed}"


def finetune(cfg: Config, task: Task, backbone_state: dict, probe_head=None, out_dir=None) -> tuple:
    """LoRA (cfg.coto: with CoTo) on the frozen backbone plus a task head; returns (model, metrics).
    The head is fresh and trained (cfg.head == "learned"), the frozen `probe_head` ("probe"), or
    starts at `probe_head` and is trained ("probe_init": linear probing, then fine-tuning).
    With out_dir: checkpoint / resume, metrics.jsonl, and at the end adapters.safetensors
    (lora_state_dict plus head.weight / head.bias) and result.json."""
    check_config(cfg)
    # adapters' initialisation: the same with and without CoTo; shared by a seed's tasks unless task_init
    torch.manual_seed(cfg.seed + (zlib.crc32(task.name.encode()) if cfg.task_init else 0))
    model = build_model(cfg, task.x_train, task.num_classes)
    load_pretrained(model, backbone_state)  # the source head is dropped: reset_head below
    reset_head(model, task.num_classes, generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.head != "learned":
        if probe_head is None:
            raise ValueError(f"head={cfg.head!r} needs probe_head (from linear_probe)")
        model.head.load_state_dict(probe_head)
    inject_lora(model, cfg.targets.split(","), r=cfg.r, alpha=cfg.alpha, dropout=cfg.lora_dropout,
                variant=cfg.variant, rslora=cfg.rslora)
    mark_only_lora_as_trainable(model, also=("head",) if cfg.head != "probe" else ())
    model.to(pick_device(cfg.device))
    if cfg.compile:
        for blk in model.blocks:  # per block: its adapters are on or off, so two graphs, no recompiles
            blk.compile()
    coto = CoTo(block_groups(model), cfg.steps, p0=cfg.p0, stage1_ratio=cfg.stage1_ratio,
                shape=cfg.shape, seed=cfg.seed) if cfg.coto else None
    out = train_loop(model, task.x_train, task.y_train, cfg, total_steps=cfg.steps, lr=cfg.lr,
                     batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, warmup=cfg.warmup, seed=cfg.seed,
                     out_dir=out_dir, config=run_config(cfg), coto=coto,
                     eval_fn=lambda m: evaluate(m, task.x_test, task.y_test), name=run_name(cfg, task.name))
    acc, loss = evaluate(model, task.x_test, task.y_test)  # eval mode: every adapter runs
    method = method_name(cfg.variant, cfg.coto)
    metrics = {"task": task.name, "method": method, "seed": cfg.seed, "acc": acc, "loss": loss, **out}
    if out_dir and rank_world()[0] == 0:
        state = {**lora_state_dict(model), **{f"head.{k}": v for k, v in model.head.state_dict().items()}}
        write_safetensors(state, Path(out_dir) / "adapters.safetensors", metadata={
            **lora_metadata(model), "task": task.name, "method": method, "seed": cfg.seed})
        save_result(out_dir, metrics, dataclasses.asdict(cfg))
    return model.eval(), metrics


def load_adapters(cfg: Config, task: Task, backbone_state: dict, path) -> VisionTransformer:
    """Rebuild a fine-tuned model from a saved adapters.safetensors (for analyses)."""
    model = build_model(cfg, task.x_train, task.num_classes)
    load_pretrained(model, backbone_state)
    inject_lora(model, cfg.targets.split(","), r=cfg.r, alpha=cfg.alpha, variant=cfg.variant, rslora=cfg.rslora)
    state = read_safetensors(path)
    model.head.load_state_dict({"weight": state.pop("head.weight"), "bias": state.pop("head.bias")})
    load_lora_state_dict(model, state, metadata=read_safetensors_metadata(path))  # a HiRA file into a LoRA model: error
    return model.to(pick_device(cfg.device)).eval()


# ---------------------------------------------------------------------------------------------


def main(cfg: Config) -> dict:
    """Pretrain (or load), then for every task: linear probe, LoRA, CoTo. Returns the results.
    Under torchrun: one process group for the whole job, closed at the end."""
    check_config(cfg)
    with distributed(cfg.device):
        return run_all(cfg)


def run_all(cfg: Config) -> dict:
    rank, _ = rank_world()
    say = print if rank == 0 else (lambda *a, **k: None)
    t0 = time.time()
    names = cfg.tasks.split(",")
    runs = [(name, c, run_dir(c, name)) for name, c in seed_runs(cfg, names)]  # (task, config, folder)
    # finished runs (--resume), checked against the flags now rather than after loading and pretraining
    finished = {out: finished_run(out, run_config(c), NOT_IN_RESULT) for _, c, out in runs} if cfg.resume else {}
    say(f"output: {cfg.out_dir}", flush=True)
    data = load_data(cfg)
    say(f"data: {cfg.dataset} from {data['folder']}", flush=True)
    source = parse_classes(cfg.source_classes)
    backbone = pretrain(cfg, data)
    # the task subsets are fixed (seed 0): seeds vary initialisation, data order and CoTo draws only
    tasks = make_tasks(data, names, source, cfg.patch_size, cfg.n_train, cfg.n_test, cfg.n_per_class, seed=0)
    probe_model = build_model(cfg, data["x_train"], len(source))
    results = {"probe": {}, "runs": []}
    for name, task in tasks.items():
        load_pretrained(probe_model, backbone)
        probe_head, probe_acc = linear_probe(probe_model, task)
        results["probe"][name] = probe_acc
        say(f"{name}: frozen-backbone linear probe test accuracy {probe_acc:.4f}")
        for c, out in ((c, out) for task_name, c, out in runs if task_name == name):
            if skip_finished(finished.get(out), out, run_name(c, name), say):
                results["runs"].append(finished[out])
            else:
                results["runs"].append(finetune(c, task, backbone, probe_head, out_dir=out)[1])
    results["wall_s"] = time.time() - t0
    if rank == 0:  # the tables: test accuracy in % per task and method, beside the linear probe
        table = functools.partial(seed_table, key="task", baseline={n: 100 * results["probe"][n] for n in names},
                                  baseline_name="linear probe", value=lambda r: 100 * r["acc"])
        print(table("\ntest accuracy in %", results["runs"]))
        print_speed(results["runs"])
        results["robustness"] = rob = robustness(cfg, runs, tasks, backbone)
        print(table("\nonly every other block's adapters on (blocks 0, 2, ...), test accuracy in %",
                    rob["every_other"]))
        if rob["interp"]:
            print(table("\ntwo seeds' adapters interpolated at lambda 0.5 (every adapter tensor and the head "
                        "averaged), test accuracy in %", rob["interp"]))
        else:
            print("seed interpolation needs two seeds' runs: run with --seeds 2 (or more)")
        print(f"total {format_eta(results['wall_s'])}")
        print(f"wrote {write_results(results, cfg, plot_results)}; each run's adapters, log and result under "
              f"{run_dir(cfg, names[0]).parents[2]}")
    return results


def robustness(cfg: Config, runs: list, tasks: dict, backbone: dict) -> dict:
    """What CoTo claims to buy, per run (task, config, folder) rebuilt from its adapters.safetensors
    (so runs kept by --resume count too): {"every_other": test accuracy with only blocks 0, 2, 4, ...
    keeping their adapters, one record per seed; "interp": of two seeds' runs averaged factor-wise
    (lora_A, lora_B and the trained head: lambda 0.5), one record per disjoint seed pair (s, s + 1),
    (s + 2, s + 3), ..., so the pairs are independent samples like the seeds}."""
    out = {"every_other": [], "interp": []}
    for name, c, folder in runs:
        task, path = tasks[name], folder / "adapters.safetensors"
        model = load_adapters(c, task, backbone, path)
        record = {"task": name, "method": method_name(c.variant, c.coto), "seed": c.seed}
        keep = [f"blocks.{i}" for i in block_subsets(len(model.blocks))["every_other"]]
        with coalition(block_groups(model), keep):
            out["every_other"].append({**record, "acc": evaluate(model, task.x_test, task.y_test)[0]})
        if (c.seed - cfg.seed) % 2 == 0 and c.seed + 1 < cfg.seed + cfg.seeds:
            other = run_dir(dataclasses.replace(c, seed=c.seed + 1), name) / "adapters.safetensors"
            with use_adapter(model, interpolate(read_safetensors(path), read_safetensors(other), 0.5)):
                acc = evaluate(model, task.x_test, task.y_test)[0]
            out["interp"].append({**record, "seed": f"{c.seed}+{c.seed + 1}", "acc": acc})
    return out


def plot_results(results: dict, cfg: Config, path: Path) -> dict:
    """The job's figure: test accuracy per task (the probe, then each method's mean over seeds with
    one standard deviation as error bars when there are several), and under it each task's training
    loss curves (mean over seeds of the log_every-spaced records) above CoTo's p(t). Returns what
    it draws: {"rows", "acc": {name: [%]}, "err": {name: [%]}, "curves": {task: {method: (steps, loss)}},
    "p": (steps, p)}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, tasks = results["runs"], list(results["probe"])
    methods = list(dict.fromkeys(r["method"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    rows = tasks + ["mean"] if len(tasks) > 1 else tasks
    probe = [[statistics.fmean(a for task, a in results["probe"].items() if row in ("mean", task))] for row in rows]
    values = {"linear probe": probe, **seed_values(runs, "task", lambda r: r["acc"], rows)}
    values = {name: [[100 * a for a in v] for v in vs] for name, vs in values.items()}  # accuracy in %

    def mean_curve(task, method):  # (logged steps, training loss at each, mean over seeds)
        hs = [r["history"] for r in runs if r["task"] == task and r["method"] == method]
        return [e["step"] for e in hs[0]], [statistics.fmean(e["loss"] for e in step) for step in zip(*hs)]

    curves = {task: {m: mean_curve(task, m) for m in methods} for task in tasks}
    with_coto = any(m.endswith("coto") for m in methods)
    p = (list(range(cfg.steps + 1)), [coto_prob(t, cfg.steps, cfg.p0, cfg.stage1_ratio, cfg.shape)
                                      for t in range(cfg.steps + 1)]) if with_coto else ([], [])

    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}: mean ± std"
    fig = plt.figure(figsize=(max(9.0, 3.2 * len(tasks) + 1), 8.5 if with_coto else 7.0))
    grid = fig.add_gridspec(3 if with_coto else 2, len(tasks), height_ratios=[3, 2, 0.8][:3 if with_coto else 2])
    ax = fig.add_subplot(grid[0, :])
    acc, err, low, high = seed_bars(ax, rows, values, "{:.1f}")
    bottom = 5 * math.floor((low - 5) / 5) if low > 25 else 0
    ax.set_ylim(bottom, min(100, high) + 0.12 * (min(100, high) - bottom))
    ax.set_ylabel("test accuracy (%)" + (f"\naxis from {bottom}, not 0" if bottom else ""))
    ax.set_title(f"{cfg.dataset} ViT, LoRA r={cfg.r} on tasks {', '.join(tasks)}; {seed_text}", loc="left")
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(acc), frameon=False, fontsize=8)
    for i, task in enumerate(tasks):
        lax = fig.add_subplot(grid[1, i])
        for m, (steps, loss) in curves[task].items():
            lax.plot(steps, loss, ".-", color=f"C{methods.index(m)}", label=m)
        lax.set_title(f"{task}: training loss" + (f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else ""),
                      fontsize=9)
        lax.set_ylabel("train loss" if i == 0 else None)
        if i == 0:
            lax.legend(fontsize=8)
        if with_coto:
            pax = fig.add_subplot(grid[2, i], sharex=lax)
            pax.plot(*p, color=f"C{next(j for j, m in enumerate(methods) if m.endswith('coto'))}")
            pax.set_ylim(-0.05, 1.05)
            pax.set_ylabel("CoTo p(t)" if i == 0 else None)
            lax.tick_params(labelbottom=False)
            lax = pax
        lax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"rows": rows, "acc": acc, "err": err, "curves": curves, "p": p}


if __name__ == "__main__":
    run_script(main, Config, __doc__, __file__)
