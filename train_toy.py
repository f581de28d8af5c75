"""CoTo (arXiv 2506.05713) in half a minute on a CPU, on a toy task the script makes itself: LoRA with and without
CoTo on a pretrained residual MLP; accuracy, two seeds averaged, every other block's adapters removed, and a figure.
    OMP_NUM_THREADS=1 python train_toy.py     # ~30 s on 2 CPU cores, the same digits every run"""
import argparse
import dataclasses
import inspect
import math
import os
import re
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

from coto import CoTo, block_groups, coto_prob
from games import coalition, interpolate, score, use_adapter
from lora import inject_lora, lora_state_dict, mark_only_lora_as_trainable

@dataclasses.dataclass
class Config:
    d_in: int = 16              # dimension of the synthetic input points
    dim: int = 64               # width of the residual stream between blocks
    n_blocks: int = 6           # residual blocks; each block's adapters are one CoTo group
    n_classes: int = 8          # classes the random teacher network assigns
    n_train: int = 8192         # training points per task (source and downstream); half as many test points
    rotation: float = 1.0       # how far the downstream inputs turn: x -> x @ exp(rotation * skew-symmetric)
    batch_size: int = 256       # points per optimizer step, in pretraining and fine-tuning
    pretrain_steps: int = 800   # AdamW steps training the whole backbone on the source task
    pretrain_lr: float = 3e-3   # peak learning rate of pretraining (cosine decay to 0)
    steps: int = 800            # AdamW steps training the adapters on the downstream task
    lr: float = 1e-2            # peak learning rate of fine-tuning (cosine decay to 0)
    r: int = 8                  # LoRA rank of every adapter (at most --dim)
    alpha: float = 16.0         # LoRA scale numerator: the update B @ A is scaled by alpha / r
    p0: float = 0.0             # CoTo's activation probability at step 0 (paper figure: 0; authors' code: 0.1)
    stage1_ratio: float = 0.75  # fraction of the steps over which p rises to 1; plain LoRA after
    seed: int = 0               # first fine-tuning seed: lora_A's initialisation, data order, CoTo draws
    seeds: int = 2              # fine-tuning seeds seed .. seed + seeds - 1; the first two are averaged
    pretrain_seed: int = 1234   # the generated data, the backbone's initialisation and its data order
    device: str = "auto"        # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    out_dir: str = "runs/toy"   # folder that gets the figure toy.png

    def __post_init__(self):  # every flag checked before any work, in one line naming it and what it allows
        low = {"seed": 0, "pretrain_seed": 0, "seeds": 2, "rotation": -math.inf}
        for name, v in vars(self).items():
            lo, hi = low.get(name, int(type(v) is int)), {"r": self.dim, "p0": 1, "stage1_ratio": 1}.get(name, math.inf)
            if type(v) in (int, float) and not (math.isfinite(v) and lo <= v <= hi):
                raise ValueError(f"--{name.replace('_', '-')} {v}: give a finite number, {lo} <= {name} <= {hi}")
        nearest = next(p for p in (Path(self.out_dir), *Path(self.out_dir).parents) if p.exists())  # made there
        if not (self.out_dir and nearest.is_dir() and os.access(nearest, os.W_OK)):
            raise ValueError(f"--out-dir {self.out_dir!r}: give a folder that can be written (it gets toy.png)")
        pick_device(self.device)

def parse_args(cls, doc: str, example: str, argv=None):  # shared by every script: train_vit and the lab import it
    """A `cls` (a Config dataclass) from the command line: a --flag per field, its `# comment` the help."""
    comments = {k: v for c in cls.__mro__[::-1] if dataclasses.is_dataclass(c)  # a subclass's fields too, its own last
                for k, v in re.findall(r"^ +(\w+): [^#\n]*# *(.*)$", inspect.getsource(c), re.M)}
    parser = argparse.ArgumentParser(description=doc, epilog=f"example:\n  {example}\n", usage="%(prog)s [--flag ...]",
                                     allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        kind = {"action": argparse.BooleanOptionalAction} if f.type in (bool, "bool") else {"type": type(f.default)}
        parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, **kind,
                            help=f"{comments.get(f.name, '')} (default: {f.default})".replace("%", "%%"))
    try:
        return cls(**vars(parser.parse_args(argv)))
    except (ValueError, TypeError) as e:  # a value the Config refuses: one line, like argparse's own errors
        parser.error(str(e))

def pick_device(name: str = "auto") -> torch.device:  # shared by every script
    """'auto' -> cuda, then mps, then cpu; a device this machine lacks is an error that says so."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    name = ("cuda" if cuda else "mps" if mps else "cpu") if name == "auto" else name
    if not {"cpu": True, "cuda": cuda, "mps": mps}.get(name.split(":")[0]):
        raise ValueError(f"--device {name}: not a device this torch has here; choose auto, cpu, cuda or mps")
    return torch.device(name)

def get_lr(step: int, total_steps: int, lr: float, warmup: int) -> float:  # shared by every script
    """Linear warmup for `warmup` steps, then cosine decay to 0 (a pure function of the step, like coto_prob)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(total_steps - warmup, 1)))

def make_tasks(cfg: Config) -> dict:
    """Source and downstream [(x, y) train, (x, y) test]: a random teacher's labels, of rotated x downstream."""
    g = torch.Generator().manual_seed(cfg.pretrain_seed)
    T1 = torch.randn(cfg.d_in, 4 * cfg.d_in, generator=g) / math.sqrt(cfg.d_in)  # the teacher: tanh(x T1) T2
    T2 = torch.randn(4 * cfg.d_in, cfg.n_classes, generator=g) / math.sqrt(4 * cfg.d_in)
    S = torch.randn(cfg.d_in, cfg.d_in, generator=g) / math.sqrt(cfg.d_in)
    R = torch.linalg.matrix_exp(cfg.rotation * (S - S.T))  # (d_in, d_in), orthogonal
    xs = [torch.randn(n, cfg.d_in, generator=g) for n in (cfg.n_train, cfg.n_train // 2) * 2]  # each (n, d_in)
    return {"source": [(x, (torch.tanh(x @ T1) @ T2).argmax(-1)) for x in xs[:2]],
            "target": [(x, (torch.tanh(x @ R @ T1) @ T2).argmax(-1)) for x in xs[2:]]}  # labels (n,)

class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, h):  # (B, dim) -> (B, dim)
        return h + self.fc2(F.gelu(self.fc1(self.norm(h))))

class ToyNet(nn.Sequential):  # (B, d_in) -> embed -> blocks -> norm -> head -> (B, n_classes), in this order
    def __init__(self, cfg: Config):
        super().__init__()
        self.embed = nn.Linear(cfg.d_in, cfg.dim)
        self.blocks = nn.Sequential(*(Block(cfg.dim, 2 * cfg.dim) for _ in range(cfg.n_blocks)))
        self.norm, self.head = nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, cfg.n_classes)

def train(model, data, total_steps, lr, batch_size, seed, coto=None, log_every=0, name=""):
    """AdamW, cosine LR, CoTo's draw (if given) before each step; returns each step's {loss, active}."""
    (x, y), (x_test, y_test) = data
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    g, history = torch.Generator().manual_seed(seed), []  # data order: the same with and without CoTo, any device
    for step in range(total_steps):
        opt.param_groups[0]["lr"] = get_lr(step, total_steps, lr, warmup=0)
        if coto is not None:
            coto.step(step)  # CoTo: one draw per optimizer step, each block's adapters on with prob p(step)
        idx = torch.randint(len(x), (batch_size,), generator=g).to(x.device)
        loss = F.cross_entropy(model.train()(x[idx]), y[idx])
        if not math.isfinite(loss.item()):  # stop before the step reaches the weights
            raise FloatingPointError(f"{name}: at step {step + 1} the loss is {loss.item()}: training diverged; rerun "
                                     f"with a lower learning rate than {lr:g} (--lr, or --pretrain-lr for pretraining)")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # None, not zero: bypassed adapters are not moved by AdamW
        history.append({"loss": loss.item(), "active": coto.mask.float().mean().item() if coto else 1.0})
        if step + 1 == total_steps or log_every and (step + 1) % log_every == 0:  # eval mode: every adapter runs
            masked = f" | p {coto.p:.2f} | active {int(coto.mask.sum())}/{len(coto.mask)}" if coto else ""
            print(f"{name} | step {step + 1} | loss {loss.item():.3f}{masked} | "
                  f"test acc {score(model.eval(), x_test, y_test):.4f}")
    return history

def evaluate(cfg: Config, models: list, x, y) -> dict:
    """Accuracy of each seed, of the first two seeds' adapters averaged, of each without every other block's."""
    with use_adapter(models[0], interpolate(lora_state_dict(models[0]), lora_state_dict(models[1]), 0.5)):
        averaged = score(models[0], x, y)  # lambda = 0.5 on the factors: A and B averaged apart
    accs, pruned = [score(m, x, y) for m in models], []
    for m in models:
        with coalition(block_groups(m), range(0, cfg.n_blocks, 2)):  # a group per block: the even ones stay on
            pruned.append(score(m, x, y))
    return {"acc": sum(accs) / len(accs), "interp_0.5": averaged, "prune_every_other": sum(pruned) / len(pruned)}

def plot(cfg: Config, results: dict, histories: dict, path: Path):
    """toy.png: the printed accuracies, the training loss and CoTo's active blocks per step; returns the figure."""
    def smooth(values):  # moving average over 15 steps, shorter at the ends
        return F.avg_pool1d(torch.tensor(values)[None, None], 15, 1, 7, count_include_pad=False)[0, 0].tolist()
    fig, (ax, ax_loss, ax_p) = plt.subplots(1, 3, figsize=(15, 4.2), width_ratios=[1.3, 1, 1], layout="tight")
    for j, m in enumerate(("lora", "coto")):
        bars = ax.bar([i + 0.4 * (j - 0.5) for i in range(3)], [100 * results[m][k] for k in results[m]], 0.4, label=m)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax_loss.plot(smooth([h["loss"] for h in histories[m, cfg.seed]]), label=m)
    ax.axhline(100 * results["base_target_acc"], color="0.4", ls="--", lw=1, label="frozen backbone")
    ax.set_xticks(range(3), ["fine-tuned", "2 seeds averaged\n(lambda = 0.5)", "every other block's\nadapters removed"])
    ax.set(ylim=(0, 118), ylabel=f"downstream test accuracy (%), mean of {cfg.seeds} seeds")  # 118: legend room
    ax_loss.set(title=f"training loss under the step's mask (seed {cfg.seed}, smoothed)", xlabel="step", yscale="log")
    ax_p.plot(smooth([h["active"] for h in histories["coto", cfg.seed]]), color="C1", label="fraction of blocks active")
    ax_p.plot([coto_prob(t, cfg.steps, cfg.p0, cfg.stage1_ratio) for t in range(cfg.steps)], "k--", label="p(t)")
    ax_p.set(title=f"CoTo's active blocks (seed {cfg.seed}, smoothed)", xlabel="step", ylim=(-0.02, 1.25))
    for a in fig.axes:
        a.legend(loc="upper right", fontsize=7, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig

def main(cfg: Config) -> dict:
    device = pick_device(cfg.device)
    print(f"output: {cfg.out_dir} | data: generated (seed {cfg.pretrain_seed}) | device: {device}")
    tasks = {k: [(x.to(device), y.to(device)) for x, y in splits] for k, splits in make_tasks(cfg).items()}
    torch.manual_seed(cfg.pretrain_seed)  # the backbone's initialisation
    backbone = ToyNet(cfg).to(device)
    train(backbone, tasks["source"], cfg.pretrain_steps, cfg.pretrain_lr, cfg.batch_size, cfg.pretrain_seed,
          log_every=400, name="pretrain")
    results, histories = {"base_target_acc": score(backbone.eval(), *tasks["target"][1])}, {}
    for method, use_coto in (("lora", False), ("coto", True)):
        models = [ToyNet(cfg) for _ in range(cfg.seeds)]
        for seed, model in enumerate(models, cfg.seed):  # LoRA on every fc1 / fc2 of a frozen backbone
            model.load_state_dict(backbone.state_dict())
            torch.manual_seed(seed)  # lora_A's initialisation
            inject_lora(model, ["fc1", "fc2"], r=cfg.r, alpha=cfg.alpha)
            mark_only_lora_as_trainable(model.to(device))  # the head stays frozen too: the classes are the same
            coto = CoTo(block_groups(model), cfg.steps, cfg.p0, cfg.stage1_ratio, seed=seed) if use_coto else None
            histories[method, seed] = train(model, tasks["target"], cfg.steps, cfg.lr, cfg.batch_size, seed, coto,
                                            log_every=100, name=f"{method} s{seed}")
        results[method] = evaluate(cfg, [m.eval() for m in models], *tasks["target"][1])
    print(f"\nbackbone: source acc {score(backbone, *tasks['source'][1]):.3f}, downstream acc without adapters "
          f"{results['base_target_acc']:.3f}\n| {'downstream test accuracy':<37} | LoRA  | CoTo  |\n|---|---|---|")
    for key, label in zip(results["lora"], (f"fine-tuned (mean of {cfg.seeds} seeds)", "2 seeds averaged, lambda = 0.5",
                                            "adapters of every other block removed")):  # a markdown table
        print(f"| {label:<37} | {results['lora'][key]:.3f} | {results['coto'][key]:.3f} |")
    plot(cfg, results, histories, Path(cfg.out_dir) / "toy.png")
    print(f"\nwrote {Path(cfg.out_dir) / 'toy.png'}")
    return results

if __name__ == "__main__":
    try:
        main(parse_args(Config, __doc__, "OMP_NUM_THREADS=1 python train_toy.py --r 4 --alpha 8 --steps 500"))
    except FloatingPointError as e:  # a diverging run: one line, not a traceback
        raise SystemExit(f"train_toy.py: error: {e}")
