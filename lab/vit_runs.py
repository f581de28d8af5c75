"""train_vit.py's job with a folder per run: checkpoints, --resume, metrics.jsonl, adapters.pt and result.json.

Every fine-tuning run of train_vit.main() gets out_dir/<backbone>/<task>/<method>/seed<k>/: metrics.jsonl (a
record per log line, locked while the run trains), ckpt.pt every --ckpt-every steps (written atomically, gone
once the run finishes), then adapters.pt (adapters and head) and result.json (metrics and flags). With
--resume, a run continues from its checkpoint exactly as if never interrupted, a run finished with the same
flags is kept, and other flags are refused by name. The tables are train_vit.py's, digit for digit.

    OMP_NUM_THREADS=1 python -m lab.vit_runs --resume --ckpt-every 50   # train_vit.py's flags, and these two
"""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

import train_vit
from lab.utils import (atomic_save, finished_run, load_checkpoint, lock_folder, run_script, save_checkpoint,
                       save_result, skip_finished)
from lora import inject_lora, load_lora_state_dict, lora_metadata
from train_toy import pick_device
from train_vit import adapter_state, build_model, method_name, rank_world, say
from vit import load_pretrained

EXAMPLE = "OMP_NUM_THREADS=1 python -m lab.vit_runs --tasks rot90 --resume --ckpt-every 25"
# how a run is carried out or listed, not what it computes: --resume allows other values
NOT_IN_RESULT = ("data_dir", "device", "compile", "out_dir", "resume", "ckpt_every", "log_every", "eval_every", "tasks",
                 "seeds", "compare")


@dataclass
class Config(train_vit.Config):
    resume: bool = False  # continue each run from its checkpoint; keep the runs finished with these flags
    ckpt_every: int = 50  # steps between checkpoints (0: none); a finished run keeps none, its result.json marks it

    def __post_init__(self):
        super().__post_init__()
        if self.ckpt_every < 0:
            raise ValueError(f"--ckpt-every {self.ckpt_every}: must be an integer >= 0")


def run_config(cfg: Config) -> dict:
    """What a fine-tuning run's result depends on (its task and backbone are its folder)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_RESULT}


def vit_fields(cfg) -> dict:
    """cfg's train_vit.Config fields: what result.json records, so train_vit.Config(**it) rebuilds the run's."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(train_vit.Config)}


def run_dir(cfg: Config, key: str, task: str) -> Path:
    """out_dir/<backbone_key>/<task>/<method>/seed<seed>: one fine-tuning run's files."""
    return Path(cfg.out_dir) / key / task / method_name(cfg) / f"seed{cfg.seed}"


class Run:
    """One run's folder: the `run` that train_vit.finetune and train_loop call (start, step, finish)."""

    def __init__(self, folder, cfg: Config, task: str):
        self.folder, self.cfg, self.task = Path(folder), cfg, task
        self.name, self.result = f"{task} {method_name(cfg)} s{cfg.seed}", None  # result: finished, kept (--resume)
        if cfg.resume and (self.folder / "result.json").is_file() and not (self.folder / "adapters.pt").is_file():
            say(f"{self.folder} finished, but its adapters.pt is gone: training it again")
        elif cfg.resume:  # another configuration's result is an error naming the fields, before any work
            self.result = finished_run(self.folder, run_config(cfg), NOT_IN_RESULT)

    def load(self, task, backbone: dict):
        """The finished run's model, from its adapters.pt."""
        skip_finished(self.result, self.folder, self.name, say)
        return load_adapters(self.cfg, task, backbone, self.folder / "adapters.pt")

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
        return start

    def step(self, step: int, records: list) -> None:
        """Optimizer step `step`'s log records into metrics.jsonl; a checkpoint every --ckpt-every steps."""
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
            atomic_save({"state": adapter_state(model), "metadata": {**lora_metadata(model), "task": self.task}},
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
    """train_vit.main(), every run in its folder."""
    return train_vit.main(cfg, runs=lambda c, key, task: Run(run_dir(c, key, task), c, task))


if __name__ == "__main__":
    run_script(main, Config, __doc__, __file__, example=EXAMPLE)
