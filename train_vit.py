"""Adapt a small pretrained ViT (shipped in runs/vit) with LoRA, with and without CoTo (Zhuang et al., ICML 2025),
to Fashion-MNIST tasks its pretraining on classes 0-4 does not solve: unseen classes, rotated, inverted, patch-shuffled
images. The tables: both beside a linear probe, then what CoTo is about (games.py): only every other block's adapters
on, and two seeds' adapters interpolated at 0.5. Fashion-MNIST is read from its IDX files, never downloaded.

    OMP_NUM_THREADS=1 python train_vit.py                # the README's main job, minutes on a 2-core CPU
    OMP_NUM_THREADS=1 python -m lab.vit_runs --depth 8   # the lab's: pretraining, run folders, resume, DDP, CIFAR-10
"""
import dataclasses
import gzip
import hashlib
import json
import re
import statistics
import struct
import time
import zlib
from collections import namedtuple
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F

from coto import CoTo, block_groups
from games import coalition, interpolate, use_adapter
from lora import inject_lora, lora_state_dict, mark_only_lora_as_trainable
from train_toy import get_lr, parse_args, pick_device
from vit import VisionTransformer, load_pretrained, reset_head

TASKS, HEADS = ("new5", "rot90", "invert", "shuffle"), ("probe_init", "learned", "probe")
ARCH = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "source_classes")  # what a backbone file records
EXAMPLE = "OMP_NUM_THREADS=1 python train_vit.py --tasks rot90,invert --variant dora --seeds 3"
STATS = ("ms_per_step", "warmup_s", "active_frac")  # a run's timings, averaged per method under the first table
POSITIVE = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "r", "steps", "seeds", "batch_size", "lr")

@dataclasses.dataclass
class Config:
    data_dir: str = ""  # folder of the data files, the only one searched ("": ./data, then Debian's)
    backbone: str = "runs/vit/pretrain-558112658e/backbone.pt"  # the pretrained ViT (others: python -m lab.vit_runs)
    patch_size: int = 7  # side of the square patches in pixels (28x28 images: 16 patches + the class token)
    embed_dim: int = 96  # width D of every token
    depth: int = 6  # transformer blocks, CoTo's groups
    num_heads: int = 3  # attention heads per block (divides embed_dim)
    mlp_ratio: float = 4.0  # MLP hidden width as a multiple of embed_dim
    source_classes: str = "0-4"  # classes the backbone was pretrained on, as 0-4 or 0,2,5 (new5 gets the others)
    tasks: str = "new5,rot90,invert,shuffle"  # comma-separated: new5 (unseen classes) | rot90 | invert | shuffle (patches)
    n_train: int = 10000  # training images per task (0: all)
    n_test: int = 5000  # test images per task (0: the whole test split)
    n_per_class: int = 0  # few-shot: this many training images per class instead of n_train (0: off)
    targets: str = "qkv,proj,fc1,fc2"  # comma-separated name suffixes of the blocks' nn.Linear that get adapters
    r: int = 4  # rank of every adapter (lora_A is r x in, lora_B out x r)
    alpha: float = 8.0  # adapter scale: scaling = alpha / r
    rslora: bool = False  # scaling = alpha / sqrt(r) instead (rank-stabilised LoRA)
    variant: str = "lora"  # lora | dora (learned magnitude per output) | hira (Hadamard product with W)
    lora_dropout: float = 0.0  # dropout probability on the adapters' input, in [0, 1) (a baseline)
    head: str = "probe_init"  # probe_init: from the linear probe, trained | learned: fresh, trained | probe: frozen probe
    coto: bool = True  # train with CoTo (main() runs both settings unless --no-compare)
    compare: bool = True  # main(): plain LoRA and CoTo side by side (--no-compare: only the --coto setting)
    p0: float = 0.0  # CoTo's probability that a block's adapters train at step 0, in [0, 1]
    stage1_ratio: float = 0.75  # fraction of the steps over which CoTo's p rises to 1, in (0, 1]
    shape: str = "linear"  # how p rises: linear | exp | sine | constant (p0 all through stage 1: layer drop)
    steps: int = 150  # optimizer steps of each fine-tuning run
    batch_size: int = 128  # images per fine-tuning step
    lr: float = 1e-2  # peak learning rate of fine-tuning
    weight_decay: float = 0.01  # AdamW weight decay of fine-tuning
    warmup: int = 10  # linear-warmup steps of fine-tuning, then cosine to 0
    seed: int = 0  # first seed: adapter initialisation, data order and CoTo's draws
    seeds: int = 2  # runs seeds seed .. seed + seeds - 1 (2: one pair to interpolate)
    task_init: bool = False  # adapters' initialisation drawn from (seed, task): each task its own
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    out_dir: str = "runs/vit"  # folder of results.json
    log_every: int = 10  # steps between log lines, each the mean over its steps (0: only the last step)

    def __post_init__(self):  # what only this script reads, checked now; lora.py, coto.py and vit.py check the rest
        bad = [f"--tasks {self.tasks!r}: unknown task {t!r}; choose from {', '.join(TASKS)}"
               for t in self.tasks.split(",") if t not in TASKS]
        bad += [f"--head {self.head!r}: choose {', '.join(HEADS)}"] * (self.head not in HEADS)
        bad += [f"--{k.replace('_', '-')} {v}: must be " + (f"an integer >= {int(k in POSITIVE)}" if type(v) is int else
                "> 0" if k in POSITIVE else ">= 0") for k, v in vars(self).items()  # nan fails every comparison
                if type(v) in (int, float) and not (v > 0 or v == 0 and k not in POSITIVE)]
        classes = re.fullmatch(r"\d(-\d)?(,\d(-\d)?)*", self.source_classes) and parse_classes(self.source_classes)
        if not classes or "new5" in self.tasks and len(set(classes)) == 10:
            bad.append(f"--source-classes {self.source_classes!r}: write classes 0..9 as 0-4 or 0,2,5, leaving "
                       "some for new5")
        if bad or not self.out_dir:
            raise ValueError(bad[0] if bad else "--out-dir '': name a folder")

# ---------------------------------------------------------------------------------------------- data
# Every image set is a uint8 tensor (N, C, H, W), labels int64 (N,); batches are cut by index.
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"

def data_dirs(data_dir: str, extra: str = "") -> list:  # --data-dir's folder, which must exist; else ./data, `extra`
    if data_dir and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir}: no such folder; point it at the folder holding the data files")
    return [Path(data_dir)] if data_dir else [Path(d) for d in ("data", extra) if d]

def read_idx(path: Path) -> torch.Tensor:  # an IDX file (gzipped or not) as uint8: images (N, 28, 28), labels (N,)
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    magic, = struct.unpack(">I", raw[:4])
    if magic >> 8 != 0x08:  # 0x00000803 images, 0x00000801 labels: unsigned bytes, 3 or 1 dims
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#010x})")
    shape = struct.unpack(f">{magic & 0xFF}I", raw[4:4 + 4 * (magic & 0xFF)])
    return torch.frombuffer(bytearray(raw[4 + 4 * len(shape):]), dtype=torch.uint8).reshape(shape)

def load_data(cfg: Config) -> dict:
    """Fashion-MNIST's four IDX files (gzipped or not): {"x_train": (60000, 1, 28, 28) uint8, "y_train": (60000,)
    int64, "x_test", "y_test" (10000 images), "name", "folder", "sha1"}."""
    dirs = data_dirs(cfg.data_dir, DEBIAN_DIR)
    for d in dirs:
        paths = [next((p for p in (d / f"{f}.gz", d / f) if p.is_file()), None) for f in FASHION_FILES]
        if all(paths):
            xtr, ytr, xte, yte = (read_idx(p) for p in paths)
            return with_sha1({"x_train": xtr[:, None], "y_train": ytr.long(), "x_test": xte[:, None],
                              "y_test": yte.long(), "name": "fashion-mnist", "folder": str(d)})
    raise FileNotFoundError(f"Fashion-MNIST not found (train-images-idx3-ubyte.gz and its three siblings) in: "
                            f"{', '.join(map(str, dirs))}.\n  On Debian/Ubuntu: sudo apt install dataset-fashion-mnist "
                            f"(puts them in {DEBIAN_DIR})\n  Elsewhere: download the four .gz files from "
                            "https://github.com/zalandoresearch/fashion-mnist into ./data, or pass --data-dir FOLDER.")

def with_sha1(data: dict) -> dict:  # data and "sha1", a hash of its tensors: backbones of other images are refused
    tensors = b"".join(data[k].contiguous().numpy().tobytes() for k in ("x_train", "y_train", "x_test", "y_test"))
    return {**data, "sha1": hashlib.sha1(tensors).hexdigest()}

def to_float(x: torch.Tensor) -> torch.Tensor:  # uint8 images -> float in [-1, 1] (mean, std 0.5: as timm's ViTs)
    return x.float().div_(127.5).sub_(1.0)

def parse_classes(spec: str) -> list:  # "0-4" -> [0, 1, 2, 3, 4]; "0,2,5" -> [0, 2, 5]
    return [c for part in spec.split(",") for a, _, b in [part.partition("-")] for c in range(int(a), int(b or a) + 1)]

Task = namedtuple("Task", "name x_train y_train x_test y_test num_classes")  # images uint8, labels 0 .. num_classes - 1

def make_tasks(data: dict, names, source_classes: list, patch_size: int, n_train: int = 0, n_test: int = 0,
               n_per_class: int = 0, seed: int = 0) -> dict:
    """{name: Task}: new5 (the classes left out of pretraining), rot90, invert (255 - pixel), shuffle (patches)."""
    new = torch.tensor([c for c in range(10) if c not in source_classes])
    remap = torch.full((10,), -1).index_put_((new,), torch.arange(len(new)))  # new5's labels 0 .. len(new) - 1, else -1
    perm = torch.randperm((data["x_train"].shape[-1] // patch_size) ** 2, generator=torch.Generator().manual_seed(1234))
    transform = {"new5": lambda x: x, "rot90": lambda x: torch.rot90(x, 1, dims=(2, 3)), "invert": lambda x: 255 - x,
                 "shuffle": lambda x: shuffle_patches(x, patch_size, perm)}
    tasks = {}
    for name in names:
        g, f, k = torch.Generator().manual_seed(seed), transform[name], len(new) if name == "new5" else 10
        (xtr, ytr), (xte, yte) = ((data[f"x_{s}"], remap[data[f"y_{s}"]] if name == "new5" else data[f"y_{s}"])
                                  for s in ("train", "test"))
        tr, te = subsample(ytr, n_train, n_per_class, k, g), subsample(yte, n_test, 0, k, g)
        tasks[name] = Task(name, f(xtr[tr]), ytr[tr], f(xte[te]), yte[te], k)  # transformed after the subsampling
    return tasks

def subsample(y: torch.Tensor, n: int, n_per_class: int, k: int, generator) -> torch.Tensor:
    """Random indices of images labelled 0 .. k - 1: n_per_class of each class (few-shot), else n (0: all)."""
    if not n_per_class:
        idx = (y >= 0).nonzero().flatten()
        return idx[torch.randperm(len(idx), generator=generator)[:n or len(idx)]]
    idx = [(y == c).nonzero().flatten() for c in range(k)]
    if short := [c for c in range(k) if len(idx[c]) < n_per_class]:
        raise ValueError(f"--n-per-class {n_per_class}: class {short[0]} has only {len(idx[short[0]])} training images")
    return torch.cat([i[torch.randperm(len(i), generator=generator)[:n_per_class]] for i in idx])

def shuffle_patches(x: torch.Tensor, p: int, perm: torch.Tensor) -> torch.Tensor:  # p x p tiles of (B, C, H, W) by perm
    B, C, H, W = x.shape
    tiles = x.reshape(B, C, H // p, p, W // p, p).transpose(3, 4).reshape(B, C, -1, p, p)[:, :, perm]
    return tiles.reshape(B, C, H // p, W // p, p, p).transpose(3, 4).reshape(B, C, H, W)

class Batches:  # endless shuffled mini-batches of indices from an explicit generator, epochs concatenated
    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.generator = n, batch_size, torch.Generator().manual_seed(seed)
        self.queue = torch.empty(0, dtype=torch.long)
    def next(self) -> torch.Tensor:
        while len(self.queue) < self.batch_size:
            self.queue = torch.cat([self.queue, torch.randperm(self.n, generator=self.generator)])
        idx, self.queue = self.queue[:self.batch_size], self.queue[self.batch_size:]
        return idx

# ---------------------------------------------------------------------------------------------- model and training
def build_model(cfg: Config, x: torch.Tensor, num_classes: int) -> VisionTransformer:  # for images like x (N, C, H, H)
    return VisionTransformer(img_size=x.shape[-1], patch_size=cfg.patch_size, in_chans=x.shape[1], num_classes=num_classes,
                             embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio)

def load_backbone(cfg: Config, data: dict) -> dict:
    """The pretrained ViT's state dict from --backbone, refused if pretrained for another model or other data."""
    if not Path(cfg.backbone).is_file():
        raise FileNotFoundError(f"--backbone {cfg.backbone}: no such file; python -m lab.vit_runs pretrains one")
    saved = torch.load(cfg.backbone, map_location="cpu", weights_only=True)  # {"state", "config", "source_acc"}
    own = {**{k: getattr(cfg, k) for k in ARCH}, "data_sha1": data["sha1"]}
    if diff := [f"{k}={saved['config'].get(k)} (this run: {v})" for k, v in own.items() if saved["config"].get(k) != v]:
        raise ValueError(f"--backbone {cfg.backbone} was pretrained with {', '.join(diff)}: pass its flags, or pretrain "
                         "one for yours with python -m lab.vit_runs (which runs this job too)")
    return saved["state"]

def autocast(device: torch.device):  # bf16 autocast on CUDA only; CPU and MPS run in float32
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250, features: bool = False):
    """(accuracy, mean cross-entropy) in eval mode, every adapter on; features: the (N, D) final class tokens."""
    # 250 images a batch keep a block's activations in the CPU's cache: a third faster than 1000
    device, was_training, out = next(model.parameters()).device, model.training, []
    model.eval()
    for i in range(0, len(x), batch_size):
        with autocast(device) if not features else nullcontext():  # the probe's features in float32
            h = model.blocks(model.embed(to_float(x[i:i + batch_size]).to(device)))  # (B, N+1, D)
            out.append(model.norm(h)[:, 0].float().cpu() if features else model.forward_head(h).float())
    model.train(was_training)
    if features:
        return torch.cat(out)
    logits, y = torch.cat(out), y.to(device)  # (N, num_classes)
    return (logits.argmax(1) == y).sum().item() / len(y), F.cross_entropy(logits, y).item()  # an exact fraction

def train_loop(model, x, y, cfg: Config, *, steps: int, lr: float, batch_size: int, weight_decay: float, warmup: int,
               seed: int, name: str, coto=None, run=None) -> dict:
    """AdamW on the trainable parameters, one log line every cfg.log_every steps: the run's history and timings.
    run (lab.vit_runs): start() restores a checkpoint, wrap() wraps the model for DDP, step() saves each step's."""
    device, params = next(model.parameters()).device, [p for p in model.parameters() if p.requires_grad]
    opt, batches = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), Batches(len(y), batch_size, seed)
    log = {"history": [], "seconds": [], "active": [], "sums": {}, "n": 0}  # the whole run's, resumed with it
    start, net = (run.start(model, opt, coto, batches, log), run.wrap(model)) if run else (0, model)
    model.train()
    for step in range(start, steps):
        clock = time.perf_counter()
        lr_now = get_lr(step, steps, lr, warmup)
        for group in opt.param_groups:
            group["lr"] = lr_now
        if coto is not None:
            coto.step(step)  # CoTo: each block's adapters train with probability p(step), one draw per step
        idx = batches.next()
        xb, yb = to_float(x[idx]).to(device), y[idx].to(device)
        with autocast(device):
            logits = net(xb)  # (B, num_classes)
        loss = F.cross_entropy(logits.float(), yb)
        loss.backward()
        check_finite(loss, params, step + 1, lr, name)
        opt.step()
        opt.zero_grad(set_to_none=True)  # a bypassed adapter keeps grad None: AdamW leaves it alone
        stats = {"loss": loss.item(), "acc": (logits.argmax(1) == yb).float().mean().item()}  # waits for the GPU
        done, seconds = step + 1, time.perf_counter() - clock
        log["seconds"].append(seconds)
        log["active"] += [coto.mask.float().mean().item()] if coto is not None else []
        stats = {k: log["sums"].get(k, 0.0) + v for k, v in {**stats, "ms": 1e3 * seconds}.items()}
        log["sums"], log["n"] = stats, log["n"] + 1  # summed until the next log line
        if done == steps or cfg.log_every and done % cfg.log_every == 0:  # one fixed-format line, one record
            rec = {"tag": name, "step": done, **{k: v / log["n"] for k, v in log["sums"].items()}, "lr": lr_now}
            log["history"].append({**rec, "p": coto.p} if coto is not None else rec)
            log["sums"], log["n"] = {}, 0
            p = f" | p {coto.p:.2f} | active {int(coto.mask.sum())}/{len(coto.mask)}" if coto is not None else ""
            print(f"{name} | step {done} | loss {rec['loss']:.3f} | acc {rec['acc']:.3f}{p} | {rec['ms']:.0f} ms | "
                  f"eta {timedelta(seconds=round(rec['ms'] / 1e3 * (steps - done)))}", flush=True)
        if run:  # it holds `log`: the records of step `done` are its last
            run.step(done)
    steady = [s for s in log["seconds"] if s <= 5 * statistics.median(log["seconds"])]  # slower: compile / warm-up
    return {"history": log["history"], "train_time_s": sum(log["seconds"]), "warmup_s": sum(log["seconds"]) - sum(steady),
            "ms_per_step": 1e3 * statistics.fmean(steady), "active_frac": statistics.fmean(log["active"] or [1.0])}

def check_finite(loss: torch.Tensor, params: list, step: int, lr: float, name: str) -> None:
    """Stop at the first non-finite loss or gradient, before opt.step() (under DDP the gradients are all ranks')."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if not (loss.isfinite() and norm.isfinite()):
        raise FloatingPointError(f"{name}: at step {step} the loss is {loss:.4g} and the gradient norm {norm:.4g}: "
                                 f"training diverged. Rerun with a lower learning rate (this run's peak: {lr:g})")

# ---------------------------------------------------------------------------------------------- probing, fine-tuning
@torch.no_grad()
def linear_probe(model: VisionTransformer, task: Task, weight_decay: float = 1e-4, iters: int = 100) -> tuple:
    """Logistic regression on the frozen features (L-BFGS): ({"weight": (K, D), "bias": (K,)}, test accuracy)."""
    ftr, fte = (evaluate(model, x, None, features=True) for x in (task.x_train, task.x_test))  # (N, D), once a task
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6  # standardised for L-BFGS, folded back into the head below
    W, bias = (torch.zeros(task.num_classes, *d, requires_grad=True) for d in (ftr.shape[1:], ()))  # (K, D), (K,)
    opt = torch.optim.LBFGS([W, bias], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")
    def closure():
        with torch.enable_grad():
            opt.zero_grad()
            loss = F.cross_entropy(F.linear((ftr - mu) / sd, W, bias), task.y_train) + weight_decay * W.square().sum()
            loss.backward()
        return loss
    opt.step(closure)
    w = W / sd  # W (f - mu) / sd + bias == (W / sd) f + (bias - (W / sd) mu)
    b = bias - w @ mu
    return {"weight": w, "bias": b}, ((fte @ w.T + b).argmax(1) == task.y_test).float().mean().item()

def method_name(cfg: Config) -> str:  # "lora", "coto", "dora", "dora-coto", ...: a run's method in tables, folders
    return ("coto" if cfg.coto else "lora") if cfg.variant == "lora" else cfg.variant + "-coto" * cfg.coto

def adapt(cfg: Config, task: Task, backbone=None, probe_head=None) -> tuple:
    """(model, CoTo or None): the backbone (None: random), a task head and adapters (lora.py, coto.py check cfg)."""
    torch.manual_seed(cfg.seed + (zlib.crc32(task.name.encode()) if cfg.task_init else 0))  # LoRA and CoTo alike
    model = build_model(cfg, task.x_train, task.num_classes)
    if backbone is not None:
        load_pretrained(model, backbone)  # the source head is dropped: a fresh one for this task
    reset_head(model, task.num_classes, generator=torch.Generator().manual_seed(cfg.seed))
    if probe_head is not None and cfg.head != "learned":
        model.head.load_state_dict(probe_head)
    inject_lora(model, cfg.targets.split(","), r=cfg.r, alpha=cfg.alpha, dropout=cfg.lora_dropout, variant=cfg.variant,
                rslora=cfg.rslora)
    coto = CoTo(block_groups(model), cfg.steps, p0=cfg.p0, stage1_ratio=cfg.stage1_ratio, shape=cfg.shape,
                seed=cfg.seed) if cfg.coto else None
    return model, coto

def finetune(cfg: Config, task: Task, backbone: dict, probe_head=None, run=None) -> tuple:
    """LoRA (CoTo if cfg.coto) and a task head on the frozen backbone: (model, metrics); run: lab.vit_runs' files."""
    if cfg.head != "learned" and probe_head is None:  # else a fresh head would pass for the probe's
        raise ValueError(f"--head {cfg.head} starts at the linear probe: pass its head (linear_probe's first result)")
    model, coto = adapt(cfg, task, backbone, probe_head)
    mark_only_lora_as_trainable(model, also=("head",) if cfg.head != "probe" else ())  # prints the count
    log = train_loop(model.to(pick_device(cfg.device)), task.x_train, task.y_train, cfg, steps=cfg.steps, lr=cfg.lr,
                     batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, warmup=cfg.warmup, seed=cfg.seed,
                     coto=coto, run=run, name=f"{task.name} {method_name(cfg)} s{cfg.seed}")
    if coto is not None:
        coto.remove()  # every adapter trains again, as a model without CoTo
    acc, loss = evaluate(model, task.x_test, task.y_test)  # eval mode: every adapter runs
    metrics = {"task": task.name, "method": method_name(cfg), "seed": cfg.seed, "acc": acc, "loss": loss, **log}
    if run:  # the run's adapters.pt and result.json
        run.finish(model, metrics)
    return model.eval(), metrics

def adapter_state(model) -> dict:  # what a fine-tuned model adds to the backbone: its adapters and its head
    return {**lora_state_dict(model), **{f"head.{k}": v.detach().cpu() for k, v in model.head.state_dict().items()}}

# ---------------------------------------------------------------------------------------------- the job
def main(cfg: Config, data=None, backbone=load_backbone, runs=None) -> dict:
    """For every task: a linear probe on the backbone, then LoRA and CoTo, each over seeds; the tables. The lab
    (lab.vit_runs) passes other data, backbone(cfg, data) that pretrains, and runs(cfg, task): each run's folder."""
    try:  # the flags naming places, checked before any work too
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out-dir {cfg.out_dir}: cannot write there ({e.strerror}); choose another folder") from None
    pick_device(cfg.device), data_dirs(cfg.data_dir)
    t0, names, data = time.time(), cfg.tasks.split(","), data or load_data(cfg)
    print(f"output: {cfg.out_dir}\ndata: {data['name']} from {data['folder']}", flush=True)
    tasks = make_tasks(data, names, parse_classes(cfg.source_classes), cfg.patch_size, cfg.n_train, cfg.n_test,
                       cfg.n_per_class, seed=0)  # the same images for every seed: seeds vary init, order, draws
    jobs = [(n, dataclasses.replace(cfg, coto=coto, seed=s)) for n in names for s in range(cfg.seed, cfg.seed + cfg.seeds)
            for coto in (sorted({cfg.coto, not cfg.coto}) if cfg.compare else [cfg.coto])]  # plain LoRA first
    adapt(cfg, tasks[names[0]])  # what lora.py, coto.py or the ViT refuse stops the job now, before any work
    folders = {(n, c.coto, c.seed): runs(c, tasks[n]) for n, c in jobs} if runs else {}  # other flags there: stop now
    backbone = backbone(cfg, data)  # the pretrained ViT's state dict
    probe_model, results, models = build_model(cfg, data["x_train"], 10), {"probe": {}, "runs": []}, {}
    for name, task in tasks.items():
        load_pretrained(probe_model, backbone)
        probe_head, results["probe"][name] = linear_probe(probe_model.to(pick_device(cfg.device)), task)
        print(f"{name}: frozen-backbone linear probe test accuracy {results['probe'][name]:.4f}", flush=True)
        for c in (c for n, c in jobs if n == name):
            run = folders.get((name, c.coto, c.seed))  # finished before (lab.vit_runs --resume): its saved adapters
            models[name, c.coto, c.seed], metrics = (run.load(backbone), run.result) if run and run.result \
                else finetune(c, task, backbone, probe_head, run)
            results["runs"].append(metrics)
    results["wall_s"] = time.time() - t0
    print(seed_table("\ntest accuracy in %", results["runs"], results["probe"]))
    for m in dict.fromkeys(r["method"] for r in results["runs"]):
        ms, warm, active = (statistics.fmean(r[k] for r in results["runs"] if r["method"] == m) for k in STATS)
        print(f"{m}: {ms:.0f} ms/step (steady state) + {warm:.1f} s compile / warm-up, adapters active "
              f"{100 * active:.1f}% of block-steps")
    results["robustness"] = rob = robustness(cfg, jobs, tasks, models)
    print(seed_table("\nonly every other block's adapters on (blocks 0, 2, ...), test accuracy in %",
                     rob["every_other"], results["probe"]))
    print(seed_table("\ntwo seeds' adapters interpolated at lambda 0.5 (every adapter tensor and the head "
                     "averaged), test accuracy in %", rob["interp"], results["probe"]) if rob["interp"] else
          "seed interpolation needs two seeds' runs: run with --seeds 2 (or more)")
    print(f"total {timedelta(seconds=round(time.time() - t0))}")
    (Path(cfg.out_dir) / "results.json").write_text(json.dumps({**results, "config": dataclasses.asdict(cfg)}, indent=1))
    print(f"wrote {cfg.out_dir}/results.json (its figure: python -m lab.vit_report {cfg.out_dir})")
    return results

def robustness(cfg: Config, jobs: list, tasks: dict, models: dict) -> dict:
    """Accuracy with only blocks 0, 2, ... adapted, per run; of two seeds averaged (0.5), per seed pair (s, s + 1)."""
    out = {"every_other": [], "interp": []}
    for name, c in jobs:
        task, model = tasks[name], models[name, c.coto, c.seed]
        record = {"task": name, "method": method_name(c), "seed": c.seed}
        with coalition(block_groups(model), range(0, cfg.depth, 2)):
            out["every_other"].append({**record, "acc": evaluate(model, task.x_test, task.y_test)[0]})
        if (c.seed - cfg.seed) % 2 == 0 and c.seed + 1 < cfg.seed + cfg.seeds:
            with use_adapter(model, interpolate(adapter_state(model), adapter_state(models[name, c.coto, c.seed + 1]), 0.5)):
                out["interp"].append({**record, "seed": f"{c.seed}+{c.seed + 1}",
                                      "acc": evaluate(model, task.x_test, task.y_test)[0]})
    return out

def seed_table(title: str, runs: list, probe: dict) -> str:
    """Test accuracy in % per task and method, mean (± std) over seeds, beside the probe; B - A per seed."""
    seeds, methods = sorted({r["seed"] for r in runs}, key=str), list(dict.fromkeys(r["method"] for r in runs))
    acc = {m: {row: [statistics.fmean(100 * r["acc"] for r in runs if r["method"] == m and r["seed"] == s
                                      and row in ("mean", r["task"])) for s in seeds] for row in [*probe, "mean"]}
           for m in methods}
    probe = {**{t: 100 * a for t, a in probe.items()}, "mean": 100 * statistics.fmean(probe.values())}
    head = ["task", "linear probe", *methods] + ([f"{methods[1]} - {methods[0]} per seed"] if len(methods) == 2 else [])
    lines = [title + (f", seed {seeds[0]}" if len(seeds) == 1 else f", seeds {', '.join(map(str, seeds))}: mean ± std"),
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row, base in probe.items():
        cells = [f"{statistics.fmean(v):.1f}" + (f" ± {statistics.stdev(v):.1f}" if len(v) > 1 else "")
                 for v in (acc[m][row] for m in methods)]
        diff = [" ".join(f"{b - a:.1f}" for a, b in zip(*(acc[m][row] for m in methods)))] if len(methods) == 2 else []
        lines.append("| " + " | ".join([row, f"{base:.1f}", *cells, *diff]) + " |")
    return "\n".join(lines)

if __name__ == "__main__":
    try:
        main(parse_args(Config, __doc__, EXAMPLE))
    except (ValueError, FileNotFoundError, FloatingPointError) as e:  # one line that says what to do
        raise SystemExit(f"train_vit.py: error: {e}")
