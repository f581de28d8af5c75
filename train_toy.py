"""CoTo at work in about a minute on a CPU: a toy problem the script makes itself.

A small residual MLP with 6 blocks is pretrained to classify Gaussian points labelled by a random
teacher network; the downstream task labels rotated points with the same teacher, so the frozen
backbone gets it mostly wrong. LoRA adapters on every block's fc1 / fc2 are then trained with and
without CoTo (same seeds, same data order), and the script prints, side by side:
  - test accuracy,
  - accuracy of the two seeds' adapters averaged at lambda = 0.5 (factor-wise: A and B separately),
  - accuracy after removing the adapters of every other block (blocks 1, 3, 5).
It writes runs/toy/toy.png: these accuracies, the loss curves, CoTo's active blocks per step and p(t).

    python train_toy.py            # ~1 minute on 2 CPU cores
    python train_toy.py --device cuda
"""
import argparse
import dataclasses
import inspect
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from coto import CoTo, active_mask, block_groups
from lora import inject_lora, load_lora_state_dict, lora_state_dict, mark_only_lora_as_trainable
from lab.utils import TrainLog, check_finite, method_name, run_script


@dataclass
class Config:
    d_in: int = 16             # input dimension of the synthetic points
    dim: int = 64              # residual width
    hidden: int = 128          # MLP width inside a block
    n_blocks: int = 6          # blocks = CoTo groups
    n_classes: int = 8
    n_train: int = 8192
    n_test: int = 4096
    rotation: float = 1.0      # how far the downstream inputs are rotated (radians-ish scale)
    batch_size: int = 256
    pretrain_steps: int = 800
    pretrain_lr: float = 3e-3
    steps: int = 800           # fine-tuning optimizer steps
    lr: float = 1e-2
    r: int = 8
    alpha: float = 16.0
    p0: float = 0.0            # CoTo's starting probability (paper figure: 0; authors' snippet: 0.1)
    stage1_ratio: float = 0.75
    seed: int = 0              # first fine-tuning seed: lora_A's initialisation, data order, CoTo draws
    seeds: int = 2             # seeds seed .. seed + seeds - 1; the first two's adapters are averaged at lambda = 0.5
    pretrain_seed: int = 1234  # the generated data, the backbone's initialisation and its data order
    log_every: int = 100       # steps between log lines (0 = only the last step)
    device: str = "auto"       # auto | cpu | cuda | mps
    out_dir: str = "runs/toy"
    plot: bool = True


# ---------------------------------------------------------------------------------------------
# Three helpers every script shares (train_vit.py and the lab import them from here)


def parse_args(cls, doc: str, example: str, argv=None):
    """A `cls` (a Config dataclass) from the command line: one --flag per field, its `# comment`
    as the help, --flag / --no-flag for booleans. A value the Config refuses is a one-line error."""
    comments = dict(re.findall(r"^ +(\w+): [^#\n]*# *(.*)$", inspect.getsource(cls), re.M))
    parser = argparse.ArgumentParser(description=doc, epilog=f"example:\n  {example}\n", allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        kind = {"action": argparse.BooleanOptionalAction} if f.type in (bool, "bool") else {"type": type(f.default)}
        parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, **kind,
                            help=f"{comments.get(f.name, '')} (default: {f.default})".replace("%", "%%"))
    try:
        return cls(**vars(parser.parse_args(argv)))
    except (ValueError, TypeError) as e:
        parser.error(str(e))


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu; a device this machine lacks is an error that says so."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available() or device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: this torch sees no such device here; use --device cpu (or auto)")
    return device


def get_lr(step: int, total_steps: int, lr: float, warmup: int) -> float:
    """Linear warmup for `warmup` steps, then cosine decay to 0 (a pure function of the step, like coto_prob)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(total_steps - warmup, 1)))


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, h):  # (B, dim) -> (B, dim)
        return h + self.fc2(F.gelu(self.fc1(self.norm(h))))


class ToyNet(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed = nn.Linear(cfg.d_in, cfg.dim)
        self.blocks = nn.Sequential(*(Block(cfg.dim, cfg.hidden) for _ in range(cfg.n_blocks)))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.n_classes)

    def forward(self, x):  # (B, d_in) -> (B, n_classes)
        return self.head(self.norm(self.blocks(self.embed(x))))


def make_tasks(cfg: Config) -> dict:
    """Source and downstream (x, y) splits. Labels come from a random 2-layer teacher; the
    downstream task feeds the teacher rotated points, x -> x @ R, R = exp(skew-symmetric)."""
    g = torch.Generator().manual_seed(cfg.pretrain_seed)
    T1 = torch.randn(cfg.d_in, 4 * cfg.d_in, generator=g) / math.sqrt(cfg.d_in)
    T2 = torch.randn(4 * cfg.d_in, cfg.n_classes, generator=g) / math.sqrt(4 * cfg.d_in)
    S = torch.randn(cfg.d_in, cfg.d_in, generator=g) / math.sqrt(cfg.d_in)
    R = torch.linalg.matrix_exp(cfg.rotation * (S - S.T))  # (d_in, d_in), orthogonal

    def split(n, rotate):
        x = torch.randn(n, cfg.d_in, generator=g)
        return x, (torch.tanh((x @ R if rotate else x) @ T1) @ T2).argmax(-1)  # the teacher's labels

    return {"source": (split(cfg.n_train, False), split(cfg.n_test, False)),
            "target": (split(cfg.n_train, True), split(cfg.n_test, True))}


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    """Test accuracy in eval mode, where every adapter runs (CoTo's mask acts in training mode only)."""
    was_training = model.training
    model.eval()
    acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train(was_training)
    return acc


def train(model, data, total_steps, lr, batch_size, seed, coto=None, log_every=0, name=""):
    """AdamW on the trainable parameters with a cosine LR; CoTo (if given) draws its mask before every
    optimizer step. Stops at the first non-finite loss or gradient. Returns per-step {loss, p, active}."""
    (x, y), (x_test, y_test) = data
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)  # data order: identical with and without CoTo, on any device
    log, history = TrainLog(name, total_steps, log_every), []
    model.train()
    for step in range(total_steps):
        lr_now = get_lr(step, total_steps, lr, warmup=0)
        for group in opt.param_groups:
            group["lr"] = lr_now
        if coto is not None:
            coto.step(step)  # CoTo: one draw per optimizer step, each block's adapters on with prob p(step)
        idx = torch.randint(len(x), (batch_size,), generator=g).to(x.device)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        check_finite(loss, params, step + 1, lr, name)  # before the step reaches the weights
        opt.step()
        opt.zero_grad(set_to_none=True)  # None, not zero: bypassed adapters are not moved by AdamW
        history.append({"loss": loss.item(), "p": coto.p if coto else 1.0,
                        "active": coto.mask.float().mean().item() if coto else 1.0})
        log.step(step + 1, lr_now, coto, loss=history[-1]["loss"])
        if log_every and (step + 1) % log_every == 0:
            log.eval(step + 1, test_acc=accuracy(model, x_test, y_test))  # eval mode: every adapter runs
    return history


def pretrain(cfg: Config, tasks: dict) -> dict:
    torch.manual_seed(cfg.pretrain_seed)
    model = ToyNet(cfg).to(tasks["source"][0][0].device)
    train(model, tasks["source"], cfg.pretrain_steps, cfg.pretrain_lr, cfg.batch_size, seed=cfg.pretrain_seed,
          log_every=cfg.log_every * 4, name="pretrain")
    return model.state_dict()


def finetune(cfg: Config, backbone: dict, tasks: dict, seed: int, use_coto: bool):
    """LoRA on every block's fc1 / fc2 of a frozen pretrained ToyNet (head frozen too: the classes are
    the same), on the device of the task's tensors. Returns the model in eval mode and its history."""
    model = ToyNet(cfg)
    model.load_state_dict(backbone)
    torch.manual_seed(seed)  # lora_A's initialisation
    inject_lora(model, ["fc1", "fc2"], r=cfg.r, alpha=cfg.alpha)
    mark_only_lora_as_trainable(model)
    model.to(tasks["target"][0][0].device)
    coto = CoTo(block_groups(model), cfg.steps, cfg.p0, cfg.stage1_ratio, seed=seed) if use_coto else None
    name = f"{method_name('lora', use_coto)} s{seed}"
    history = train(model, tasks["target"], cfg.steps, cfg.lr, cfg.batch_size, seed, coto, cfg.log_every, name)
    return model.eval(), history  # eval mode: every adapter runs from here


def evaluate_method(cfg: Config, models: list, tasks: dict) -> dict:
    """Accuracy per seed, of the first two seeds' adapters averaged factor-wise at lambda = 0.5, and
    with every other block's adapters removed."""
    x, y = tasks["target"][1]
    accs = [accuracy(m, x, y) for m in models]
    states = [lora_state_dict(m) for m in models]
    avg = {k: 0.5 * (states[0][k] + states[1][k]) for k in states[0]}
    load_lora_state_dict(models[0], avg)
    averaged_acc = accuracy(models[0], x, y)
    load_lora_state_dict(models[0], states[0])
    keep_even = [i % 2 == 0 for i in range(cfg.n_blocks)]  # one CoTo group per block
    pruned = []
    for m in models:
        with active_mask(block_groups(m), keep_even):
            pruned.append(accuracy(m, x, y))
    return {"acc": sum(accs) / len(accs), "accs": accs, "interp_0.5": averaged_acc,
            "prune_every_other": sum(pruned) / len(pruned), "prune_accs": pruned}


def plot(cfg: Config, results: dict, histories: dict, path: Path) -> dict:
    """The accuracies main() prints (bars: mean over seeds, dots: each seed; the frozen backbone a line),
    the first seed's training loss and its fraction of active blocks with p(t). Returns what it draws:
    {"bars": {method: [%]}, "dots": {method: [[%]]}, "base": %, "loss": {method: [...]}, "p": [...]}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values):  # moving average over 15 steps, shorter at the ends
        v = torch.tensor(values)[None, None]
        return F.avg_pool1d(v, 15, 1, 7, count_include_pad=False)[0, 0].tolist()

    groups = ("fine-tuned", "2 seeds averaged\n(lambda = 0.5)", "every other block's\nadapters removed")
    bars = {m: [100 * results[m][k] for k in ("acc", "interp_0.5", "prune_every_other")] for m in ("lora", "coto")}
    dots = {m: [[100 * a for a in results[m]["accs"]], [], [100 * a for a in results[m]["prune_accs"]]]
            for m in ("lora", "coto")}
    base = 100 * results["base_target_acc"]
    loss = {m: smooth([h["loss"] for h in histories[m]]) for m in ("lora", "coto")}
    p = [h["p"] for h in histories["coto"]]
    steps = range(1, cfg.steps + 1)

    fig, (ax, ax_loss, ax_p) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    for j, m in enumerate(("lora", "coto")):
        x = [i + (j - 0.5) * 0.38 for i in range(len(groups))]
        drawn = ax.bar(x, bars[m], 0.38, color=f"C{j}", label=f"{m} (mean of {cfg.seeds} seeds)")
        ax.bar_label(drawn, fmt="%.1f", fontsize=8, padding=2)
        for xi, d in zip(x, dots[m]):
            ax.plot([xi] * len(d), d, "k.", ms=4, label="each seed" if j == 0 and xi == x[0] else None)
        ax_loss.plot(steps, loss[m], color=f"C{j}", label=m)
    ax.axhline(base, color="0.4", ls="--", lw=1, label=f"frozen backbone ({base:.1f})")
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set(ylim=(0, 118), yticks=range(0, 101, 20), ylabel="downstream test accuracy (%)",  # legend above 100
           title=f"toy task: LoRA vs CoTo (seeds {cfg.seed}-{cfg.seed + cfg.seeds - 1})")
    ax.legend(loc="upper right", fontsize=7, ncol=2, frameon=False)
    ax_loss.set(title=f"training loss under the step's mask (seed {cfg.seed}, smoothed)", xlabel="step",
                ylabel="train loss (log scale)", yscale="log")
    low, high = ax_loss.get_ylim()
    ax_loss.set_yticks([v for v in (0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10) if low <= v <= high])
    ax_loss.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # 0.3, not 3 x 10^-1
    ax_loss.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_loss.legend()
    active = [h["active"] for h in histories["coto"]]
    ax_p.plot(steps, active, ".", ms=2, alpha=0.3, color="C1", label="active blocks, per step")
    ax_p.plot(steps, smooth(active), color="C1", label="active blocks, moving average")
    ax_p.plot(steps, p, "k--", label=f"p(t), p0={cfg.p0}, stage1_ratio={cfg.stage1_ratio}")
    ax_p.set(title=f"CoTo: fraction of the {cfg.n_blocks} blocks active (seed {cfg.seed})", xlabel="step",
             ylim=(-0.02, 1.25))
    ax_p.legend(loc="upper left", fontsize=7, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"bars": bars, "dots": dots, "base": base, "loss": loss, "p": p}


def main(cfg: Config) -> dict:
    if cfg.seeds < 2:
        raise ValueError(f"--seeds {cfg.seeds}: give at least 2 (the first two seeds' adapters are averaged)")
    t0 = time.perf_counter()
    device = pick_device(cfg.device)
    print(f"output: {cfg.out_dir} | data: generated (seed {cfg.pretrain_seed}) | device: {device}")
    tasks = {k: tuple((x.to(device), y.to(device)) for x, y in splits) for k, splits in make_tasks(cfg).items()}
    backbone = pretrain(cfg, tasks)
    base = ToyNet(cfg).to(device)
    base.load_state_dict(backbone)
    results = {"source_acc": accuracy(base, *tasks["source"][1]),
               "base_target_acc": accuracy(base, *tasks["target"][1])}
    histories = {}
    for method in ("lora", "coto"):
        seeds = range(cfg.seed, cfg.seed + cfg.seeds)
        runs = [finetune(cfg, backbone, tasks, seed, method == "coto") for seed in seeds]
        histories[method] = runs[0][1]
        results[method] = evaluate_method(cfg, [m for m, _ in runs], tasks)
    results["seconds"] = time.perf_counter() - t0

    print(f"\nbackbone: source acc {results['source_acc']:.3f}, "
          f"downstream acc without adapters {results['base_target_acc']:.3f}")
    print(f"{'downstream test accuracy':<40}{'LoRA':>8}{'CoTo':>8}")
    for key, label in (("acc", f"fine-tuned (mean of {cfg.seeds} seeds)"),
                       ("interp_0.5", "2 seeds averaged, lambda = 0.5"),
                       ("prune_every_other", "adapters of every other block removed")):
        print(f"{label:<40}{results['lora'][key]:>8.3f}{results['coto'][key]:>8.3f}")
    print(f"total time {results['seconds']:.0f} s")
    if cfg.plot:
        path = Path(cfg.out_dir) / "toy.png"
        plot(cfg, results, histories, path)
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    run_script(main, Config, __doc__, __file__, "the toy demo keeps no checkpoints; run it again (about a minute)")
