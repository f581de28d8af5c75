"""GPT-2's byte-level BPE tokenizer, written by hand from `vocab.json` + `merges.txt`.

As in OpenAI's encoder.py (Radford et al., 2019, section 2.2):
1. split the text into words with GPT-2's regex (contractions, letters, digits, other symbols,
   whitespace; a word keeps its leading space),
2. map every UTF-8 byte of a word to a printable unicode character (bytes_to_unicode), so any
   string is covered and nothing is ever unknown,
3. merge adjacent symbols, always the pair with the lowest rank in merges.txt first,
4. look the resulting symbols up in vocab.json.

GPT-2's regex uses \\p{L} (letters) and \\p{N} (numbers), which Python's `re` lacks; the two
classes are built here from `unicodedata` instead, so no third-party `regex` module is needed.
Special tokens such as "<|endoftext|>" are not parsed out of the text: add their id yourself
(`tok.encoder["<|endoftext|>"]`).

    tok = BPETokenizer.from_folder("gpt2/")   # vocab.json + merges.txt
    ids = tok.encode("Hello world")           # [15496, 995] with GPT-2's files
    tok.decode(ids)                           # "Hello world"
"""
import functools
import json
import re
import sys
import unicodedata
from pathlib import Path


def bytes_to_unicode() -> dict:
    """{byte: printable character}: printable bytes map to themselves, the others to 256 + n."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def _char_class(categories: str) -> str:
    """The ranges of every code point whose unicode category starts with one of `categories`,
    as the inside of a regex [...] class (e.g. "L" -> what \\p{L} means)."""
    ranges, start = [], None
    for cp in range(sys.maxunicode + 2):
        inside = cp <= sys.maxunicode and unicodedata.category(chr(cp))[0] in categories
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            ranges.append(f"{re.escape(chr(start))}-{re.escape(chr(cp - 1))}")
            start = None
    return "".join(ranges)


@functools.cache
def gpt2_pattern() -> re.Pattern:
    """GPT-2's pre-tokenizer regex with \\p{L} and \\p{N} spelled out (built once, ~1 s)."""
    L, N = _char_class("L"), _char_class("N")
    return re.compile(rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^\s{L}{N}]+|\s+(?!\S)|\s+""")


class BPETokenizer:
    def __init__(self, encoder: dict, merges: list):
        """encoder: {token string: id} (vocab.json); merges: [(a, b), ...] in priority order."""
        self.encoder = encoder
        self.decoder = {i: s for s, i in encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache = {}  # word -> its symbols; words repeat a lot in real text

    @classmethod
    def from_folder(cls, folder) -> "BPETokenizer":
        folder = Path(folder)
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        for f in (vocab, merges):
            if not f.is_file():
                raise FileNotFoundError(f"{folder} has no {f.name}: a GPT-2 tokenizer needs vocab.json "
                                        f"and merges.txt (both come with every GPT-2 checkpoint)")
        lines = merges.read_text(encoding="utf-8").split("\n")
        pairs = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        try:
            encoder = json.loads(vocab.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{vocab} is not JSON ({e}): damaged? Copy the model's vocab.json again") from None
        return cls(encoder, pairs)

    def bpe(self, word: str) -> list:
        """Merge the symbols of one byte-mapped word, lowest-ranked pair first."""
        if word in self.cache:
            return self.cache[word]
        symbols = list(word)
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of `best`, left to right
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self.cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list:
        ids = []
        for word in gpt2_pattern().findall(text):
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(mapped))
        return ids

    def decode(self, ids) -> str:
        mapped = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in mapped).decode("utf-8", errors="replace")
