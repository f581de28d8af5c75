"""train_vit.py's job with its backbone pretrained here (cached by flags and data), a folder per run (checkpoints,
--resume, metrics.jsonl, adapters.pt, result.json), DDP under torchrun, and the knobs of the lab's studies: CIFAR-10,
a backbone from a file (--init), progressive dropout, compiled blocks, test-set evaluations while training.

The backbone: out_dir/pretrain-<hash of the pretraining flags and the data>/backbone.pt, pretrained on the source
classes when missing (runs/vit ships the default flags' one, which train_vit.py loads).

Every fine-tuning run of train_vit.main() gets out_dir/<backbone>/<task>/<method>/seed<k>/: metrics.jsonl (a
record per log line, locked while the run trains), ckpt.pt every --ckpt-every steps (written atomically, gone
once the run finishes), then adapters.pt (adapters and head) and result.json (metrics and flags). With
--resume, a run continues from its checkpoint exactly as if never interrupted, a run finished with the same
flags is kept, and other flags are refused by name. The tables are train_vit.py's, digit for digit.

    OMP_NUM_THREADS=1 python -m lab.vit_runs --resume --ckpt-every 50   # train_vit.py's flags, and these
    OMP_NUM_THREADS=1 python -m lab.vit_runs --dataset cifar10 --patch-size 4   # CIFAR-10's binary batches in ./data
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m lab.vit_runs   # DDP: gloo on the CPU, nccl on CUDA
"""
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import train_vit
from lab.utils import (atomic_save, finished_run, load_checkpoint, lock_folder, rank_world, run_script,
                       save_checkpoint, save_result, skip_finished)
from coto import coto_prob
from lora import inject_lora, load_lora_state_dict, lora_layers, lora_metadata
from train_toy import pick_device
from train_vit import adapter_state, build_model, data_dirs, evaluate, method_name, parse_classes, with_sha1
from vit import load_pretrained

EXAMPLE = "OMP_NUM_THREADS=1 python -m lab.vit_runs --tasks rot90 --resume --ckpt-every 25"
# how a run is carried out or listed, not what it computes: --resume allows other values
NOT_IN_RESULT = ("data_dir", "device", "compile", "out_dir", "resume", "ckpt_every", "log_every", "eval_every", "tasks",
                 "seeds", "compare", "backbone")  # backbone: the file train_vit.py loads; here, the folder's key is it
PRETRAIN_FIELDS = (*train_vit.ARCH, *(f"pretrain_{k}" for k in ("steps", "lr", "batch_size", "weight_decay", "warmup",
                                                                 "seed")))


@dataclass
class Config(train_vit.Config):
    pretrain_steps: int = 500  # optimizer steps of pretraining (cached under out_dir/pretrain-<hash>/)
    pretrain_lr: float = 1e-3  # peak learning rate of pretraining
    pretrain_batch_size: int = 128  # images per pretraining step (global: split over DDP ranks)
    pretrain_weight_decay: float = 0.01  # AdamW weight decay of pretraining
    pretrain_warmup: int = 10  # linear-warmup steps of pretraining, then cosine to 0
    pretrain_seed: int = 0  # the backbone's initialisation and data order (fine-tuning seeds leave it alone)
    compile: bool = False  # torch.compile each block (two graphs per block: adapters on and off)
    dataset: str = "fashion-mnist"  # fashion-mnist (IDX files) | cifar10 (binary batches; e.g. --patch-size 4)
    init: str = ""  # backbone from a torch.save'd timm-format state dict (.pt) instead of pretraining
    progressive_dropout: bool = False  # lora_dropout decays to 0 on CoTo's stage-1 schedule (a baseline)
    eval_every: int = 0  # steps between test-set evaluations while fine-tuning, into metrics.jsonl (0: only at the end)
    resume: bool = False  # continue each run from its checkpoint; keep the runs finished with these flags
    ckpt_every: int = 50  # steps between checkpoints (0: none); a finished run keeps none, its result.json marks it

    def __post_init__(self):
        for k in ("pretrain_steps", "pretrain_batch_size", "pretrain_lr"):  # train_vit.Config allows 0: not these
            if not getattr(self, k) > 0:
                v = getattr(self, k)
                raise ValueError(f"--{k.replace('_', '-')} {v}: must be " + ("an integer >= 1" if type(v) is int else "> 0"))
        super().__post_init__()
        if self.backbone != train_vit.Config.backbone:
            raise ValueError("--backbone is train_vit.py's: lab.vit_runs pretrains its backbone (cached) or loads --init")
        if self.dataset not in ("fashion-mnist", "cifar10"):
            raise ValueError(f"--dataset {self.dataset!r}: choose fashion-mnist, cifar10")
        if self.progressive_dropout and not self.lora_dropout > 0:
            raise ValueError("--progressive-dropout decays --lora-dropout to 0: set --lora-dropout > 0 (e.g. 0.5)")


def load_data(cfg: Config) -> dict:
    """train_vit.load_data's dict of cfg.dataset: Fashion-MNIST's, or CIFAR-10's binary batches."""
    return train_vit.load_data(cfg) if cfg.dataset == "fashion-mnist" else load_cifar10(cfg.data_dir)


def load_cifar10(data_dir: str) -> dict:
    """CIFAR-10's binary batches: records of 1 label byte + 3072 pixel bytes (the R, G, B planes of 32 x 32)."""
    dirs = [f for d in data_dirs(data_dir) for f in (d, d / "cifar-10-batches-bin")]
    for d in (d for d in dirs if (d / "test_batch.bin").is_file()):
        out = {"name": "cifar10", "folder": str(d)}
        for split, names in (("train", [f"data_batch_{i}.bin" for i in range(1, 6)]), ("test", ["test_batch.bin"])):
            raw = torch.cat([torch.frombuffer(bytearray((d / n).read_bytes()), dtype=torch.uint8) for n in names])
            if raw.numel() % 3073 or raw.view(-1, 3073)[:, 0].max() > 9:
                raise ValueError(f"{d}: {', '.join(names)} is not records of 1 label + 3072 pixel bytes; replace it "
                                 "from cifar-10-binary.tar.gz")
            records = raw.view(-1, 3073)  # (N, 1 + 3 * 32 * 32)
            out[f"x_{split}"], out[f"y_{split}"] = records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].long()
        return with_sha1(out)
    raise FileNotFoundError(
        f"CIFAR-10 binary batches not found (looked for test_batch.bin in: {', '.join(map(str, dirs))}).\n  Download "
        "cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it into ./data (giving "
        "./data/cifar-10-batches-bin/), or pass --data-dir FOLDER.")


def backbone_key(cfg: Config, data: dict) -> str:
    """The backbone's folder name: a hash of the pretraining flags and of the data itself; for --init, of the file."""
    if cfg.init:
        return "init-" + hashlib.sha1(Path(cfg.init).read_bytes()).hexdigest()[:10]
    fields = [{f: getattr(cfg, f) for f in PRETRAIN_FIELDS}, data["sha1"]]
    return "pretrain-" + hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def pretrain(cfg: Config, data: dict) -> dict:
    """The backbone's state dict: out_dir/<backbone_key>/backbone.pt, else pretrained on the source classes and
    saved there (atomically) with the flags and data it was pretrained with, which train_vit.py checks."""
    path = Path(cfg.out_dir) / backbone_key(cfg, data) / "backbone.pt"
    config = {**{f: getattr(cfg, f) for f in PRETRAIN_FIELDS}, "data_sha1": data["sha1"]}
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["config"] == config:
                return saved["state"]
            print(f"{path} was pretrained with other flags: pretraining it again", flush=True)
        except Exception as e:  # e.g. a copy cut short: train it again rather than fail or use it
            print(f"{path} is damaged ({type(e).__name__}): pretraining it again", flush=True)
    source = parse_classes(cfg.source_classes)
    torch.manual_seed(cfg.pretrain_seed)
    model = build_model(cfg, data["x_train"], len(source)).to(pick_device(cfg.device))
    remap = torch.full((10,), -1).index_put_((torch.tensor(source),), torch.arange(len(source)))
    mtr, mte = remap[data["y_train"]] >= 0, remap[data["y_test"]] >= 0
    print(f"pretraining a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter ViT on classes "
          f"{cfg.source_classes} ({int(mtr.sum())} images) for {cfg.pretrain_steps} steps", flush=True)
    train_vit.train_loop(model, data["x_train"][mtr], remap[data["y_train"][mtr]], cfg, steps=cfg.pretrain_steps,
                         lr=cfg.pretrain_lr, batch_size=cfg.pretrain_batch_size, weight_decay=cfg.pretrain_weight_decay,
                         warmup=cfg.pretrain_warmup, seed=cfg.pretrain_seed, name="pretrain", run=Ranks())
    acc, _ = evaluate(model, data["x_test"][mte], remap[data["y_test"][mte]])
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    print(f"pretrained: source test accuracy {acc:.4f}; cached in {path}", flush=True)
    if rank_world()[0] == 0:
        atomic_save({"state": state, "source_acc": acc, "config": config}, path)
    return state


def backbone(cfg: Config, data: dict) -> dict:
    """The backbone's state dict: --init's file (a torch.save'd timm-format state dict, every key and shape checked
    against the ViT), else pretrain's (cached)."""
    if not cfg.init:
        return pretrain(cfg, data)
    try:
        state = torch.load(cfg.init, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))  # the usual nestings of training checkpoints
        load_pretrained(build_model(cfg, data["x_train"], 10), state)
    except Exception as e:
        raise ValueError(f"--init {cfg.init}: {e if isinstance(e, ValueError) else type(e).__name__}; it must be a "
                         f"torch.save'd timm-format state dict (a .safetensors: python -m lab.vit_weights)") from None
    return state


def run_config(cfg: Config) -> dict:
    """What a fine-tuning run's result depends on (its task and backbone are its folder)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_RESULT}


def vit_fields(cfg) -> dict:
    """What result.json records of cfg, so that Config(**it) rebuilds the run's: every field but the two of --resume."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resume", "ckpt_every")}


def run_dir(cfg: Config, key: str, task: str) -> Path:
    """out_dir/<backbone_key>/<task>/<method>/seed<seed>: one fine-tuning run's files."""
    return Path(cfg.out_dir) / key / task / method_name(cfg) / f"seed{cfg.seed}"


class Ranks:
    """train_vit.train_loop's `run` for DDP under torchrun: every rank draws the same global batch (and CoTo mask)
    and trains on its share in a DistributedDataParallel, which averages the gradients; outside torchrun, nothing."""

    def start(self, model, opt, coto, batches, log) -> int:
        rank, world = rank_world()
        if batches.batch_size % world:
            raise ValueError(f"a batch of {batches.batch_size} (--batch-size, --pretrain-batch-size) must be divisible "
                             f"by the {world} DDP ranks")
        if world > 1:  # this rank's share of the global batch
            batches.next = lambda draw=batches.next: draw()[rank::world]
        self.coto = coto
        return 0

    def wrap(self, model):
        """The model under DDP: a bypassed adapter is unused on every rank alike, hence find_unused_parameters."""
        if rank_world()[1] == 1:
            return model
        device = next(model.parameters()).device
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                         else None, find_unused_parameters=self.coto is not None)

    def step(self, step: int) -> None:
        pass

    def finish(self, model, metrics: dict) -> None:
        pass


class Run(Ranks):
    """One run's folder: the `run` that train_vit.finetune and train_loop call (start, wrap, step, finish); it also
    compiles the blocks (--compile), sets the progressive dropout of each step and evaluates every --eval-every steps."""

    def __init__(self, folder, cfg: Config, task):
        self.folder, self.cfg, self.task = Path(folder), cfg, task
        self.name, self.result = f"{task.name} {method_name(cfg)} s{cfg.seed}", None  # result: finished, kept
        if cfg.resume and (self.folder / "result.json").is_file() and not (self.folder / "adapters.pt").is_file():
            print(f"{self.folder} finished, but its adapters.pt is gone: training it again", flush=True)
        elif cfg.resume:  # another configuration's result is an error naming the fields, before any work
            self.result = finished_run(self.folder, run_config(cfg), NOT_IN_RESULT)

    def load(self, backbone: dict):
        """The finished run's model, from its adapters.pt."""
        skip_finished(self.result, self.folder, self.name)
        return load_adapters(self.cfg, self.task, backbone, self.folder / "adapters.pt")

    def start(self, model, opt, coto, batches, log: dict) -> int:
        """The folder locked and made ready; with --resume, everything restored from ckpt.pt: its step."""
        super().start(model, opt, coto, batches, log)
        self.model, self.opt, self.batches, self.log, self.metrics = model, opt, batches, log, None  # self.coto: Ranks
        for blk in model.blocks if self.cfg.compile else ():  # per block: adapters on or off, two graphs, no recompiles
            blk.compile()
        ckpt, start = self.folder / "ckpt.pt", 0
        if rank_world()[0] == 0:  # the one writer, alone in the folder: a second process stops with one line
            self.lock = lock_folder(self.folder)
            self.metrics = open(self.folder / "metrics.jsonl", "a+")
            for stale in self.folder.glob("*.tmp"):  # the folder is ours: left by a process killed while writing
                stale.unlink()
        if self.cfg.resume and ckpt.is_file():
            start, data, saved = load_checkpoint(ckpt, model, opt, coto, config=run_config(self.cfg))
            batches.generator.set_state(data["generator"])
            batches.queue = data["queue"]
            log.update(saved)  # the whole run's history and timings, not the last segment's
            print(f"resuming {self.name} from step {start}", flush=True)
        elif self.metrics:  # a fresh run: nothing of an earlier one stays
            skip_finished(None, self.folder, self.name)
            for f in ("ckpt.pt", "result.json"):
                (self.folder / f).unlink(missing_ok=True)
        if self.metrics:  # the records the checkpoint covers, as an uninterrupted run wrote them (in place: locked)
            self.metrics.seek(0)
            lines, keep = self.metrics.read().splitlines(), []
            for i, line in enumerate(lines):
                try:
                    keep += [line + "\n"] if json.loads(line)["step"] <= start else []
                except (ValueError, KeyError, TypeError):
                    if i < len(lines) - 1:  # else a torn last line: the process was killed while writing it
                        raise ValueError(f"{self.folder / 'metrics.jsonl'} line {i + 1} is damaged; delete the file "
                                         "(or run without --resume)") from None
            self.metrics.truncate(0), self.metrics.writelines(keep)
        self.set_dropout(start)
        return start

    def set_dropout(self, step: int) -> None:
        """--progressive-dropout: step `step`'s dropout, lora_dropout decaying to 0 on CoTo's stage-1 schedule."""
        for layer in lora_layers(self.model).values() if self.cfg.progressive_dropout else ():
            layer.lora_dropout.p = self.cfg.lora_dropout * (1 - coto_prob(step, self.cfg.steps, 0.0, self.cfg.stage1_ratio))

    def step(self, step: int) -> None:
        """After optimizer step `step`: an evaluation when due, the step's log record into metrics.jsonl, a
        checkpoint every --ckpt-every steps, the next step's dropout."""
        records = [r for r in self.log["history"][-1:] if r["step"] == step]
        self.set_dropout(step)
        if self.cfg.eval_every and step % self.cfg.eval_every == 0:
            acc, loss = evaluate(self.model, self.task.x_test, self.task.y_test)  # eval mode: every adapter runs
            records = [*records, {"tag": self.name, "step": step, "eval_loss": loss, "eval_acc": acc}]
            print(f"{self.name} | step {step} | eval loss {loss:.4f} | eval acc {acc:.4f}", flush=True)
        if not self.metrics:
            return
        self.metrics.writelines(json.dumps(r) + "\n" for r in records)
        self.metrics.flush()
        if self.cfg.ckpt_every and step % self.cfg.ckpt_every == 0 and step < self.cfg.steps:
            data = {"generator": self.batches.generator.get_state(), "queue": self.batches.queue.clone()}
            save_checkpoint(self.folder / "ckpt.pt", self.model, self.opt, step, data, self.coto,
                            config=run_config(self.cfg), extra=self.log)

    def finish(self, model, metrics: dict) -> None:
        """adapters.pt and result.json, which marks the run finished (its checkpoint goes)."""
        if self.metrics:
            atomic_save({"state": adapter_state(model), "metadata": {**lora_metadata(model), "task": self.task.name}},
                        self.folder / "adapters.pt")
            save_result(self.folder, metrics, vit_fields(self.cfg))
            self.metrics.close()
            self.lock.close()  # the run's files are complete: the folder is free


def load_adapters(cfg, task, backbone: dict, path):
    """A fine-tuned model rebuilt from the backbone and a run's adapters.pt (a file of another variant: an error)."""
    model = build_model(cfg, task.x_train, task.num_classes)
    load_pretrained(model, backbone)
    inject_lora(model, cfg.targets.split(","), r=cfg.r, alpha=cfg.alpha, variant=cfg.variant, rslora=cfg.rslora)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    state = dict(saved["state"])
    model.head.load_state_dict({"weight": state.pop("head.weight"), "bias": state.pop("head.bias")})
    load_lora_state_dict(model, state, metadata=saved["metadata"])
    return model.to(pick_device(cfg.device)).eval()


def main(cfg: Config) -> dict:
    """train_vit.main() on cfg's data and backbone, every run in its folder; under torchrun, one process group for
    the whole job (nccl on CUDA, gloo on the CPU), rank 0 alone printing and writing files."""
    if cfg.init and not Path(cfg.init).is_file():
        raise FileNotFoundError(f"--init {cfg.init}: no such file")
    cuda = pick_device(cfg.device).type == "cuda"  # a device this machine lacks: one line before the data is read
    data_dirs(cfg.data_dir)  # a --data-dir that does not exist: the same
    ddp = "WORLD_SIZE" in os.environ and not dist.is_initialized()
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        with contextlib.ExitStack() as stack:
            out = cfg.out_dir
            if rank_world()[0]:  # the other ranks print nothing, and their results.json goes where it is dropped
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
                out = stack.enter_context(tempfile.TemporaryDirectory())
            data = load_data(cfg)
            key = backbone_key(cfg, data)
            folder = lambda c, task: run_dir(dataclasses.replace(c, out_dir=cfg.out_dir), key, task.name)  # noqa: E731
            return train_vit.main(dataclasses.replace(cfg, out_dir=out), data, lambda c, d: backbone(cfg, d),
                                  runs=lambda c, task: Run(folder(c, task), c, task))
    finally:
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    run_script(main, Config, __doc__, __file__, example=EXAMPLE)
