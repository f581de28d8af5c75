"""Small helpers shared by the scripts: the command line, device choice, atomic checkpoints, weight files.

safetensors is read and written by hand (the format is an 8-byte little-endian header length, a
JSON header of {name: {dtype, shape, data_offsets}}, then the raw bytes), so loading a
checkpoint needs nothing beyond torch.
"""
import argparse
import dataclasses
import glob
import inspect
import io
import json
import math
import os
import struct
import tempfile
import textwrap
import tokenize
import warnings
from pathlib import Path

import torch

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn, "C64": torch.complex64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def parse_config(cls, argv=None, description: str = ""):
    """A `cls` (a dataclass) from the command line: one --flag per field, --flag / --no-flag for
    booleans, several values for tuples; --help shows each field's comment and default. A value
    the dataclass refuses (its __post_init__ raising ValueError or TypeError) is argparse's one-line
    error, like a value of the wrong type. `main(parse_config(Config))` is how every script starts."""
    parser = argparse.ArgumentParser(description=description, usage="%(prog)s [--flag value ...]",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     allow_abbrev=False)  # --seed must not quietly mean --seeds
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        # argparse %-formats help texts; the formatter appends "(default: ...)", quoted for strings
        help = comments.get(f.name, f.name.replace("_", " ")).replace("%", "%%")
        help += " (default: %(default)r)" if isinstance(default, str) else ""
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)
        elif isinstance(default, tuple):
            kind = type(default[0]) if default else str
            parser.add_argument(flag, nargs="*", type=kind, default=default, help=help)
        else:
            kind = f.type if isinstance(f.type, type) else type(default)
            parser.add_argument(flag, type=kind, default=default, help=help)
    args = vars(parser.parse_args(argv))
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    except (ValueError, TypeError) as e:
        parser.error(str(e))


def _field_comments(cls) -> dict:
    """{field: comment} from the `# ...` on each field's line(s) in the dataclass source; {} where
    the source is not available."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    by_row, spans, line = {}, {}, []  # comment per source row; (first, last) row of each field
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            by_row[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type == tokenize.NEWLINE:  # the end of a statement: `name: type = default`?
            if len(line) > 1 and line[0].string in names and line[1].string == ":":
                spans.setdefault(line[0].string, (line[0].start[0], tok.start[0]))
            line = []
        elif tok.type not in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
            line.append(tok)
    comments = {name: " ".join(by_row[row] for row in range(first, last + 1) if row in by_row)
                for name, (first, last) in spans.items()}
    return {name: text for name, text in comments.items() if text}


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu; anything else is passed to torch.device."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _atomic_write(path, write) -> None:
    """Write to a temporary file in the target folder, then rename: a crash never leaves half a file.
    The file gets the user's normal permissions (0666 minus the umask, as open() gives), not
    mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(glob.escape(path.name) + ".*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def atomic_save(obj, path) -> None:
    """torch.save(obj, path), atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text: str) -> None:
    """Path(path).write_text(text), atomically (result files mark finished runs for --resume)."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def save_checkpoint(path, model, opt, step: int, data_state, coto=None, *, config: dict,
                    extra: dict | None = None) -> None:
    """Everything a resumed run needs to continue exactly where it stopped, written atomically: the
    trainable weights, AdamW's moments, the step (the LR schedule and CoTo's p are functions of it),
    the data order's state, CoTo's generator, the RNG states, the run's `config` (a JSON-able dict of
    every field that affects the result; load_checkpoint refuses another) and the trainer's `extra`
    state (history, timings: JSON-able values and tensors)."""
    atomic_save({"step": step,
                 "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                 "optimizer": opt.state_dict(), "data": data_state,
                 "coto": coto.state_dict() if coto is not None else None,
                 "rng": {"cpu": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                 "config": _jsonable(config), "extra": extra if extra is not None else {}},
                path)


_CHECKPOINT_KEYS = {"step", "trainable", "optimizer", "data", "coto", "rng", "config", "extra"}


def _jsonable(config: dict) -> dict:
    """config as JSON sees it (tuples become lists), so a saved and a rebuilt config compare equal."""
    return json.loads(json.dumps(config))


def load_checkpoint(path, model, opt, coto=None, *, config: dict):
    """Restore what save_checkpoint wrote into model, opt and coto; returns (step, data_state, extra).
    A damaged file, or one written by a run with another configuration, is a ValueError that says
    what to do, raised before the model is touched."""
    fix = f"delete {path} (or run without --resume) to start this run afresh"
    ck = _torch_load(path, fix)
    if not isinstance(ck, dict) or set(ck) != _CHECKPOINT_KEYS or not isinstance(ck["config"], dict):
        raise ValueError(f"{path} is not a checkpoint written by save_checkpoint; {fix}")
    saved, now = ck["config"], _jsonable(config)
    diff = [f"{k}: {saved.get(k, '(absent)')!r} in the checkpoint, {now.get(k, '(absent)')!r} now"
            for k in sorted(saved.keys() | now.keys())
            if k not in saved or k not in now or saved[k] != now[k]]
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
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
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
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        return state
    raise ValueError(f"cannot read {path}: expected a .safetensors, .pt, .pth or .bin file")


def append_jsonl(path, record: dict) -> None:
    """Append one JSON line (metrics logs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
