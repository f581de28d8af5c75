"""The paper's table at small scale: LoRA vs CoTo on train_vit.py's tasks, with games.py's analyses.
Several seeds per setting; a markdown table sets the paper's numbers (arXiv 2506.05713) beside.

    python -m lab.reproduce --quick   # a smoke test of the whole pipeline (minutes); its
                                  # 20-step runs are too short for the verdicts to mean anything
    python -m lab.reproduce           # every study, 3 seeds: hours on a 2-core CPU; split it over processes
                                  # by --studies (RESULTS.md); rerun the same command to resume
    python -m lab.reproduce --analyse runs/vit   # only games.py's reports on runs lab.vit_runs saved

Regimes (studies): "full" (the training split, a fresh learned head), "probe_init" (the head starts at
the linear probe and trains: train_vit.py's default), "probe" (the frozen linear-probe head), "fewshot"
(16 examples per class, CLIP-LoRA-like r=2, alpha=1, rsLoRA, many epochs), "taskinit" (full, each task's
adapters initialised apart), "dynamics" (one task trained 10x longer, where the accuracies nearly meet),
an LR sweep, the DoRA / HiRA variants (accuracy and wall-clock), ablations (p0, stage1 ratio, ramp shape;
"ramps": the other ramps trained long) and controls, each analysed like LoRA and CoTo and set against
the full regime's CoTo ("baselines": constant-rate layer drop, element-wise and progressive LoRA dropout
0.1, LoRA rescaled to CoTo's size; "controls": p = 0.5 for CoTo's stage 1 then every adapter on, dropout
and progressive dropout 0.25; "matched": LoRA trained to CoTo's accuracy by fewer steps, chosen on
validation images). Every regime has a row for the head alone (every adapter bypassed).
Every comparison is at equal optimizer steps unless a control says otherwise; the wall-clock row reports
the time ratio itself. Intervals are 95 % t intervals over seeds (over disjoint seed pairs for
interpolation); LoRA and CoTo share a seed's initialisation and data order, so the verdict uses the
paired difference CoTo - LoRA, and for interpolation, combining and pruning also the change each causes
(after - before). Each section of the table is one family of tests, with Holm's adjusted p, and with
TOST against a declared margin where a difference may be called "equivalent".

Every fine-tuning run and every analysis is cached as JSON under out_dir (runs/<study>/<task>/
<setting>/seed<k>/ holds lab.vit_runs' adapters.pt and result.json; analysis/ holds the
games.py reports), so an interrupted run picks up where it stopped. Writes out_dir/results.json (all
numbers), out_dir/table.md (the README table) and the games.py plots of the "full" regime.

This is the file that knows where runs are saved: --analyse finds every run folder (a result.json
beside an adapters.pt) under a lab.vit_runs --out-dir, reads the run's task, method, seed
and configuration from its result.json, and writes games.json and the plots to <that folder>/games/.
"""
import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import shlex
import statistics
import time
from dataclasses import dataclass
from functools import partial, reduce
from pathlib import Path

import torch

import games
import train_vit
from train_toy import pick_device
from coto import block_groups, coto_prob
from lab import vit_runs
from lab.reports import adapter_report, combine_report, pair_report, plot_reports, rescale_to_norm
from lab.utils import atomic_save, atomic_write_text, format_eta, run_script

STUDIES = "full,probe_init,probe,fewshot,lr,variants,ablations,baselines,controls,matched,taskinit,dynamics,ramps"


@dataclass
class Config:
    out_dir: str = "runs/repro"  # runs, analyses and the table; rerunning resumes from here
    quick: bool = False  # a smoke test (minutes): 2 tasks, 20-step runs, small held-out sets; verdicts mean nothing
    seeds: int = 3  # seeds per setting (>= 3 for an interval; 5 where time allows)
    tasks: str = "new5,rot90,invert,shuffle"  # train_vit.py tasks of the "full" and "fewshot" regimes
    side_tasks: int = 1  # the first this many tasks: LR sweep, variants, ablations ("probe": at least 2)
    steps: int = 150  # fine-tuning steps in the full-data regimes
    lr: float = 1e-2  # fine-tuning LR in the full-data regimes (train_vit.py's default)
    fewshot_steps: int = 300  # fine-tuning steps of the few-shot regime (16 per class, batch 32: ~60 epochs)
    fewshot_lr: float = 2e-3  # fine-tuning LR of the few-shot regime (16 images per class, r=2)
    lrs: str = "3e-3,3e-2,1e-1"  # LR sweep besides `lr` (full data); up to where LoRA degrades
    long_task: str = "rot90"  # the "dynamics" study: one task trained long, test accuracy along the way
    long_steps: int = 1500  # fine-tuning steps of the dynamics study (10x the full regime's)
    n_test: int = 2000  # test images per task for the single-task accuracy (0: the whole test split)
    n_eval: int = 500  # held-out images per task for the analyses: the first n_eval test images
    pretrain_steps: int = 500  # optimizer steps of the backbone's pretraining (lab.vit_runs', cached)
    matched_steps: str = "60,90,120"  # the "matched" control: LoRA's training lengths to choose from on validation
    n_val: int = 2000  # validation images per task (training images outside the training subset) for "matched"
    studies: str = STUDIES  # comma-separated parts of the table to run, any of these
    tost_margin: float = 0.03  # equivalence tests (TOST): a difference within ± this (0.03: 3 points) is "equivalent"
    vit: str = ""  # JSON of extra train_vit.Config fields for every run, e.g. '{"depth": 4}'
    data_dir: str = ""  # folder of the data files ("": train_vit.py's search path: ./data, then Debian's)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    # instead of the table: games.py's reports on the runs another lab.vit_runs command saved
    analyse: str = ""  # a lab.vit_runs --out-dir: only the reports on its saved runs, into <it>/games/ (cached)
    methods: str = "lora,coto"  # --analyse: the methods compared side by side (result.json's "method")
    value: str = "acc"  # --analyse: acc (accuracy) | neg_loss (minus the cross-entropy)
    players: str = "block"  # --analyse: block (exact Shapley per block) | module (also per module, sampled)
    num_samples: int = 16  # --analyse, players=module: multilinear samples (each 2 (n + 1) evaluations)

    def __post_init__(self):  # every flag checked before any work: one line naming it and what it accepts
        flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
        problems = [f"{flag(k)} {getattr(self, k)}: must be an integer >= {low}" for k, low in (
            ("seeds", 1), ("side_tasks", 1), ("steps", 1), ("fewshot_steps", 1), ("long_steps", 1), ("n_test", 0),
            ("n_val", 1), ("n_eval", 1), ("pretrain_steps", 1), ("num_samples", 1)) if getattr(self, k) < low]
        problems += [f"{flag(k)} {getattr(self, k)}: must be > 0" for k in ("lr", "fewshot_lr", "tost_margin")
                     if not getattr(self, k) > 0]
        problems += [f"--n-eval {self.n_eval}: at most --n-test {self.n_test} (the held-out set is the first n_eval "
                     "test images)"] * (0 < self.n_test < self.n_eval)
        problems += [f"{flag(k)} {getattr(self, k)!r}: unknown task {t!r}; choose from {', '.join(train_vit.TASKS)}"
                     for k in ("tasks", "long_task") for t in getattr(self, k).split(",") if t not in train_vit.TASKS]
        problems += [f"--{k} {getattr(self, k)!r}: choose {' or '.join(c)}" for k, c in (
            ("value", ("acc", "neg_loss")), ("players", ("block", "module"))) if getattr(self, k) not in c]
        try:
            assert all(float(v) > 0 for v in self.lrs.split(","))
        except (ValueError, AssertionError):
            problems.append(f"--lrs {self.lrs!r}: write learning rates > 0 separated by commas, e.g. 3e-3,3e-2")
        if not all(v.isdigit() and int(v) > 0 for v in self.matched_steps.split(",")):
            problems.append(f"--matched-steps {self.matched_steps!r}: write step counts > 0 separated by commas, "
                            "e.g. 60,90,120")
        try:
            assert isinstance(json.loads(self.vit or "{}"), dict)
        except (ValueError, AssertionError):
            problems.append(f"--vit {self.vit!r}: write a JSON object of train_vit.Config fields, e.g. '{{\"depth\": 4}}'")
        problems += ["--out-dir '': name a folder"] * (not self.out_dir) + ["--methods '': name at least one method"] * (
            not self.methods)
        if problems:
            raise ValueError(problems[0])


def quick_config(cfg: Config) -> Config:
    """--quick: the same table, smaller (two tasks, shorter runs, smaller test and held-out sets)."""
    out_dir = cfg.out_dir if cfg.out_dir != Config.out_dir else Config.out_dir + "-quick"
    return dataclasses.replace(cfg, out_dir=out_dir, tasks=",".join(cfg.tasks.split(",")[:2]), side_tasks=1, steps=20,
                               fewshot_steps=30, long_steps=40, lrs="1e-1", n_test=300, n_eval=100, pretrain_steps=100,
                               matched_steps="10,15", n_val=100)


# ---------------------------------------------------------------------------------------------
# What to run: studies of settings (train_vit.Config overrides), each over tasks and seeds


# The "less-trained adapter" control. CoTo updates each adapter on ~62.5 % of the steps, and a
# smaller update might combine and prune better by itself. This setting is the "full" regime's
# LoRA adapter with each layer's delta W rescaled to the Frobenius norm of CoTo's (same task and
# seed; lab.reports.rescale_to_norm): LoRA's directions at CoTo's size. Chosen over "LoRA with as many
# adapter updates as CoTo" because that one also changes the LR schedule and the data seen.
RESCALED = "lora rescaled to coto"


# The "matched" control: LoRA trained (not rescaled) to CoTo's accuracy, by fewer steps. For each task
# the length of --matched-steps whose seed-0 LoRA comes nearest seed-0 CoTo on the validation images
# (select_job) is the one every seed trains.
MATCHED = "lora matched to coto"


def studies(cfg: Config) -> list:
    """[(study, {setting: overrides}, tasks, analyse)]: analyse = run games.py's reports."""
    tasks = cfg.tasks.split(",")
    side = tasks[:cfg.side_tasks]
    pair = lambda extra: {"lora": {**extra, "coto": False}, "coto": {**extra, "coto": True}}  # noqa: E731
    fewshot = dict(n_per_class=16, r=2, alpha=1.0, rslora=True, lr=cfg.fewshot_lr, steps=cfg.fewshot_steps,
                   batch_size=32, warmup=20)
    lrs = [float(v) for v in cfg.lrs.split(",") if float(v) != cfg.lr]  # lr itself: the "full" runs
    # training length: the full regime 10x longer on one task, test accuracy every long_steps / 15
    long = dict(steps=cfg.long_steps, eval_every=max(1, cfg.long_steps // 15), log_every=max(1, cfg.long_steps // 30))
    out = [("full", pair({}), tasks, True),
           ("probe_init", pair({"head": "probe_init"}), tasks, True),
           ("probe", pair({"head": "probe"}), tasks, True),
           ("fewshot", pair(fewshot), tasks, True),
           ("lr", {f"{m}@{lr:g}": {"lr": lr, "coto": m == "coto"}
                   for lr in lrs for m in ("lora", "coto")}, side, False),
           ("variants", {f"{v}-{m}": {"variant": v, "coto": m == "coto"}
                         for v in ("dora", "hira") for m in ("lora", "coto")}, side, False),
           ("ablations", {"coto p0=0.1": {"coto": True, "p0": 0.1},
                          "coto stage1=0.5": {"coto": True, "stage1_ratio": 0.5},
                          "coto stage1=1.0": {"coto": True, "stage1_ratio": 1.0},
                          "coto shape=exp": {"coto": True, "shape": "exp"},
                          "coto shape=sine": {"coto": True, "shape": "sine"}}, side, False),
           # Controls, analysed like LoRA and CoTo of the "full" regime and set against its CoTo runs:
           # does any drop do what CoTo does, or a smaller update? (all tasks: combining needs several)
           ("baselines", {
               # stochastic depth for LoRA: each block's adapters on with CoTo's expected active fraction
               # (0.75 (p0 + 1) / 2 + 0.25 = 62.5 % at p0 = 0) at every step, so only the schedule differs from CoTo
               "layer drop p=0.625": {"coto": True, "shape": "constant", "p0": 0.625, "stage1_ratio": 1.0},
               "lora dropout 0.1": {"coto": False, "lora_dropout": 0.1},
               "progressive dropout 0.1": {"coto": False, "lora_dropout": 0.1, "progressive_dropout": True},
               RESCALED: {"coto": False},  # not trained: the "full" LoRA run, rescaled (rescale_job)
           }, tasks, True),
           # The ramp or the final all-on phase? The same mean exposure as CoTo's linear ramp from 0 over the
           # first 75 % of steps (p = 0.5 there), then every adapter on. Dropout at the paper's vision rate.
           ("controls", {"constant p=0.5, then all on": {"coto": True, "shape": "constant", "p0": 0.5},
                         "lora dropout 0.25": {"coto": False, "lora_dropout": 0.25},
                         "progressive dropout 0.25": {"coto": False, "lora_dropout": 0.25, "progressive_dropout": True},
                         }, tasks, True),
           ("matched", {MATCHED: {"coto": False}}, tasks, True),
           # within a seed the full regime's tasks start from the same A: merging them may be easier than
           # merging adapters that never shared an init
           ("taskinit", pair({"task_init": True}), tasks, True),
           # analysed: robustness where the accuracies nearly meet
           ("dynamics", pair(long), [cfg.long_task], True),
           ("ramps", {"coto shape=exp": {**long, "coto": True, "shape": "exp"},
                      "coto shape=sine": {**long, "coto": True, "shape": "sine"}}, [cfg.long_task], False)]
    chosen = cfg.studies.split(",")
    unknown = set(chosen) - {name for name, *_ in out}
    if unknown:
        raise ValueError(f"unknown studies {sorted(unknown)}: choose from {', '.join(name for name, *_ in out)}")
    for study in ("baselines", "controls", "matched"):
        if study in chosen and "full" not in chosen:
            raise ValueError(f"the {study} study is set against the full study's runs: add full to --studies")
    if "ramps" in chosen and "dynamics" not in chosen:
        raise ValueError("the ramps study is set against the dynamics study's LoRA: add dynamics to --studies")
    return [s for s in out if s[0] in chosen]


def vit_config(cfg: Config, overrides: dict, seed: int) -> vit_runs.Config:
    """The lab.vit_runs.Config of one run: train_vit.py's defaults, this script's settings (a fresh
    learned head unless a regime says otherwise; resumable), --vit, then the setting's overrides."""
    extra = json.loads(cfg.vit) if cfg.vit else {}
    base = vit_runs.Config(data_dir=cfg.data_dir, device=cfg.device, steps=cfg.steps, lr=cfg.lr, n_test=cfg.n_test,
                           pretrain_steps=cfg.pretrain_steps, out_dir=cfg.out_dir, head="learned", compare=False,
                           resume=True, log_every=10 ** 9, ckpt_every=50)
    try:
        return dataclasses.replace(base, **{**extra, **overrides, "seed": seed})
    except TypeError as e:
        raise ValueError(f"--vit {cfg.vit!r}: {e}; the fields are those of train_vit.Config") from None


def write_json(path: Path, obj) -> None:
    """JSON, atomically (a crash never leaves half a cache file)."""
    atomic_write_text(path, json.dumps(obj, indent=1))


def read_json(path: Path):
    """A JSON file this script or train_vit.py wrote; a damaged one is an error naming it."""
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is damaged ({e}); delete it and run again to recompute it") from None


def read_adapters(folder: Path) -> dict:
    """{"state": adapter and head tensors, "metadata"}: a run's adapters.pt (train_vit.py's finetune writes it)."""
    return torch.load(folder / "adapters.pt", map_location="cpu", weights_only=True)


@dataclass
class Plan:
    """Jobs (label, kind, weight, cache path, fn) run in order, skipping cached ones, with one
    progress line each: the ETA uses the seconds per unit of weight measured for each kind. What a
    job prints (training logs) is kept back, and shown only if the job fails."""
    jobs: list = dataclasses.field(default_factory=list)

    def add(self, label: str, kind: str, weight: float, path: Path, fn) -> None:
        self.jobs.append((label, kind, weight, path, fn))

    def run(self) -> None:
        todo = [j for j in self.jobs if not j[3].is_file()]
        print(f"{len(self.jobs)} jobs, {len(self.jobs) - len(todo)} cached, {len(todo)} to run", flush=True)
        seconds, weights, t0 = collections.Counter(), collections.Counter(), time.time()  # per kind
        for i, (label, kind, weight, path, fn) in enumerate(todo, 1):
            t, log = time.time(), io.StringIO()
            try:
                with contextlib.redirect_stdout(log):
                    result = fn()
            except BaseException:
                print(log.getvalue(), end="", flush=True)
                raise
            write_json(path, result)
            seconds[kind] += time.time() - t
            weights[kind] += weight
            overall = sum(seconds.values()) / sum(weights.values())
            left = sum(w * (seconds[k] / weights[k] if k in weights else overall) for _, k, w, _, _ in todo[i:])
            print(f"[{i}/{len(todo)}] {label} | {time.time() - t:.0f} s | elapsed "
                  f"{format_eta(time.time() - t0)} | eta {format_eta(left)}", flush=True)


# ---------------------------------------------------------------------------------------------
# The jobs


class Context:
    """Data, backbone, tasks and probe heads, built once from one run's train_vit.Config and shared
    by every job (the runs share them)."""

    def __init__(self, base: train_vit.Config, task_names: list, n_eval: int, data: dict | None = None,
                 n_val: int = 0):
        self.task_names, self.n_eval, self.n_val = task_names, n_eval, n_val
        self.data = data or vit_runs.load_data(base)
        self.backbone = vit_runs.backbone(base, self.data)
        self.source = train_vit.parse_classes(base.source_classes)
        self._tasks, self._probe = {}, {}

    def tasks(self, vcfg: train_vit.Config) -> dict:
        """The tasks subsampled as vcfg says: one subset for the full-data regimes, a new 16-per-class
        draw per seed for few-shot (as few-shot benchmarks do); LoRA and CoTo of a seed share it."""
        key = (vcfg.n_train, vcfg.n_test, vcfg.n_per_class, vcfg.seed if vcfg.n_per_class else 0)
        if key not in self._tasks:
            self._tasks[key] = train_vit.make_tasks(self.data, self.task_names, self.source, vcfg.patch_size,
                                                    vcfg.n_train, vcfg.n_test, vcfg.n_per_class, seed=key[-1])
        return self._tasks[key]

    def probe_head(self, vcfg: train_vit.Config, task: train_vit.Task):
        key = (task.name, vcfg.n_per_class, vcfg.seed if vcfg.n_per_class else 0)
        if key not in self._probe:
            model = train_vit.build_model(vcfg, self.data["x_train"], len(self.source))
            train_vit.load_pretrained(model, self.backbone)
            self._probe[key] = train_vit.linear_probe(model, task)
        return self._probe[key]

    def validation(self, vcfg: train_vit.Config, name: str) -> tuple:
        """n_val validation images of a task (uint8) and their labels: the training images that follow
        the n_train of its training subset in the same shuffled order, so the two never overlap."""
        task = train_vit.make_tasks(self.data, [name], self.source, vcfg.patch_size, vcfg.n_train + self.n_val,
                                    vcfg.n_test)[name]
        if not vcfg.n_train or len(task.y_train) < vcfg.n_train + self.n_val:  # else: training images, or too few
            raise ValueError(f"the matched control needs --n-val {self.n_val} validation images of {name} beside its "
                             f"n_train {vcfg.n_train or 'all'} training images, and {name} has {len(task.y_train)}: "
                             f"lower n_train (--vit '{{\"n_train\": ...}}') or --n-val")
        return task.x_train[vcfg.n_train:], task.y_train[vcfg.n_train:]

    def eval_set(self, task: train_vit.Task) -> tuple:
        """The analyses' held-out set: the first n_eval test images (games.py moves each batch to the device)."""
        return train_vit.to_float(task.x_test[:self.n_eval]), task.y_test[:self.n_eval]

    def model(self, vcfg: train_vit.Config, task: train_vit.Task, folder: Path):
        return vit_runs.load_adapters(vcfg, task, self.backbone, folder / "adapters.pt")


def train_job(ctx: Context, vcfg, task, folder: Path) -> dict:
    head = ctx.probe_head(vcfg, task)[0] if vcfg.head != "learned" else None
    _, metrics = train_vit.finetune(vcfg, task, ctx.backbone, head, run=vit_runs.Run(folder, vcfg, task))
    keep = ("task", "method", "seed", "acc", "loss", "train_time_s", "ms_per_step", "active_frac")
    last = metrics["history"][-1]["loss"]  # the training loss over the last log interval
    return {**{k: metrics[k] for k in keep}, "train_loss_last": last}


def rescale_job(ctx: Context, vcfg, task, folder: Path, lora_folder: Path, coto_folder: Path) -> dict:
    """Save LoRA's adapter rescaled to CoTo's per-layer delta-W norm (see RESCALED) in `folder`,
    like a trained run's, and return its test accuracy (the head stays LoRA's)."""
    lora, coto = (read_adapters(f) for f in (lora_folder, coto_folder))
    state = rescale_to_norm(ctx.model(vcfg, task, lora_folder), lora["state"], coto["state"])
    atomic_save({"state": state, "metadata": {**lora["metadata"], "method": RESCALED}}, folder / "adapters.pt")
    acc, loss = train_vit.evaluate(ctx.model(vcfg, task, folder), task.x_test, task.y_test)
    return {"task": task.name, "method": RESCALED, "seed": vcfg.seed, "acc": acc, "loss": loss}


def select_job(ctx: Context, cfg: Config, vcfg, task) -> dict:
    """The matched control's training length for one task (see MATCHED), on the validation images."""
    x, y = ctx.validation(vcfg, task.name)
    coto = ctx.model(vcfg, task, run_folder(cfg, "full", "coto", task.name, 0))
    target = train_vit.evaluate(coto, x, y)[0]
    grid = {}
    for steps in cfg.matched_steps.split(","):
        model, _ = train_vit.finetune(dataclasses.replace(vcfg, steps=int(steps), seed=0), task, ctx.backbone)
        grid[steps] = train_vit.evaluate(model, x, y)[0]
    steps = min(grid, key=lambda k: abs(grid[k] - target))
    return {"task": task.name, "coto_val_acc": target, "lora_val_acc": grid, "steps": int(steps)}


def matched_job(ctx: Context, vcfg, task, folder: Path, choice: Path) -> dict:
    """A LoRA run of the training length select_job chose for its task."""
    steps = read_json(choice)["steps"]
    return {**train_job(ctx, dataclasses.replace(vcfg, steps=steps), task, folder), "steps": steps}


def adapter_job(ctx: Context, vcfg, task, folder: Path, value: str) -> dict:
    return adapter_report(ctx.model(vcfg, task, folder), *ctx.eval_set(task), value)


def pair_job(ctx: Context, vcfg, task, folder_a: Path, folder_b: Path, value: str) -> dict:
    a, b = (read_adapters(f)["state"] for f in (folder_a, folder_b))
    return pair_report(ctx.model(vcfg, task, folder_a), a, b, *ctx.eval_set(task), value)


def combine_job(ctx: Context, vcfg, tasks: dict, folders: dict, value: str) -> dict:
    states = {n: read_adapters(folders[n])["state"] for n in tasks}
    first = next(iter(tasks))
    model = ctx.model(vcfg, tasks[first], folders[first])
    return combine_report(model, states, {n: ctx.eval_set(t) for n, t in tasks.items()}, value)


def module_job(ctx: Context, vcfg, task, folder: Path, value: str, num_samples: int) -> dict:
    """Shapley values with one player per adapted module: sampled (multilinear), 2^n is too many."""
    model = ctx.model(vcfg, task, folder)
    groups, (x, y) = block_groups(model, group_of=lambda name: name), ctx.eval_set(task)

    def value_fn(S):
        with games.coalition(groups, S):
            return games.score(model, x, y, value)
    phi, se = games.shapley_multilinear(value_fn, len(groups), num_samples,
                                        generator=torch.Generator().manual_seed(vcfg.seed))
    return {"names": list(groups), "shapley": phi.tolist(), "stderr": se.tolist()}


def run_folder(cfg: Config, study: str, setting: str, task: str, seed: int) -> Path:
    """out_dir/runs/<study>/<task>/<setting>/seed<k>: train_vit.py's layout, so games.py runs on it too."""
    return Path(cfg.out_dir) / "runs" / study / task / setting.replace(" ", "_") / f"seed{seed}"


def plan(cfg: Config, ctx: Context) -> tuple:
    """(Plan, index): index lists what each cache file holds, for collect()."""
    p, index = Plan(), []
    for study, settings, task_names, analyse in studies(cfg):
        for setting, overrides in settings.items():
            runs = {}  # (task, seed): (train_vit.Config, Task, folder), for the analyses
            for seed in range(cfg.seeds):
                vcfg = vit_config(cfg, overrides, seed)
                tasks = ctx.tasks(vcfg)
                cost = vcfg.steps * vcfg.batch_size * {"lora": 1.0, "dora": 1.6, "hira": 1.3}[vcfg.variant]
                for name in task_names:
                    here = run_folder(cfg, study, setting, name, seed)
                    runs[name, seed] = (vcfg, tasks[name], here)
                    if setting == RESCALED:
                        sources = (run_folder(cfg, "full", m, name, seed) for m in ("lora", "coto"))
                        kind, weight, job = "rescale", 1.0, partial(rescale_job, ctx, vcfg, tasks[name], here, *sources)
                    elif setting == MATCHED:
                        choice = here.parents[1] / "select.json"
                        if seed == 0:  # the choice comes first; too few validation images: refused before any work
                            ctx.validation(vcfg, name)
                            grid = sum(map(int, cfg.matched_steps.split(","))) * vcfg.batch_size
                            p.add(f"select {study}/{name}", "train", grid, choice,
                                  partial(select_job, ctx, cfg, vcfg, tasks[name]))
                        kind, weight, job = "train", cost, partial(matched_job, ctx, vcfg, tasks[name], here, choice)
                    else:
                        kind, weight, job = "train", cost, partial(train_job, ctx, vcfg, tasks[name], here)
                    if not (here / "adapters.pt").is_file():  # a finished run whose adapters were deleted: again
                        (here / "summary.json").unlink(missing_ok=True)
                    p.add(f"{kind} {study}/{setting}/{name}/seed{seed}", kind, weight, here / "summary.json", job)
                    index.append(("train", study, setting, name, seed, here / "summary.json"))
            if analyse:
                analysis_jobs(p, index, ctx, (study, setting), runs, Path(cfg.out_dir) / "analysis")
    return p, index


def analysis_jobs(p: Plan, index: list, ctx: Context, group: tuple, runs: dict, cache: Path, value: str = "acc",
                  num_samples: int = 0) -> None:
    """Add games.py's reports on the runs {(task, seed): (train_vit.Config, Task, folder)} of one setting
    (group: (study, setting)) or method (group: (method,)) to p, cached under cache/<group>/, and to index
    as (kind, *group, task, seed, cache file): per run its adapter report (with num_samples also the
    per-module Shapley values), per task and disjoint seed pair (0, 1), (2, 3), ... the interpolation
    report, per seed with runs of several tasks the combination report."""
    out, name, n = cache.joinpath(*group), "/".join(group), ctx.n_eval

    def add(kind, task, seed, weight, label, file, job, *args):  # one cached report: job(ctx, *args)
        p.add(label, kind, weight, out / file, partial(job, ctx, *args))
        index.append((kind, *group, task, seed, out / file))
    for (t, s), (vcfg, task, run) in runs.items():
        add("adapter", t, s, n, f"shapley and pruning {name}/{t}/seed{s}", Path(t, f"seed{s}.json"), adapter_job,
            vcfg, task, run, value)
        if num_samples:
            add("module", t, s, n, f"per-module shapley {name}/{t}/seed{s}", Path(t, f"modules-seed{s}.json"),
                module_job, vcfg, task, run, value, num_samples)
    tasks = list(dict.fromkeys(t for t, _ in runs))
    for t in tasks:
        seeds = [s for u, s in runs if u == t]
        for a, b in zip(seeds[::2], seeds[1::2]):  # disjoint pairs: independent, like the seeds
            vcfg, task, run = runs[t, a]
            add("pair", t, a, n, f"interpolate {name}/{t}/seeds {a},{b}", Path(t, f"pair{a}-{b}.json"), pair_job,
                vcfg, task, run, runs[t, b][2], value)
    for s in sorted({s for _, s in runs}):
        ts = [t for t in tasks if (t, s) in runs]
        if len(ts) > 1:
            add("combination", "all", s, n * len(ts), f"combine {name}/seed{s}", Path(f"combine-seed{s}.json"),
                combine_job, runs[ts[0], s][0], {t: runs[t, s][1] for t in ts}, {t: runs[t, s][2] for t in ts}, value)


# ---------------------------------------------------------------------------------------------
# Statistics and the table

def t_within(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with an integer number of degrees of freedom, exactly
    (Abramowitz & Stegun 26.7.3 and 26.7.4: finite sums in theta = atan(t / sqrt(df)))."""
    theta = math.atan(t / math.sqrt(df))
    if df == 1:
        return 2 * theta / math.pi
    # even df: sin(theta) (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... up to c^(df-2));
    # odd df: (2/pi)(theta + sin(theta)(c + 2/3 c^3 + 2*4/(3*5) c^5 + ... up to c^(df-2)))
    c2, odd = math.cos(theta) ** 2, df % 2
    term = total = math.cos(theta) if odd else 1.0
    for k in range(1, (df - odd) // 2):
        term *= c2 * (2 * k - 1 + odd) / (2 * k + odd)
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * total) if odd else math.sin(theta) * total


def t_quantile(df: int, coverage: float = 0.95) -> float:
    """The t with P(|T| < t) = coverage (0.95: the 97.5 % quantile, 12.706 at df 1, 1.960 as df
    grows), by bisection on t_within."""
    lo, hi = 0.0, 1e4
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_within(mid, df) < coverage else (lo, mid)
    return (lo + hi) / 2


def mean_sd(xs: list) -> tuple:
    """(mean, sample standard deviation); the sd is nan with one value."""
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")


def interval(xs: list) -> tuple:
    """(mean, half-width of the 95 % t interval); the half-width is nan with one value."""
    m, sd = mean_sd(xs)
    return m, t_quantile(len(xs) - 1) * sd / math.sqrt(len(xs)) if len(xs) > 1 else sd


def p_value(xs: list) -> float:
    """Two-sided p of the one-sample t test of mean 0 on xs (the paired differences B - A): the
    probability of a |t| at least this large if the true mean difference were 0; nan with fewer
    than 2 values. p < 0.05 exactly when the 95 % t interval of interval(xs) excludes 0."""
    if len(xs) < 2:
        return float("nan")
    m, sd = mean_sd(xs)
    if sd == 0:  # every seed gives the same difference
        return 1.0 if m == 0 else 0.0
    return 1.0 - t_within(abs(m) / (sd / math.sqrt(len(xs))), len(xs) - 1)


def p_tost(xs: list, margin: float) -> float:
    """The p of two one-sided t tests (TOST) that the mean of xs lies within (-margin, margin): the
    larger of the two one-sided p's. p < 0.05 exactly when the 90 % t interval lies inside the
    margin: the difference is then shown to be that small ("equivalent"). nan with fewer than 2 values."""
    if len(xs) < 2:
        return float("nan")
    m, sd = mean_sd(xs)
    if sd == 0:
        return 0.0 if abs(m) < margin else 1.0
    cdf = lambda t: 0.5 + math.copysign(t_within(abs(t), len(xs) - 1), t) / 2  # noqa: E731  P(T <= t)
    se = sd / math.sqrt(len(xs))
    return max(1 - cdf((m + margin) / se), cdf((m - margin) / se))


def holm(ps: list) -> list:
    """Holm's step-down adjusted p-values of one family of tests: sorted ascending, the k-th
    smallest (k = 0, 1, ...) of m becomes max over j <= k of min(1, (m - j) p_(j)). A test is
    significant at 5 % family-wise error when its adjusted p < 0.05. nan entries (untested rows)
    are not in the family and stay nan."""
    tested = sorted((p, i) for i, p in enumerate(ps) if not math.isnan(p))
    out, running = [float("nan")] * len(ps), 0.0
    for k, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - k) * p))
        out[i] = running
    return out


def holm_rows(rows: list, margin: float = 0.03) -> list:
    """The rows of one section (one family of tests) with their Holm-adjusted p; a verdict that
    is significant on its own but not after the correction says so. Each row in % also gets its
    TOST p against ±margin ("p_tost", Holm-adjusted over the section in "p_tost_holm"); a row whose
    difference is not significant and within the margin after Holm says "equivalent"."""
    tost = [p_tost(r["diffs"], margin) if r["fmt"] == "pct" else float("nan") for r in rows]
    out = []
    for r, adjusted, pt, pt_holm in zip(rows, holm([r["p"] for r in rows]), tost, holm(tost)):
        qualified = r["verdict"] in ("holds", "reversed", "differs") and not adjusted < 0.05
        verdict = r["verdict"] + (", not after Holm" if qualified else "")
        if pt_holm < 0.05 and not r["p"] < 0.05:
            verdict = f"equivalent (within ±{100 * margin:g})"
        out.append({**r, "p_holm": adjusted, "p_tost": pt, "p_tost_holm": pt_holm, "verdict": verdict})
    return out


def verdict(diff: tuple, expect: int) -> str:
    """Plain words for a paired difference (mean, half-width) against the paper's direction."""
    d, h = diff
    if math.isnan(h):
        return "n/a (n = 1)"
    significant = abs(d) > h
    if d == 0:
        return "no difference"
    if expect == 0:
        return "differs" if significant else "no clear difference"
    same = (d > 0) == (expect > 0)
    if significant:
        return "holds" if same else "reversed"
    return "not significant (same direction)" if same else "not significant (reversed)"


def collect(index: list) -> dict:
    """{kind: {study: {setting: {task: {seed: record}}}}} (--analyse: {kind: {method: {task: {seed: record}}}})
    from the cache files of index: (kind, *group, task, seed, path)."""
    out = {}
    for kind, *keys, seed, path in index:
        if path.is_file():
            seeds = reduce(lambda d, key: d.setdefault(key, {}), (kind, *keys), out)
            seeds[str(seed)] = read_json(path)
    return out


def reports(res: dict, *group, kinds=("adapter", "pair", "combination")) -> dict:
    """{"adapters": [...], "pairs": [...], "combinations": [...]}: collect()'s reports of one setting
    (group: study, setting) or method over its tasks and seeds, as lab.reports.plot_reports takes them."""
    found = {kind: reduce(lambda d, key: d.get(key, {}), (kind, *group), res) for kind in kinds}
    return {kind + "s": [r for seeds in runs.values() for r in seeds.values()] for kind, runs in found.items()}


def per_seed(res: dict, kind: str, study: str, setting: str, get, seeds: list, tasks=None,
             over=statistics.fmean) -> dict:
    """{seed: value} for each of the study's seeds: over (the mean) of get(record) over tasks (all
    tasks, or `tasks`); nan for a seed that misses a task's record (a failed or missing run)."""
    runs = res.get(kind, {}).get(study, {}).get(setting, {})
    tasks = [t for t in (tasks or runs) if t in runs]
    found = {s: [get(runs[t][str(s)]) for t in tasks if str(s) in runs[t]] for s in seeds}
    return {s: over(vs) if vs and len(vs) == len(tasks) else float("nan") for s, vs in found.items()}


def row(claim: str, a: dict, b: dict, expect: int, paper: str = "", fmt: str = "pct", missing: str = "missing") -> dict:
    """A table row: A (LoRA or a baseline) against B (CoTo), {seed: value} each, paired by seed id
    over the seeds with a value on both sides ("seeds"; "of": the seeds either side was given).
    expect: the paper's direction of B - A (+1 higher, -1 lower, 0 none claimed)."""
    of = sorted(a.keys() | b.keys())
    seeds = [s for s in of if s in a and s in b and not (math.isnan(a[s]) or math.isnan(b[s]))]
    a, b, diffs = [a[s] for s in seeds], [b[s] for s in seeds], [b[s] - a[s] for s in seeds]
    a, b, diff = (interval(xs) if seeds else None for xs in (a, b, diffs))  # no seed: no interval
    return {"claim": claim, "a": a, "b": b, "diff": diff, "diffs": diffs, "n": len(seeds), "seeds": seeds, "of": of,
            "p": p_value(diffs), "paper": paper, "fmt": fmt, "verdict": verdict(diff, expect) if seeds else missing}


REGIMES = {"full": "full data, learned head", "probe_init": "full data, head from the linear probe, trained",
           "probe": "full data, frozen linear-probe head",
           "fewshot": "few-shot (16 per class), learned head",
           "taskinit": "full data, learned head, each task's adapters initialised apart"}


def claim_rows(res: dict, a: tuple, b: tuple, seeds: list) -> list:
    """Claims 1-5 for two settings a, b = (study, setting) on the same tasks and seeds: A (LoRA or a
    baseline) against B (CoTo). For interpolation, combining and pruning a second row beneath
    gives the change the operation causes (after - before, per run), so a gap that is only the
    accuracy gap before the operation does not read as robustness."""
    def pair(kind, get, tasks=None):  # interpolation reports are keyed by the first seed of each pair
        ids = seeds[:-1:2] if kind == "pair" else seeds
        return per_seed(res, kind, *a, get, ids, tasks), per_seed(res, kind, *b, get, ids, tasks)

    def with_change(kind, claim, get, before, since, paper=""):  # the paper's direction: B - A > 0 for both
        return [row(claim, *pair(kind, get), +1, paper),
                row(f"   change from {since} (after − before)", *pair(kind, lambda r: get(r) - before(r)), +1)]

    def pruned(claim, get, paper=""):
        return with_change("adapter", claim, get, lambda r: r["full"], "the unpruned adapter", paper)

    acc = lambda r: r["acc"]  # noqa: E731
    tasks = list(res.get("train", {}).get(a[0], {}).get(a[1], {}))
    out = [row(f"1. accuracy, {t}", *pair("train", acc, [t]), +1) for t in tasks]
    out.append(row("1. accuracy, mean over tasks", *pair("train", acc), +1,
                   "82.95 → 83.48 (CLIP ViT-B/16 few-shot, 11 sets)"))
    out += [row("1. the head alone: every adapter bypassed (held-out images)",
                *pair("adapter", lambda r: r["none"]), 0),
            row("   what the adapters add to it (all on − head alone)",
                *pair("adapter", lambda r: r["full"] - r["none"]), 0)]
    for space, paper in (("factors", "39 → 79; DTD 1:1 seed merge 65.60 → 72.03"), ("delta", ""),
                         ("factors_head_a", "")):
        name = space.replace("_head_a", ", head of one seed held")
        out += with_change("pair", f"2. seed interpolation at λ = 0.5, {name}", lambda r: r[space]["midpoint"],
                           lambda r: (r[space]["values"][0] + r[space]["values"][-1]) / 2, "the two ends' mean", paper)
        out.append(row(f"2. interpolation barrier, {name}", *pair("pair", lambda r: r[space]["barrier"]),
                       -1, "lower with CoTo"))
    mean_over_tasks = lambda r, m: statistics.fmean(r[m].values())  # noqa: E731
    out.append(row("3. multi-task merge, single", *pair("combination", lambda r: mean_over_tasks(r, "single")), +1,
                   "(each task's own adapter)"))
    for m, paper in (("fusion", "+11.4 (LLaMA-2, 9 tasks); +4 to +6 (GLUE)"), ("delta_avg", ""), ("ties", ""),
                     ("ensemble", "")):
        out += with_change("combination", f"3. multi-task merge, {m}", lambda r: mean_over_tasks(r, m),
                           lambda r: mean_over_tasks(r, "single"), "each task's own adapter", paper)
    for name, paper in (("every_other", "63.30 → 71.11 (DTD)"), ("low", ""), ("middle", ""), ("high", "")):
        out += pruned(f"4. structured pruning, keep {name.replace('_', ' ')}", lambda r: r["structured"][name], paper)
    for part in "qkv":
        out += pruned(f"4. keep only the {part} slice of qkv", lambda r: r["qkv"][part])
    for key, what in (("unstructured", "each ΔW"), ("unstructured_factors", "each A and B")):
        for sp in ("0.3", "0.5", "0.7"):
            out += pruned(f"4. unstructured pruning, {float(sp):.0%} of {what}", lambda r: r[key][sp],
                          "about +10 points at 50 %" if sp == "0.5" else "")
    top = lambda s: sum(s[i] for i in games.block_subsets(len(s))["high"])  # noqa: E731
    none = "n/a: the adapters add < 1 point, no credit to share"
    out.append(row("5. Shapley share of the top third of blocks", credit_stat(res, *a, top, seeds),
                   credit_stat(res, *b, top, seeds), -1, "LoRA: 69 % in the top 4 of 12 blocks", missing=none))
    out.append(row("5. largest single block's Shapley share", credit_stat(res, *a, max, seeds),
                   credit_stat(res, *b, max, seeds), -1, "CoTo: spread out (lower)", missing=none))
    return out


def block_shares(phis: list, min_gain: float = 0.01) -> list | None:
    """Each block's share of the Shapley credit of the runs `phis`, summed over them (a ratio of
    sums), or None where all credit, v(all) - v(none), is below min_gain (1 point of accuracy):
    adapters that add nothing leave no credit to share, and the ratio would be noise over ~0."""
    total = sum(sum(phi) for phi in phis)
    return [sum(col) / total for col in zip(*phis)] if total >= min_gain else None


def credit_stat(res: dict, study: str, setting: str, stat, seeds: list) -> dict:
    """{seed: stat of the block_shares of the seed's runs (one per task)}; nan where the seed has
    no credit to share."""
    def of_seed(phis):
        shares = block_shares(phis)
        return stat(shares) if shares is not None else float("nan")
    return per_seed(res, "adapter", study, setting, lambda r: r["shapley"], seeds, over=of_seed)


def shapley_profiles(res: dict) -> dict:
    """The block_shares of all runs (tasks and seeds) per regime and method, where both have credit to share."""
    out = {}
    for study, settings in res.get("adapter", {}).items():
        prof = {m: block_shares([r["shapley"] for runs in settings.get(m, {}).values() for r in runs.values()])
                for m in ("lora", "coto")}
        if None not in prof.values():
            out[study] = prof
    return out


def sections(res: dict, cfg: Config) -> list:
    """[(title, A header, B header, rows)]: the whole table (paper numbers: arXiv 2506.05713)."""
    trained = res.get("train", {})  # {study: ...} of the studies run: with --studies a subset, and only theirs show
    seeds = list(range(cfg.seeds))
    out = [(f"Regime: {REGIMES[s]}", "LoRA", "CoTo", claim_rows(res, (s, "lora"), (s, "coto"), seeds))
           for s in REGIMES if s in trained]
    if "dynamics" in trained:  # one task: no merging rows
        rows = claim_rows(res, ("dynamics", "lora"), ("dynamics", "coto"), seeds)
        rows = [r for r in rows if r["verdict"] != "missing"]
        out.append((f"Regime: {cfg.long_task} alone, {cfg.long_steps} steps ({REGIMES['full']})", "LoRA", "CoTo", rows))
    for study in ("baselines", "controls", "matched"):
        for setting in trained.get(study, {}):  # the paper's numbers are LoRA's: not shown here
            rows = [{**r, "paper": ""} for r in claim_rows(res, (study, setting), ("full", "coto"), seeds)]
            name = setting
            if setting == MATCHED:  # the training length chosen per task
                chosen = {t: runs["0"]["steps"] for t, runs in trained[study][setting].items() if "0" in runs}
                name += " (" + ", ".join(f"{t}: {steps} steps" for t, steps in chosen.items()) + ")"
            out.append((f"Control: {name}, against CoTo ({REGIMES['full']})", setting, "CoTo", rows))
    acc, ms, loss = (lambda r: r["acc"]), (lambda r: r["ms_per_step"]), (lambda r: r["train_loss_last"])  # noqa: E731
    side = cfg.tasks.split(",")[:cfg.side_tasks]

    def ab(study, a, b, get=acc, tasks=side):  # settings a and b of one study, one value per seed
        return tuple(per_seed(res, "train", study, setting, get, seeds, tasks) for setting in (a, b))
    cost = []
    for variant, study, paper in (("lora", "full", "0.93"), ("dora", "variants", "0.76"), ("hira", "variants", "0.76")):
        if study not in trained:
            continue
        lora, coto = ("lora", "coto") if variant == "lora" else (f"{variant}-lora", f"{variant}-coto")
        lora_ms, coto_ms = ab(study, lora, coto, ms)
        ratio = {s: coto_ms[s] / lora_ms[s] for s in seeds}  # nan where either run is missing
        cost.append(row(f"6. wall-clock per step, CoTo / LoRA, {variant}", dict.fromkeys(seeds, 1.0), ratio, -1,
                        f"1.00 → {paper}", fmt="ratio"))
        if variant != "lora":
            cost.append(row(f"   accuracy, {variant}", *ab(study, lora, coto), +1))
    out.append(("Training cost (time per step at equal steps) and variants", "without CoTo", "with CoTo", cost))
    # the paper's direction and words, by the parameter an ablation changes ("coto p0=0.1": p0)
    claims = {"p0": (0, "the snippet uses p0 = 0.1, the figure 0"), "shape": (0, "linear in the paper's figure"),
              "stage1": (+1, "stage1 0.75 best")}
    default = per_seed(res, "train", "full", "coto", acc, seeds, side)  # CoTo with p0 0, stage1 0.75
    ablation = []
    for setting in trained.get("ablations", {}):
        vals = per_seed(res, "train", "ablations", setting, acc, seeds, side)
        ablation.append(row(f"7. {setting}", vals, default, *claims[setting.split()[1].split("=")[0]]))
    out.append(("Ablations (accuracy, full data)", "the setting", "CoTo (p0 0, stage1 0.75)", ablation))
    lrs = sorted({float(v) for v in cfg.lrs.split(",")} | {cfg.lr}) if "lr" in trained else []
    sweep = []
    for lr in lrs:  # the sweep's runs, and the "full" runs at cfg.lr
        study, lora, coto = ("full", "lora", "coto") if lr == cfg.lr else ("lr", f"lora@{lr:g}", f"coto@{lr:g}")
        sweep.append(row(f"accuracy at lr {lr:g}", *ab(study, lora, coto), +1,
                         "CoTo's advantage grows with the LR, LoRA degrades" if lr == lrs[-1] else ""))
    out.append(("Learning-rate sweep (accuracy, full data)", "LoRA", "CoTo", sweep))
    long, lora = [], {get: per_seed(res, "train", "dynamics", "lora", get, seeds) for get in (acc, loss)}
    for study, setting in [(st, s) for st in ("dynamics", "ramps") for s in trained.get(st, {}) if s != "lora"]:
        mine = {get: per_seed(res, "train", study, setting, get, seeds) for get in (acc, loss)}
        long += [row(f"accuracy, {setting}", lora[acc], mine[acc], +1),
                 row(f"   training loss of the last {max(1, cfg.long_steps // 30)} steps, {setting}", lora[loss],
                     mine[loss], 0, fmt="ratio")]
    out.append((f"Training length: {cfg.long_task}, {cfg.long_steps} steps (full data, learned head)",
                "LoRA", "CoTo", long))
    return [(title, a, b, holm_rows(rs, cfg.tost_margin)) for title, a, b, rs in out if rs]


def seed_count(r: dict) -> str:
    """The n column: the number of seeds, and which ones where a row could not use all of its seeds."""
    if r["seeds"] in ([], r["of"]):
        return str(r["n"])
    spans, seeds = [], r["seeds"]
    for i, s in enumerate(seeds):  # consecutive seeds as one span: 0-3
        if i and s == seeds[i - 1] + 1:
            spans[-1] = f"{spans[-1].split('-')[0]}-{s}"
        else:
            spans.append(str(s))
    return f"{r['n']} (seeds {', '.join(spans)})"


def fmt(x: tuple | None, kind: str) -> str:
    if x is None or math.isnan(x[0]):
        return "–"
    m, h = x if kind == "ratio" else (100 * x[0], 100 * x[1])
    digits = 2 if kind == "ratio" else 1
    return f"{m:.{digits}f}" + ("" if math.isnan(h) else f" ± {h:.{digits}f}")


def command(cfg: Config) -> str:
    """The command that makes cfg's table: the flags that differ from the defaults (from --quick's with
    --quick), leaving out where the output goes, where the data is and the device."""
    default = quick_config(Config(quick=True)) if cfg.quick else Config()
    flags = [f"--{k.replace('_', '-')} {shlex.quote(str(v))}" for k, v in dataclasses.asdict(cfg).items()
             if v != getattr(default, k) and k not in ("out_dir", "data_dir", "device")]
    return " ".join(["python -m lab.reproduce", *(["--quick"] if cfg.quick else []), *flags])


# The overview's columns: (header, the row's claim); a change row is the one right under its claim
OVERVIEW = (("accuracy", "1. accuracy, mean over tasks"),
            ("head alone", "1. the head alone: every adapter bypassed (held-out images)"),
            ("barrier, one head held", "2. interpolation barrier, factors, head of one seed held"),
            ("drop from delta-W averaging", "3. multi-task merge, delta_avg"),
            ("drop from TIES", "3. multi-task merge, ties"),
            ("drop from keeping every other block", "4. structured pruning, keep every other"))


def overview(table: list, margin: float) -> list:
    """Markdown lines: B − A of the rows that carry the robustness claims, one line per regime or control
    section (cells copied from the sections below by their claims)."""
    cols = [h for h, _ in OVERVIEW]
    lines = ["| section (A → B) | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for title, a, b, rs in table:
        if not (title.startswith("Regime: ") or title.startswith("Control: ")):
            continue
        claims, cells = [r["claim"] for r in rs], []
        for header, claim in OVERVIEW:
            i = claims.index(claim) if claim in claims else None
            r = None if i is None else rs[i + 1] if header.startswith("drop") else rs[i]  # the change row
            mark = "" if r is None or math.isnan(r["p"]) else " *" if r["p_holm"] < 0.05 else " ≈" if \
                r["p_tost_holm"] < 0.05 else ""
            cells.append("–" if r is None else fmt(r["diff"], r["fmt"]) + mark)
        kind, name = title.split(": ", 1)
        lines.append(f"| {name}{f' ({a} → {b})' if kind == 'Regime' else ''} | " + " | ".join(cells) + " |")
    return ["#### Overview: B − A on the rows the robustness claims rest on", "",
            f"Each cell is the B − A column of its section's row below (a drop: its change row, after − before). "
            f"*: the difference is significant after Holm; ≈: equivalent within ±{100 * margin:g} points after "
            f"Holm (TOST).", "", *lines, ""]


def markdown(table: list, profile: dict, cfg: Config) -> str:
    tested = lambda rs: sum(not math.isnan(r["p"]) for r in rs)  # noqa: E731
    lines = [f"Generated by `{command(cfg)}`: mean ± 95 % t interval over "
             f"{cfg.seeds} seeds (over the disjoint seed pairs (0, 1), (2, 3), ... for interpolation), B − A "
             f"paired by seed, every comparison at equal optimizer steps"
             f"{' (the matched control aside)' if 'matched' in cfg.studies.split(',') else ''}; accuracies and "
             f"shares in %. Tasks: "
             f"{cfg.tasks} (side studies: the first {cfg.side_tasks}); {cfg.steps} steps at lr {cfg.lr} "
             f"(few-shot: {cfg.fewshot_steps} at {cfg.fewshot_lr}); analyses on {cfg.n_eval} held-out test images "
             f"per task. p: two-sided paired t test of B − A = 0; in brackets Holm's adjusted p, each section one "
             f"family of tests ({sum(tested(rs) for *_, rs in table)} rows tested in all); a verdict that holds "
             f"only before the correction says so. TOST: the p of two one-sided tests that |B − A| < "
             f"{100 * cfg.tost_margin:g} points, Holm-adjusted the same way; \"equivalent\" only where it is < 0.05 "
             f"after Holm. The head alone: every adapter bypassed, the baseline v(none) of the Shapley shares.", ""]
    if cfg.quick:
        lines += [f"**{QUICK}.**", ""]
    lines += overview(table, cfg.tost_margin)
    for title, a, b, rs in table:
        lines += [f"#### {title}", "", f"Rows tested: {tested(rs)} (Holm's correction over them).", "",
                  f"| claim | A: {a} | B: {b} | B − A | n | p (Holm) | TOST p (Holm), ±{100 * cfg.tost_margin:g} | "
                  f"paper (A → B) | verdict here |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            p, pt = ("–" if math.isnan(r[k]) else f"{r[k]:.3f} ({r[k + '_holm']:.3f})" for k in ("p", "p_tost"))
            lines.append(f"| {r['claim']} | {fmt(r['a'], r['fmt'])} | {fmt(r['b'], r['fmt'])} | "
                         f"{fmt(r['diff'], r['fmt'])} | {seed_count(r)} | {p} | {pt} | {r['paper']} | {r['verdict']} |")
        lines.append("")
    if profile:
        lines += ["A block's Shapley share is its Shapley value over v(all) − v(none), v(none) being the head alone "
                  "(every adapter bypassed), summed over tasks and seeds: "
                  "the shares add up to 100 %; a negative share is a block whose adapters lower the accuracy on "
                  "average over coalitions (the other blocks then hold more than 100 %).", ""]
    for study, prof in profile.items():
        n = len(prof["lora"])
        regime = REGIMES.get(study, f"{cfg.long_task} alone, {cfg.long_steps} steps")
        lines += [f"#### Shapley share per block, {regime} (block 0 is the lowest)", "",
                  "| method | " + " | ".join(f"block {i}" for i in range(n)) + " |", "|---" * (n + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(f"{100 * v:.1f}" for v in shares) + " |" for m, shares in prof.items()]
        lines.append("")
    return "\n".join(lines)


def plot_dynamics(cfg: Config, path: Path) -> dict:
    """The dynamics study's figure: test accuracy and training loss over the steps (mean over the
    seeds, from each run's metrics.jsonl) of LoRA and each CoTo ramp, above the ramps' p(t).
    Returns what it draws: {setting: {"runs": seeds, "eval": (steps, acc), "train": (steps, loss)}}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    long = studies(dataclasses.replace(cfg, studies="dynamics,ramps"))
    settings = {setting: (study, o) for study, found, *_ in long for setting, o in found.items()}
    curves = {}
    for setting, (study, _) in settings.items():
        files = [run_folder(cfg, study, setting, cfg.long_task, s) / "metrics.jsonl" for s in range(cfg.seeds)]
        records = [[json.loads(line) for line in f.read_text().splitlines()]
                   for f in files if f.is_file() and (f.parent / "result.json").is_file()]  # finished runs only
        if not records:
            continue
        curves[setting] = {"runs": len(records)}
        for key, name in (("eval_acc", "eval"), ("loss", "train")):
            per_run = [{r["step"]: r[key] for r in recs if key in r} for recs in records]
            steps = sorted(set.intersection(*(set(d) for d in per_run)))
            curves[setting][name] = (steps, [statistics.fmean(d[t] for d in per_run) for t in steps])
    if not curves:
        return curves
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True, gridspec_kw={"height_ratios": [3, 3, 1.2]})
    for i, (setting, c) in enumerate(curves.items()):
        axes[0].plot(*c["eval"], ".-", color=f"C{i}", label=setting)
        axes[1].plot(*c["train"], "-", color=f"C{i}", label=setting)
        o = settings[setting][1]
        if o["coto"]:
            steps = range(cfg.long_steps + 1)
            axes[2].plot(steps, [coto_prob(t, cfg.long_steps, shape=o.get("shape", "linear")) for t in steps],
                         color=f"C{i}")
    n = sorted({c["runs"] for c in curves.values()})
    axes[0].set_title(f"{cfg.long_task}, full data, {cfg.long_steps} steps at lr {cfg.lr}: mean of "
                      f"{'-'.join(map(str, n))} seeds", loc="left")
    axes[0].legend(fontsize=8)
    for ax, label in zip(axes, ("test accuracy", "training loss", "CoTo p(t)")):
        ax.set_ylabel(label)
    axes[2].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return curves


QUICK = ("--quick is a smoke test of the whole pipeline: its runs are too short and its held-out sets too "
         "small for its verdicts to mean anything")


def check(cfg: Config) -> None:
    """Every run's train_vit.Config made and its model built now (lora.py, coto.py and the ViT check the flags
    they take), so that its flags are checked before any work."""
    for _, settings, task_names, _ in studies(cfg):
        for overrides in settings.values():
            vcfg = dataclasses.replace(vit_config(cfg, overrides, 0), tasks=",".join(task_names))
            image = torch.zeros((1, 3, 32, 32) if vcfg.dataset == "cifar10" else (1, 1, 28, 28), dtype=torch.uint8)
            train_vit.adapt(vcfg, train_vit.Task("check", image, None, None, None, 10))


def main(cfg: Config) -> dict:
    pick_device(cfg.device)  # a device this machine lacks: one line now, not after pretraining
    if cfg.analyse:
        return analyse(cfg)
    if cfg.quick:
        cfg = quick_config(cfg)
        print(QUICK, flush=True)
    if cfg.seeds < 2:
        raise ValueError(f"seeds={cfg.seeds}: intervals and seed interpolation need at least 2 (3 or more advised)")
    check(cfg)
    t0 = time.time()
    root = Path(cfg.out_dir)
    # the caches are keyed by path only: refuse to mix runs of two configurations in one folder
    saved = read_json(root / "config.json") if (root / "config.json").is_file() else None
    data = vit_runs.load_data(vit_config(cfg, {}, 0))  # its hash joins the configuration: other data, other runs
    ignored = ("out_dir", "data_dir", "seeds", "studies", "device", "tost_margin", "analyse", "methods", "value",
               "players", "num_samples")  # data_dir: where the data is, not what it is (data_sha1 is)
    mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignored}
    base = dataclasses.asdict(vit_config(cfg, {}, 0))  # train_vit.py's defaults matter as much
    mine["train_vit"] = {k: v for k, v in base.items() if k not in ("out_dir", "data_dir", "device")}
    mine["data_sha1"] = data["sha1"]
    if saved is not None and saved != mine:
        flat = lambda d: {**d, **{f"train_vit.{k}": v for k, v in d.get("train_vit", {}).items()}}  # noqa: E731
        changed = sorted(k for k, v in flat(mine).items() if flat(saved).get(k) != v and k != "train_vit")
        raise ValueError(f"{root} holds results of another configuration (differs in {changed}): "
                         f"pass another --out-dir, or delete {root} to start over")
    write_json(root / "config.json", mine)
    ctx = Context(vit_config(cfg, {}, 0), list(dict.fromkeys([*cfg.tasks.split(","), cfg.long_task])), cfg.n_eval, data,
                  cfg.n_val)
    p, index = plan(cfg, ctx)
    p.run()
    print(f"tabulating {sum(path.is_file() for *_, path in index)} results and drawing the plots", flush=True)
    res = collect(index)
    table, profile = sections(res, cfg), shapley_profiles(res)
    text = markdown(table, profile, cfg)
    write_json(root / "results.json", {"config": dataclasses.asdict(cfg), "runs": res, "table": table,
                                       "shapley_profile": profile, "wall_s": time.time() - t0})
    (root / "table.md").write_text(text + "\n")
    plot_reports({m: reports(res, "full", m) for m in ("lora", "coto")}, root,
                 about=f"{REGIMES['full']}; tasks {cfg.tasks}; {cfg.seeds} seeds; {cfg.steps} steps")
    if "dynamics" in res.get("train", {}):
        plot_dynamics(cfg, root / "dynamics.png")
    print(text)
    if cfg.quick:
        print(QUICK)
    print(f"wrote {root / 'results.json'}, {root / 'table.md'} and plots in {root} ({format_eta(time.time() - t0)})")
    return {"table": table, "profile": profile, "markdown": text}


# ---------------------------------------------------------------------------------------------
# --analyse: games.py's reports on the runs another lab.vit_runs command saved

def saved_runs(root: Path, methods: list) -> dict:
    """{(method, task, seed): (train_vit.Config, folder)} of every finished run under root (adapters.pt
    beside a result.json), read from its result.json, never from the folder names."""
    if not root.is_dir():
        raise FileNotFoundError(f"--analyse {root}: no such folder (give a lab.vit_runs --out-dir)")
    runs = {}
    for path in sorted(root.rglob("result.json")):
        if not (path.parent / "adapters.pt").is_file():
            continue
        res = read_json(path)
        try:
            vcfg = vit_runs.Config(**res["config"])  # train_vit.py's fields (and --ckpt-every in older files)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path} has no usable train_vit.py configuration ({e}): was it written by "
                             f"another version of train_vit.py? Train it again, or move it out of {root}") from None
        if res["method"] not in methods:
            continue
        key = (res["method"], res["task"], vcfg.seed)
        if key in runs:
            raise ValueError(f"two runs of {'/'.join(map(str, key))}: {runs[key][1]} and {path.parent}; point "
                             f"--analyse at a folder that holds one set of runs (one lab.vit_runs --out-dir)")
        runs[key] = (vcfg, path.parent)
    if not runs:
        raise FileNotFoundError(f"no finished {'/'.join(methods)} runs (result.json beside adapters.pt) "
                                f"under {root}: run `python -m lab.vit_runs --out-dir {root}` first")
    backbones = {folder.parents[2] for _, folder in runs.values()}  # train_vit.py's <out-dir>/<backbone>/<task>/...
    if len(backbones) > 1:
        raise ValueError(f"the runs under {root} fine-tuned {len(backbones)} different backbones: point "
                         f"--analyse at the --out-dir of one train_vit.py configuration")
    return runs


def analyse(cfg: Config) -> dict:
    """Shapley (per block, and per module with --players module), seed interpolation, multi-task
    combination and pruning of saved runs; each report is cached as JSON under <analyse>/games/."""
    if cfg.value not in ("acc", "neg_loss") or cfg.players not in ("block", "module"):
        raise ValueError(f"value={cfg.value!r} must be acc or neg_loss; players={cfg.players!r} block or module")
    root, methods = Path(cfg.analyse), cfg.methods.split(",")
    runs = saved_runs(root, methods)
    first = next(iter(runs.values()))[0]
    task_names = sorted({t for _, t, _ in runs})
    ctx = Context(first, task_names, cfg.n_eval)
    tasks = ctx.tasks(dataclasses.replace(first, seed=0))  # the subsets train_vit.py's main() uses
    settings = {k: getattr(cfg, k) for k in ("value", "n_eval", "players", "num_samples")}
    out = root / "games"
    cache = out / ("cache-" + hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8])
    p, index = Plan(), []
    for m in methods:
        mine = {(t, s): (vcfg, tasks[t], folder) for (x, t, s), (vcfg, folder) in sorted(runs.items()) if x == m}
        analysis_jobs(p, index, ctx, (m,), mine, cache, cfg.value, cfg.num_samples if cfg.players == "module" else 0)
    count = collections.Counter((m, t) for m, t, _ in runs)  # seeds per method and task
    single = [f"{m}/{t}" for (m, t), k in sorted(count.items()) if k == 1]
    if single:
        print(f"no interpolation for {', '.join(single)}: it needs two seeds of a task (train_vit.py --seeds 2)")
    if len(task_names) == 1:
        print(f"no multi-task combination: it needs runs of two tasks, the runs are all {task_names[0]}")
    p.run()
    res = collect(index)
    results = {m: reports(res, m, kinds=("adapter", "pair", "combination", "module")) for m in methods}
    write_json(out / "games.json", {"config": dataclasses.asdict(cfg), "results": results})
    paths = plot_reports({m: reports(res, m) for m in methods}, out,
                         "accuracy" if cfg.value == "acc" else "minus cross-entropy",
                         about=f"{root}: tasks {', '.join(task_names)}; {len(runs)} runs")
    for m, r in results.items():  # means over the runs
        mean = lambda rs, get: statistics.fmean(get(x) for x in rs)  # noqa: E731
        if r["adapters"]:
            line = (f"{m}: {len(r['adapters'])} runs | {cfg.value} {mean(r['adapters'], lambda a: a['full']):.4f} | "
                    f"every other block {mean(r['adapters'], lambda a: a['structured']['every_other']):.4f}")
            if r["pairs"]:
                line += f" | interpolation midpoint {mean(r['pairs'], lambda q: q['factors']['midpoint']):.4f}"
            print(line)
    print(f"wrote {out / 'games.json'} and {', '.join(p.name for p in paths)}")
    return results


if __name__ == "__main__":
    run_script(main, Config, __doc__, __file__, "run the same command again to continue (finished jobs are cached)",
               example="OMP_NUM_THREADS=1 python -m lab.reproduce --quick")
