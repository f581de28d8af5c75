"""train_vit.py's job with a folder per run (checkpoints, --resume, metrics.jsonl, adapters.pt, result.json) and
the knobs of the lab's studies: CIFAR-10, a backbone from a file (--init), progressive dropout, test-set
evaluations while training (--eval-every).

Every fine-tuning run of train_vit.main() gets out_dir/<backbone>/<task>/<method>/seed<k>/: metrics.jsonl (a
record per log line, locked while the run trains), ckpt.pt every --ckpt-every steps (written atomically, gone
once the run finishes), then adapters.pt (adapters and head) and result.json (metrics and flags). With
--resume, a run continues from its checkpoint exactly as if never interrupted, a run finished with the same
flags is kept, and other flags are refused by name. The tables are train_vit.py's, digit for digit.

    OMP_NUM_THREADS=1 python -m lab.vit_runs --resume --ckpt-every 50   # train_vit.py's flags, and these
    OMP_NUM_THREADS=1 python -m lab.vit_runs --dataset cifar10 --patch-size 4   # CIFAR-10's binary batches in ./data
"""
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

import train_vit
from lab.utils import (atomic_save, finished_run, load_checkpoint, lock_folder, run_script, save_checkpoint,
                       save_result, skip_finished)
from coto import coto_prob
from lora import inject_lora, load_lora_state_dict, lora_layers, lora_metadata
from train_toy import pick_device
from train_vit import adapter_state, build_model, data_dirs, evaluate, method_name, rank_world, say, with_sha1
from vit import load_pretrained

EXAMPLE = "OMP_NUM_THREADS=1 python -m lab.vit_runs --tasks rot90 --resume --ckpt-every 25"
# how a run is carried out or listed, not what it computes: --resume allows other values
NOT_IN_RESULT = ("data_dir", "device", "compile", "out_dir", "resume", "ckpt_every", "log_every", "eval_every", "tasks",
                 "seeds", "compare")


@dataclass
class Config(train_vit.Config):
    dataset: str = "fashion-mnist"  # fashion-mnist (IDX files) | cifar10 (binary batches; e.g. --patch-size 4)
    init: str = ""  # backbone from a torch.save'd timm-format state dict (.pt) instead of pretraining
    progressive_dropout: bool = False  # lora_dropout decays to 0 on CoTo's stage-1 schedule (a baseline)
    eval_every: int = 0  # steps between test-set evaluations while fine-tuning, into metrics.jsonl (0: only at the end)
    resume: bool = False  # continue each run from its checkpoint; keep the runs finished with these flags
    ckpt_every: int = 50  # steps between checkpoints (0: none); a finished run keeps none, its result.json marks it

    def __post_init__(self):
        super().__post_init__()
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
    """train_vit.backbone_key, or for --init a hash of the file."""
    return "init-" + hashlib.sha1(Path(cfg.init).read_bytes()).hexdigest()[:10] if cfg.init else \
        train_vit.backbone_key(cfg, data)


def backbone(cfg: Config, data: dict) -> dict:
    """The backbone's state dict: --init's file (a torch.save'd timm-format state dict, every key and shape checked
    against the ViT), else train_vit.pretrain's (cached)."""
    if not cfg.init:
        return train_vit.pretrain(cfg, data)
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


class Run:
    """One run's folder: the `run` that train_vit.finetune and train_loop call (start, step, finish); it also
    sets the progressive dropout of each step and evaluates every --eval-every steps."""

    def __init__(self, folder, cfg: Config, task):
        self.folder, self.cfg, self.task = Path(folder), cfg, task
        self.name, self.result = f"{task.name} {method_name(cfg)} s{cfg.seed}", None  # result: finished, kept
        if cfg.resume and (self.folder / "result.json").is_file() and not (self.folder / "adapters.pt").is_file():
            say(f"{self.folder} finished, but its adapters.pt is gone: training it again")
        elif cfg.resume:  # another configuration's result is an error naming the fields, before any work
            self.result = finished_run(self.folder, run_config(cfg), NOT_IN_RESULT)

    def load(self, backbone: dict):
        """The finished run's model, from its adapters.pt."""
        skip_finished(self.result, self.folder, self.name, say)
        return load_adapters(self.cfg, self.task, backbone, self.folder / "adapters.pt")

    def start(self, model, opt, coto, batches, log: dict) -> int:
        """The folder locked and made ready; with --resume, everything restored from ckpt.pt: its step."""
        self.model, self.opt, self.coto, self.batches, self.log, self.metrics = model, opt, coto, batches, log, None
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
            say(f"resuming {self.name} from step {start}")
        elif self.metrics:  # a fresh run: nothing of an earlier one stays
            skip_finished(None, self.folder, self.name, say)
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

    def step(self, step: int, records: list) -> None:
        """After optimizer step `step`: an evaluation when due, the log records into metrics.jsonl, a checkpoint
        every --ckpt-every steps, the next step's dropout."""
        self.set_dropout(step)
        if self.cfg.eval_every and step % self.cfg.eval_every == 0:
            acc, loss = evaluate(self.model, self.task.x_test, self.task.y_test)  # eval mode: every adapter runs
            records = [*records, {"tag": self.name, "step": step, "eval_loss": loss, "eval_acc": acc}]
            say(f"{self.name} | step {step} | eval loss {loss:.4f} | eval acc {acc:.4f}")
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
    """train_vit.main() on cfg's data and backbone, every run in its folder."""
    if cfg.init and not Path(cfg.init).is_file():
        raise FileNotFoundError(f"--init {cfg.init}: no such file")
    pick_device(cfg.device), data_dirs(cfg.data_dir)  # a wrong place: one line before the data is read
    data = load_data(cfg)
    key = backbone_key(cfg, data)
    return train_vit.main(cfg, data, backbone(cfg, data) if cfg.init else None,
                          runs=lambda c, task: Run(run_dir(c, key, task.name), c, task))


if __name__ == "__main__":
    run_script(main, Config, __doc__, __file__, example=EXAMPLE)
