"""Small helpers shared by the lab's scripts: their one-line errors, atomic checkpoints, weight files, run-folder
locks, the training machinery of train_gpt2 (logging, resume), DDP ranks and the seed tables. (The flags, the device
choice, the LR schedule, the divergence check and method names are the classroom's: train_toy, train_vit.)

safetensors is read and written by hand (the format is an 8-byte little-endian header length, a
JSON header of {name: {dtype, shape, data_offsets}}, then the raw bytes), so loading a
checkpoint needs nothing beyond torch.
"""
import dataclasses
import json
import math
import os
import statistics
import struct
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from train_toy import parse_args

try:
    import fcntl  # a lock per run folder (POSIX); without it, runs sharing a folder are not refused
except ImportError:
    fcntl = None


def rank_world() -> tuple:
    """(rank, world size) under torchrun; (0, 1) outside it."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn, "C64": torch.complex64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def run_script(main, cls, doc: str, file: str,
               interrupted: str = "run the same command with --resume to continue from the last checkpoints",
               example: str = "") -> None:
    """What `python -m lab.script --flags` does: main(parse_args(cls, ...)), the flags built by the classroom's
    parse_args. Ctrl-C, bad flags, missing or damaged files and a diverging run end in one line that says what to
    do, not a traceback."""
    try:
        main(parse_args(cls, doc, example))
    except KeyboardInterrupt:
        raise SystemExit(f"\ninterrupted: {interrupted}")
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        raise SystemExit(f"{Path(file).name}: error: {e}")


def _atomic_write(path, write) -> None:
    """Write to a temporary file in the target folder, then rename: a crash never leaves half a file.
    The temporary file's name is this write's own (mkstemp), so processes writing into one folder never
    touch each other's; one killed mid-write leaves its .tmp file behind, harmless, for the user to delete.
    The file gets the user's normal permissions (0666 minus the umask, as open() gives), not
    mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)  # the only portable way to read the umask is to set it
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_save(obj, path) -> None:
    """torch.save(obj, path), atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text: str) -> None:
    """Path(path).write_text(text), atomically (result files mark finished runs for --resume)."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def save_checkpoint(path, model, opt, step: int, data_state, coto=None, *, config: dict,
                    extra: dict | None = None) -> None:
    """Everything a resumed run needs to continue exactly where it stopped (the LR schedule and CoTo's p
    are functions of the step), written atomically. `config`: a JSON-able dict of every field that affects
    the result (load_checkpoint refuses another); `extra`: the trainer's state (history, timings)."""
    atomic_save({"step": step,
                 "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                 "optimizer": opt.state_dict(), "data": data_state,
                 "coto": coto.state_dict() if coto is not None else None,
                 "rng": {"cpu": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                 "config": json.loads(json.dumps(config)), "extra": extra if extra is not None else {}},
                path)


def config_diff(saved: dict, now: dict, then: str = "then") -> list:
    """"field: value then, value now" for every field in which two configurations differ."""
    saved, now = json.loads(json.dumps([saved, now]))  # as JSON sees them (tuples become lists): comparable
    return [f"{k}: {saved.get(k, '(absent)')!r} {then}, {now.get(k, '(absent)')!r} now"
            for k in sorted(saved.keys() | now.keys()) if k not in saved or k not in now or saved[k] != now[k]]


def load_checkpoint(path, model, opt, coto=None, *, config: dict):
    """Restore what save_checkpoint wrote into model, opt and coto; returns (step, data_state, extra).
    A damaged file, or one written by a run with another configuration, is a ValueError that says
    what to do, raised before the model is touched."""
    fix = f"delete {path} (or run without --resume) to start this run afresh"
    ck = _torch_load(path, fix)
    keys = {"step", "trainable", "optimizer", "data", "coto", "rng", "config", "extra"}  # what save_checkpoint writes
    if not isinstance(ck, dict) or set(ck) != keys or not isinstance(ck["config"], dict):
        raise ValueError(f"{path} is not a checkpoint written by save_checkpoint; {fix}")
    diff = config_diff(ck["config"], config, then="in the checkpoint")
    if diff:
        raise ValueError(f"checkpoint {path} was written by a run with another configuration ("
                         + "; ".join(diff) + f"). Rerun with the same flags to continue it, or {fix}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ours, theirs = ({n: tuple(t.shape) for n, t in d.items()} for d in (params, ck["trainable"]))
    if ours != theirs:
        wrong = sorted(n for n in ours.keys() | theirs.keys() if ours.get(n) != theirs.get(n))
        raise ValueError(f"checkpoint {path} does not fit this model (trainable parameters that differ in "
                         f"name or shape: {', '.join(wrong[:5])}); {fix}")
    with torch.no_grad():
        for n, t in ck["trainable"].items():
            params[n].copy_(t)
    opt.load_state_dict(ck["optimizer"])
    if coto is not None:
        coto.load_state_dict(ck["coto"])
    torch.set_rng_state(ck["rng"]["cpu"])
    if ck["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    return ck["step"], ck["data"], ck["extra"]


def _torch_load(path, fix: str):
    """torch.load of tensors and plain containers only; any failure is a ValueError naming the file
    and the `fix`. (torch's own message advises weights_only=False, which runs the file's code.)"""
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files not its own
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path} is damaged or not a file of tensors (empty, truncated, or holding Python "
                         f"objects, which are not loaded for safety; torch.load raised {type(e).__name__}); "
                         f"{fix}") from None


def truncate_jsonl(path, step: int) -> None:
    """Keep only the records of a JSON-lines log whose "step" is <= step (and those without one), so
    a run resumed from the checkpoint of `step` writes the same log as an uninterrupted run. A torn
    last line (the process was killed mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path} line {i + 1} is not JSON; delete the file (or run without "
                             f"--resume)") from None
        if not isinstance(rec, dict) or rec.get("step", step) <= step:
            keep.append(line + "\n")
    atomic_write_text(path, "".join(keep))


def write_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write {name: tensor} as a .safetensors file (atomically)."""
    chunks, header, offset = [], {}, 0
    for name, t in tensors.items():
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"cannot write {name!r} to {path}: safetensors has no {t.dtype}")
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # (numel * itemsize,); 0-d too
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + raw.numel()]}
        chunks.append(raw)
        offset += raw.numel()
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to a multiple of 8 bytes

    def write(f):
        f.write(struct.pack("<Q", len(head)) + head)
        for raw in chunks:
            f.write(raw.numpy())  # the tensor's own memory: no second copy of the weights

    _atomic_write(path, write)


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0  # JSON's true is a Python int


def _read_header(f, path) -> tuple[dict, dict, int]:
    """Read and check a safetensors header as the safetensors library does: returns
    ({name: (dtype, shape, start, end)}, metadata, offset of the data). The tensors must tile the
    data exactly: no gap, no overlap, nothing past the end, each size = prod(shape) * dtype size."""
    def bad(problem):
        return ValueError(f"{path} is not a valid safetensors file: {problem}; replace the file "
                          f"(a cached one can simply be deleted and is made again)")

    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise bad(f"it has {size} bytes, fewer than the 8 of the header length")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
        raise bad(f"its header length {n} is larger than the file ({size} bytes)")

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise bad(f"the header repeats the key {next(k for k in keys if keys.count(k) > 1)!r}")
        return dict(pairs)

    try:
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad(f"its header {json.dumps(header)[:40]} is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("its __metadata__ is not a map of strings to strings")
    entries = {}
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise bad(f"the entry of {name!r} is not an object with dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise bad(f"{name!r} has the unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(map(_is_count, shape)):
            raise bad(f"{name!r} has the shape {shape!r}, not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)) \
                or offsets[0] > offsets[1]:
            raise bad(f"{name!r} has the data_offsets {offsets!r}, not [start, end] with 0 <= start <= end")
        nbytes = math.prod(shape) * _ST_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"{name!r} has {offsets[1] - offsets[0]} bytes, but its shape {shape} of {dtype} "
                      f"needs {nbytes}")
        entries[name] = (_ST_DTYPES[dtype], shape, *offsets)
    end = 0
    for name, (_, _, start, stop) in sorted(entries.items(), key=lambda e: e[1][2:]):
        if start != end:
            raise bad(f"{name!r} starts at byte {start} of the data, where {end} was expected "
                      f"({'a gap' if start > end else 'an overlap'})")
        end = stop
    if end != size - 8 - n:
        raise bad(f"its tensors cover {end} bytes of data, but the file holds {size - 8 - n}")
    return entries, metadata, 8 + n


def read_safetensors(path) -> dict:
    """Read a .safetensors file into {name: tensor} on the CPU. Each tensor is read straight into
    its own buffer, so reading takes about the file's size in memory, no more."""
    out = {}
    with open(path, "rb") as f:
        entries, _, data = _read_header(f, path)
        for name, (dtype, shape, start, end) in entries.items():
            buf = bytearray(end - start)
            f.seek(data + start)
            f.readinto(buf)
            flat = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
            out[name] = flat.view(dtype).reshape(shape)  # shares buf's memory: no copy
    return out


def read_safetensors_metadata(path) -> dict:
    """The {str: str} "__metadata__" of a .safetensors file ({} without one); the file is checked
    as read_safetensors checks it, without reading the tensors."""
    with open(path, "rb") as f:
        return _read_header(f, path)[1]


def load_weights(path) -> dict:
    """A state dict from a local .safetensors, .pt, .pth or .bin file (tensors only, no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        state = _torch_load(path, "download or convert it again (a .safetensors file is the safe choice)")
        for key in ("state_dict", "model"):  # the usual nestings of training checkpoints
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        return state
    raise ValueError(f"cannot read {path}: expected a .safetensors, .pt, .pth or .bin file")


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------
# Training machinery of the lab's trainers (train_gpt2.py)


class TrainLog:
    """What a training loop reports: every `log_every` steps (and at the last; 0: only there) one line
        rot90 coto s0 | step 25 | loss 0.412 | acc 0.871 | p 0.43 | active 3/6 | 12 ms | eta 0:00:05
    and its record in `path` (metrics.jsonl); CoTo's active fraction and the time of every step.
    `state` goes into the checkpoint, so a resumed run reports the whole run."""

    def __init__(self, name: str, total_steps: int, log_every: int, path=None, quiet: bool = False):
        self.name, self.total_steps, self.log_every, self.quiet = name, total_steps, log_every, quiet
        self.path = Path(path) if path else None
        self.state = {"history": [], "active": [], "seconds": [], "sums": {}, "n": 0}
        self.lock = None  # resume(): the run folder's lock (lock_folder), held as long as the log
        self.restart_clock()

    def restart_clock(self) -> None:  # evaluation and checkpoint time is not a step's
        self.t = time.perf_counter()

    def write(self, rec: dict, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(json.dumps(rec) + "\n")

    def step(self, step: int, lr: float, coto=None, **metrics: float) -> None:
        """Record optimizer step `step` (counted from 1) and its metrics (loss=..., acc=...)."""
        now = time.perf_counter()
        s, seconds, self.t = self.state, now - self.t, now
        s["seconds"].append(seconds)
        if coto is not None:
            s["active"].append(coto.mask.float().mean().item())
        for k, v in {**metrics, "ms": 1000 * seconds}.items():  # summed until the next log line
            s["sums"][k] = s["sums"].get(k, 0.0) + v
        s["n"] += 1
        if step == self.total_steps or (self.log_every and step % self.log_every == 0):
            mean = {k: v / s["n"] for k, v in s["sums"].items()}
            rec = {"tag": self.name, "step": step, **mean, "lr": lr}
            line = f"{self.name} | step {step} | " + " | ".join(f"{k} {v:.3f}" for k, v in mean.items() if k != "ms")
            if coto is not None:
                rec["p"] = coto.p
                line += f" | p {coto.p:.2f} | active {int(coto.mask.sum())}/{len(coto.mask)}"
            line += f" | {mean['ms']:.0f} ms | eta {format_eta(mean['ms'] / 1000 * (self.total_steps - step))}"
            s["history"].append(rec)
            self.write(rec, line)
            s["sums"], s["n"] = {}, 0

    def eval(self, step: int, **metrics: float) -> None:
        """One evaluation line ("rot90 coto s0 | step 50 | eval acc 0.8800") and record."""
        self.write({"tag": self.name, "step": step, **metrics}, f"{self.name} | step {step} | "
                   + " | ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items()))
        self.restart_clock()

    def summary(self) -> dict:
        """{"history", "train_time_s", "warmup_s", "ms_per_step", "active_frac"}. Steps over 5x the
        median step are compile / warm-up (torch.compile compiles a block's graph the first time its
        adapters are on, and the first time off; no CoTo mask makes a step that much slower): their
        time is warmup_s, and ms_per_step is the steady state, the mean of the other steps."""
        s = self.state
        slow = 5 * statistics.median(s["seconds"])
        steady = [t for t in s["seconds"] if t <= slow]
        return {"history": s["history"], "train_time_s": sum(s["seconds"]),
                "warmup_s": sum(t for t in s["seconds"] if t > slow), "ms_per_step": 1000 * statistics.fmean(steady),
                "active_frac": statistics.fmean(s["active"]) if s["active"] else 1.0}


def lock_folder(folder):
    """An exclusive lock on folder/.lock, held while the returned file stays open: a second process
    on the same run folder stops with one line instead of mixing its files into this one's."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    lock = open(Path(folder) / ".lock", "a")
    try:
        if fcntl:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ValueError(f"{folder} is in use by another process: wait for it, or use another --out-dir") from None
    return lock


def resume(folder, resume: bool, model, opt, coto, data, config: dict, log: TrainLog) -> int:
    """The step a run in `folder` starts from: 0 for a fresh run (an earlier run's checkpoint and
    result deleted) or without a folder; with `resume`, the checkpoint's, with model, opt, coto, the
    data order (`data`: a torch.Generator or anything with its get_state / set_state) and log
    restored, and metrics.jsonl cut to that step (as if never interrupted)."""
    if not folder:
        return 0
    ckpt, rank, start = Path(folder) / "ckpt.pt", rank_world()[0], 0
    if rank == 0:  # the one writer, alone in the folder while the log lives
        log.lock = lock_folder(folder)
    if resume and ckpt.is_file():
        start, data_state, log.state = load_checkpoint(ckpt, model, opt, coto, config=config)
        data.set_state(data_state)
        if rank == 0:
            print(f"resuming {log.name} from step {start}", flush=True)
    elif rank == 0:
        for f in ("ckpt.pt", "result.json"):
            (Path(folder) / f).unlink(missing_ok=True)  # a fresh run: nothing of an earlier one stays
    if rank == 0:
        truncate_jsonl(Path(folder) / "metrics.jsonl", start)  # drop what the checkpoint does not cover
    log.restart_clock()
    return start


def write_results(results: dict, cfg, plot) -> str:
    """out_dir/results.json (every number and the config) and, with cfg.plot, the job's figure
    plot(results, cfg, path) as out_dir/results.png; returns "<json> and <png>", what was written."""
    written = [Path(cfg.out_dir) / "results.json"]
    atomic_write_text(written[0], json.dumps({**results, "config": dataclasses.asdict(cfg)}, indent=1))
    if cfg.plot:
        written.append(Path(cfg.out_dir) / "results.png")
        plot(results, cfg, written[-1])
    return " and ".join(map(str, written))


def save_result(folder, metrics: dict, config: dict) -> None:
    """result.json: the metrics and the run's whole configuration (without --resume, so a resumed
    run's file is the same). It marks the run finished, so its checkpoint goes."""
    config = {k: v for k, v in config.items() if k != "resume"}
    atomic_write_text(Path(folder) / "result.json", json.dumps({**metrics, "config": config}, indent=1))
    (Path(folder) / "ckpt.pt").unlink(missing_ok=True)


def finished_run(folder, config: dict, not_in_result=()):
    """The result.json of the run in `folder` if it finished with `config` (`not_in_result` aside), None
    if unfinished; a run finished with another configuration is a ValueError listing the differences."""
    path = Path(folder) / "result.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
        saved = {k: v for k, v in result["config"].items() if k not in not_in_result}
    except (ValueError, KeyError, AttributeError):
        raise ValueError(f"{path} is damaged; delete it (or run without --resume) to train this run again") from None
    diff = config_diff(saved, config)
    if diff:
        raise ValueError(f"{folder} holds a run finished with another configuration ({'; '.join(diff)}). Rerun with "
                         "its flags, without --resume to overwrite it, or with another --out-dir")
    return result


def seed_runs(cfg, names: list) -> list:
    """(name, config) of every fine-tuning run of main(): each task (or domain) x seed (cfg.seed ..
    cfg.seed + cfg.seeds - 1) x setting of cfg.coto (both with cfg.compare, plain LoRA first)."""
    settings = sorted({cfg.coto, not cfg.coto} if cfg.compare else {cfg.coto})
    return [(name, dataclasses.replace(cfg, coto=coto, seed=seed)) for name in names
            for seed in range(cfg.seed, cfg.seed + cfg.seeds) for coto in settings]


def skip_finished(result, folder, name: str, say=print) -> bool:
    """True when --resume keeps the finished run in `folder` (`result`, from finished_run); says so, and
    says when a finished run is trained again."""
    if result:
        say(f"skipping {name}: finished ({folder})")
        return True
    if (Path(folder) / "result.json").is_file():
        say(f"overwriting {name}, which had finished ({folder}); --resume keeps finished runs")
    return False


def seed_table(title: str, runs: list, key: str, baseline: dict, baseline_name: str, value,
               fmt: str = "{:.1f}") -> str:
    """`title` and the seeds, then a markdown table of value(run) per row (run[key]: a task or domain)
    and method: the mean over seeds, ± the standard deviation (n - 1) with several seeds; beside them
    the `baseline` ({row: value}) and, with two methods, the second minus the first, seed by seed.
    The last row averages the rows, seed by seed."""
    seeds = sorted({r["seed"] for r in runs})
    title += f", seed {seeds[0]}" if len(seeds) == 1 else f", seeds {', '.join(map(str, seeds))}: mean ± std"
    baseline = {**baseline, "mean": statistics.fmean(baseline.values())}
    values = seed_values(runs, key, value, list(baseline))
    methods = list(values)

    def cell(v):
        return fmt.format(statistics.fmean(v)) + (f" ± {fmt.format(statistics.stdev(v))}" if len(v) > 1 else "")

    head = [key, baseline_name, *methods] + ([f"{methods[1]} - {methods[0]} per seed"] if len(methods) == 2 else [])
    lines = [title, "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for i, row in enumerate(baseline):
        cells = [row, fmt.format(baseline[row]), *(cell(values[m][i]) for m in methods)]
        if len(methods) == 2:
            cells.append(" ".join(fmt.format(b - a) for a, b in zip(values[methods[0]][i], values[methods[1]][i])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_values(runs: list, key: str, value, rows: list) -> dict:
    """{method: [[value(run) of each seed] per row]}, a row being a task or domain (run[key]) or "mean",
    where each seed's value is averaged over every row."""
    seeds = sorted({r["seed"] for r in runs})
    return {m: [[statistics.fmean(value(r) for r in runs if r["method"] == m and r["seed"] == s
                                  and row in ("mean", r[key])) for s in seeds] for row in rows]
            for m in dict.fromkeys(r["method"] for r in runs)}


def seed_bars(ax, rows: list, values: dict, fmt: str) -> tuple:
    """Grouped bars on a matplotlib axis, a group per row and a bar per name of `values` ({name: [[value
    of each seed] per row]}, the first a baseline, in grey): the mean over seeds, with one standard
    deviation (n - 1) as error bars for names with several seeds and the mean written above the error
    bar. Returns ({name: [mean per row]}, {name: [std per row]}, lowest mean - std, highest mean + std)."""
    means = {name: [statistics.fmean(x) for x in v] for name, v in values.items()}
    err = {name: [statistics.stdev(x) if len(x) > 1 else 0.0 for x in v] for name, v in values.items()}
    width = 0.8 / len(values)
    for j, name in enumerate(values):
        x = [i + (j - (len(values) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(x, means[name], width, yerr=err[name] if len(values[name][0]) > 1 else None, capsize=3,
               color=f"C{j - 1}" if j else "0.7", label=name)
        for xi, v, e in zip(x, means[name], err[name]):  # above the error bar, not across it
            ax.annotate(fmt.format(v), (xi, v + e), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
    ax.set_xticks(range(len(rows)), rows)
    ends = [(a - e, a + e) for name in means for a, e in zip(means[name], err[name])]
    return means, err, min(low for low, _ in ends), max(high for _, high in ends)


def print_speed(runs: list) -> None:
    """Per method: steady-state ms per step, compile / warm-up time apart (TrainLog.summary), and the
    fraction of block-steps whose adapters were on."""
    for m in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == m]
        print(f"{m}: {statistics.fmean(r['ms_per_step'] for r in rs):.0f} ms/step (steady state) + "
              f"{statistics.fmean(r.get('warmup_s', 0.0) for r in rs):.1f} s compile / warm-up, adapters active "
              f"{100 * statistics.fmean(r['active_frac'] for r in rs):.1f}% of block-steps")
