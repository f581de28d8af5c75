"""RESULTS.md, written from the small JSON summaries in results/: every table a script printed, under
the command, commit and date that made it, with the notes that read it.

    python -m lab.results          # rewrite RESULTS.md from results/*.json
    OMP_NUM_THREADS=1 python train_vit.py | tee vit.txt
    python -m lab.results --add vit --command "OMP_NUM_THREADS=1 python train_vit.py" < vit.txt

A summary, results/<name>.json: {"title", "command" (as typed today), "command_as_run" (optional:
how it was spelled when it ran), "commit", "date", "machine", "notes": [markdown paragraphs],
"tables": [{"caption", "text": [...], "header": [...], "rows": [[...]], "notes": [...]}]}.
--add reads a script's output on standard input and keeps its markdown tables: a table's caption is
the last line printed above it (the last heading, in a markdown file such as reproduce's table.md),
its notes the lines printed right under it; log lines elsewhere are dropped.
"""
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# The sections in reading order; a summary not named here comes after them, by name.
ORDER = ("toy", "vit", "vit-4-seeds", "reproduce", "reproduce-6-seeds", "reproduce-heads", "gpt2", "bench")
KEYS = ("title", "command", "commit", "date", "machine", "notes", "tables")
HEADING = re.compile(r"#{1,6} ")
SEPARATOR = re.compile(r"\|?(\s*:?-{3,}:?\s*\|)+\s*(:?-{3,}:?)?\s*")


@dataclass
class Config:
    add: str = ""  # record results/<ADD>.json from a script's output piped in (its markdown tables), then rewrite --out
    command: str = ""  # with --add: the command that printed the output, as a user types it (thread setting included)
    title: str = ""  # with --add: the section's title; empty: the title results/<ADD>.json already has
    machine: str = ""  # with --add: where it ran; empty: this machine's CPU model, cores, OS and torch version
    commit: str = ""  # with --add: the commit that ran; empty: git rev-parse --short HEAD, '+changes' if code differs
    date: str = ""  # with --add: the day it ran, YYYY-MM-DD; empty: today (UTC)
    results: str = "results"  # the folder of JSON summaries
    out: str = "RESULTS.md"  # the markdown file written from them
    check: bool = False  # write nothing; exit 1 if --out differs from what the summaries give (CI)

    def __post_init__(self):
        if self.add and not re.fullmatch(r"[a-z0-9][a-z0-9-]*", self.add):
            raise ValueError(f"--add {self.add!r}: a name of lowercase letters, digits and '-' (it names results/<ADD>.json)")
        if self.add and not self.command.strip():
            raise ValueError("--add needs --command: the command that printed the output")
        if (self.command or self.title or self.machine or self.commit or self.date) and not self.add:
            raise ValueError("--command, --title, --machine, --commit and --date describe an --add")
        if self.date and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.date):
            raise ValueError(f"--date {self.date!r}: write it as YYYY-MM-DD")
        if self.add and self.check:
            raise ValueError("--check writes nothing; it cannot --add")


def cells(line: str) -> list:
    """'| a |  | c |' -> ['a', '', 'c']: one space of padding off each side, the rest kept."""
    parts = line.strip()[1:].split("|")
    parts = parts[:-1] if line.strip().endswith("|") else parts
    return [(p[1:] if p.startswith(" ") else p).rstrip() for p in parts]


def parse(text: str) -> list:
    """The markdown tables in a script's output, each with its caption and the lines printed under it."""
    lines = [line.rstrip() for line in text.splitlines()]
    spans, i = [], 0  # [start, end) of each table: '|' lines whose second line is |---|
    while i < len(lines):
        j = i
        while j < len(lines) and lines[j].lstrip().startswith("|"):
            j += 1
        if j - i >= 2 and SEPARATOR.fullmatch(lines[i + 1].strip()):
            spans.append((i, j))
        i = max(j, i + 1)
    tables, prev = [], 0
    for start, end in spans:
        seg = lines[prev:start]
        if tables:  # the lines printed right under the previous table are its notes
            k = next((k for k, line in enumerate(seg) if not line.strip()), len(seg))
            tables[-1]["notes"] += [line.strip() for line in seg[:k]]
            seg = seg[k:]
        heads = [k for k, line in enumerate(seg) if HEADING.match(line)]
        text = []
        if heads:  # a markdown file: every paragraph is kept, the last heading is the caption
            h = heads[-1]
            caption = seg[h].lstrip("#").strip()
            above = [line.strip() for line in seg[:h] if line.strip() and not HEADING.match(line)]
            if tables:
                tables[-1]["notes"] += above
            else:
                text += above
            text += [line.strip() for line in seg[h + 1:] if line.strip()]
        else:  # a script's log: the line right above the table is its caption, the rest is dropped
            caption = next((line.strip() for line in reversed(seg) if line.strip()), "")
        rows = [cells(line) for line in lines[start + 2:end]]
        tables.append({"caption": caption, "text": text, "header": cells(lines[start]), "rows": rows, "notes": []})
        prev = end
    if tables:
        tail = lines[prev:]
        k = next((k for k, line in enumerate(tail) if not line.strip()), len(tail))
        tables[-1]["notes"] += [line.strip() for line in tail[:k]]
    return tables


def check_summary(s: dict, name: str) -> None:
    """A summary that would render a wrong table is an error naming the file and the fix."""
    missing = [k for k in KEYS if k not in s]
    if missing:
        raise ValueError(f"results/{name}.json lacks {', '.join(missing)}")
    for t in s["tables"]:
        bad = [r for r in t["rows"] if len(r) != len(t["header"])]
        if bad:
            raise ValueError(f"results/{name}.json, table {t['caption']!r}: a row of {len(bad[0])} cells under "
                             f"{len(t['header'])} columns: {bad[0]}")


def load(folder: Path) -> list:
    """[(name, summary)] in ORDER, then the others by name."""
    named = {p.stem: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))}
    for name, s in named.items():
        check_summary(s, name)
    order = [n for n in ORDER if n in named] + sorted(n for n in named if n not in ORDER)
    return [(n, named[n]) for n in order]


def row(cells: list) -> str:
    return "| " + " | ".join(cells) + " |"


def render(summaries: list) -> str:
    """The whole RESULTS.md: a contents list, then per summary its title, provenance, notes and tables."""
    out = ["# Results", "",
           "<!-- Written by `python -m lab.results` from results/*.json: edit those, not this file. -->", "",
           "Every table below is what the command of its section printed, at the commit and on the date "
           "the section names (a note says where cells were gathered by hand); the notes read those numbers. `python -m lab.results` writes this "
           "file from the summaries in `results/`, and `python -m lab.results --add NAME --command \"...\" "
           "< output.txt` records a script's printed tables as a new summary. Another CPU or thread count "
           "moves the digits (by up to 2.2 points in the main job's cells on an AVX-512 Xeon; see the README); "
           "reruns on one machine are bit-identical.", ""]
    out += [f"- [{s['title']}](#{name})" for name, s in summaries] + [""]
    for name, s in summaries:
        ran = f" (run as `{s['command_as_run']}`)" if s.get("command_as_run") else ""
        out += [f'<a id="{name}"></a>', "", f"## {s['title']}", "",
                f"Made by `{s['command']}`{ran} at commit `{s['commit']}` on {s['date']}; {s['machine']}.", ""]
        out += [line for note in s["notes"] for line in (note, "")]
        for t in s["tables"]:
            out += [f"### {t['caption']}", ""] if t["caption"] else []
            out += [line for note in t.get("text", []) for line in (note, "")]
            out += [row(t["header"]), "|" + "---|" * len(t["header"]), *map(row, t["rows"]), ""]
            out += [line for note in t.get("notes", []) for line in (note, "")]
    return "\n".join(out).rstrip() + "\n"


def this_machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M).group(1)
    except (OSError, AttributeError):
        pass  # not Linux: platform's name
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}, torch {metadata.version('torch')}"


def this_commit() -> str:
    """HEAD, marked '+changes' when tracked files other than the results differ from it."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, check=True).stdout.strip()
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!results", ":!RESULTS.md")
    return git("rev-parse", "--short", "HEAD") + ("+changes" if changed else "")


def add(cfg: Config, text: str) -> Path:
    """results/<add>.json from a script's printed output; an existing summary keeps its title and notes."""
    tables = parse(text)
    if not tables:
        raise ValueError("no markdown table (a '| ... |' line, then '|---|...') in the output on standard input")
    path = Path(cfg.results) / f"{cfg.add}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    title = cfg.title or old.get("title")
    if not title:
        raise ValueError(f"--add {cfg.add}: a new summary needs --title")
    summary = {"title": title, "command": cfg.command.strip(), "commit": cfg.commit or this_commit(),
               "date": cfg.date or datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
               "machine": cfg.machine or this_machine(), "notes": old.get("notes", []), "tables": tables}
    if summary["notes"]:
        print(f"kept the {len(summary['notes'])} notes of {path}: read them against the new numbers", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return path


def main(cfg: Config) -> None:
    if cfg.add:
        if sys.stdin.isatty():
            raise SystemExit(f"pipe the script's output in: python -m lab.results --add {cfg.add} --command ... < output.txt")
        try:
            print(f"wrote {add(cfg, sys.stdin.read())}")
        except ValueError as e:
            raise SystemExit(f"lab.results: error: {e}") from None
    text = render(load(Path(cfg.results)))
    out = Path(cfg.out)
    if cfg.check:
        if not out.exists() or out.read_text() != text:
            raise SystemExit(f"{out} differs from what {cfg.results}/*.json give: run python -m lab.results")
        print(f"{out} matches {cfg.results}/*.json")
        return
    out.write_text(text)
    print(f"wrote {out} from {cfg.results}/*.json")


if __name__ == "__main__":
    from train_toy import parse_args  # here, not above: building RESULTS.md needs neither torch nor the classroom
    main(parse_args(Config, __doc__.split("\n\n")[0],
                    'python -m lab.results --add toy --command "OMP_NUM_THREADS=1 python train_toy.py" < toy.txt'))
