"""Small helpers shared by the training scripts: device choice, atomic checkpoints, weight files.

safetensors is read and written by hand (the format is an 8-byte little-endian header length, a
JSON header of {name: {dtype, shape, data_offsets}}, then the raw bytes), so loading a
checkpoint needs nothing beyond torch.
"""
import argparse
import dataclasses
import json
import os
import struct
import tempfile
from pathlib import Path

import torch

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def parse_config(cls, argv=None, description: str = ""):
    """A `cls` (a dataclass) from the command line: one --flag per field, --flag / --no-flag for
    booleans, several values for tuples. `main(parse_config(Config))` is how every script starts."""
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, nargs="+", type=type(f.default[0]), default=f.default)
        else:
            kind = f.type if isinstance(f.type, type) else type(f.default)
            parser.add_argument(flag, type=kind, default=f.default)
    args = vars(parser.parse_args(argv))
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})


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
    """Write to a temporary file in the target folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
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


def save_checkpoint(path, model, opt, step: int, data_state, coto=None) -> None:
    """Everything a resumed run needs to continue exactly where it stopped, written atomically: the
    trainable weights, AdamW's moments, the step (the LR schedule and CoTo's p are functions of it),
    the data order's state, CoTo's generator and the RNG states."""
    atomic_save({"step": step,
                 "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                 "optimizer": opt.state_dict(), "data": data_state,
                 "coto": coto.state_dict() if coto is not None else None,
                 "rng": {"cpu": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
                path)


def load_checkpoint(path, model, opt, coto=None):
    """Restore what save_checkpoint wrote into model, opt and coto; returns (step, data_state)."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in ck["trainable"].items():
            if n not in params or params[n].shape != t.shape:
                raise ValueError(f"checkpoint {path} does not fit this run ({n}: {tuple(t.shape)} in "
                                 f"the file); delete it or drop --resume")
            params[n].copy_(t)
    opt.load_state_dict(ck["optimizer"])
    if coto is not None:
        coto.load_state_dict(ck["coto"])
    torch.set_rng_state(ck["rng"]["cpu"])
    if ck["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    return ck["step"], ck["data"]


def write_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write {name: tensor} as a .safetensors file (atomically)."""
    header, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to a multiple of 8 bytes

    def write(f):
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in chunks:
            f.write(raw)

    _atomic_write(path, write)


def read_safetensors(path) -> dict:
    """Read a .safetensors file into {name: tensor} on the CPU."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path} is not a safetensors file (only {len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({e})") from None
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        flat = torch.frombuffer(bytearray(body[start:end]), dtype=torch.uint8) if end > start \
            else torch.empty(0, dtype=torch.uint8)
        out[name] = flat.view(dtype).reshape(info["shape"])
    return out


def load_weights(path) -> dict:
    """A state dict from a local .safetensors, .pt, .pth or .bin file (tensors only, no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
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
