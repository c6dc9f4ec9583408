"""Type text and see how tokenizers cut it: tokens with their byte spans, and the language premium."""

from __future__ import annotations

import html
from pathlib import Path

import ipywidgets as widgets
import plotly.graph_objects as go

from ..analyses.tokenizer_fairness import fairness_table, parallel_counts
from ..corpus import parallel_corpus
from ..plots.export import export_figure
from ..plots.tokenizers import OKABE_ITO
from .base import Explorer, Work, row, show_figure

_SHADES = ["#dbeaf7", "#fbe6c2", "#d5efe5", "#f3dcea"]  # light Okabe-Ito tints, alternating per token
CUSTOM = "(your own text)"


def token_spans(tokenizer, text: str) -> list[dict]:
    """The tokens of ``text`` (no special tokens) with their ids, the bytes each adds, and byte spans.

    Bytes come from the vocabulary (:func:`workbench.tokenization.vocab_bytes.vocab_bytes`), so a token
    holding part of a multi-byte character shows exactly the bytes it holds; tokenizers that cannot be
    read as bytes fall back to their character offsets."""
    from ..tokenization.vocab_bytes import UnsupportedTokenizerError, vocab_bytes

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    try:
        vocab = vocab_bytes(tokenizer)
        pieces = [vocab.token_bytes[t] or b"" for t in ids]
    except UnsupportedTokenizerError:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        pieces = [text[a:b].encode("utf-8") for a, b in offsets]
    out, start = [], 0
    for t, piece in zip(ids, pieces):
        out.append({"id": int(t), "bytes": piece, "start": start, "end": start + len(piece),
                    "text": piece.decode("utf-8", errors="backslashreplace")})
        start += len(piece)
    return out


class TokenizerExplorer(Explorer):
    """A text box, a tokenizer selector and a language selector (the UDHR's Article 1 in 49 languages).

    Shows the tokens of the text with their ids and byte spans (hover a token), the counts (tokens,
    bytes, characters, bytes per token), and the premium of the selected language over all 30
    articles for the selected tokenizer, highlighted among every language's in a bar chart.
    Redraws are instant: tokenising is fast and each tokenizer's premiums are computed once.

    ``tokenizers``: ``{name: Hugging Face tokenizer}`` (e.g. ``{n: wb.load_tokenizer(n) for n in
    ("smollm2-135m", "gemma3-270m")}``) or one tokenizer.
    """

    def __init__(self, tokenizers, language: str = "eng", text: str | None = None):
        if not isinstance(tokenizers, dict):
            tokenizers = {getattr(tokenizers, "name_or_path", "tokenizer") or "tokenizer": tokenizers}
        if not tokenizers:
            raise ValueError("TokenizerExplorer needs a tokenizer: TokenizerExplorer({'smollm2-135m': wb.load_tokenizer()}).")
        self.tokenizers = dict(tokenizers)
        self.corpus = parallel_corpus()
        if language not in self.corpus:
            raise ValueError(f"no parallel text for {language!r}; choose one of {', '.join(self.corpus)}.")
        self._tables: dict = {}
        self.tokenizer = widgets.Dropdown(options=list(self.tokenizers), description="tokenizer")
        options = [(f"{r['name']} ({c}, {r['script']})", c) for c, r in self.corpus.items()] + [(CUSTOM, CUSTOM)]
        self.language = widgets.Dropdown(options=options, value=language if text is None else CUSTOM,
                                         description="language", layout=widgets.Layout(width="min(420px, 100%)"))
        self.text = widgets.Textarea(value=text if text is not None else self._article(language), description="text",
                                     continuous_update=False, layout=widgets.Layout(width="100%", height="5em"))
        self.counts = widgets.HTML()
        self.tokens = widgets.HTML(layout=widgets.Layout(width="100%"))
        self.bars = go.FigureWidget()
        self.tokenizer.observe(self.update, names="value")
        self.language.observe(self._language_changed, names="value")
        self.text.observe(self.update, names="value")
        self.view = widgets.VBox([
            row(self.tokenizer, self.language),
            self.text, self._start_work(), self.counts, self.tokens, self.bars,
            self._export_controls("tokenizer_premium"),
        ], layout=widgets.Layout(width="100%", max_width="1100px"))
        self.update()

    def _article(self, language: str) -> str:
        return self.corpus[language]["articles"][0]

    def table(self, name: str):
        """The fairness table (all 49 languages, 30 articles) of one tokenizer, computed once."""
        if name not in self._tables:
            texts = {c: r["articles"] for c, r in self.corpus.items()}
            self._tables[name] = fairness_table(parallel_counts({name: self.tokenizers[name]}, texts)).isel(tokenizer=0)
        return self._tables[name]

    def pending_work(self) -> Work | None:
        name = self.tokenizer.value
        if name in self._tables:
            return None
        return Work(f"counting {name}'s tokens for 30 articles in {len(self.corpus)} languages", lambda: self.table(name))

    def _language_changed(self, change) -> None:
        if change["new"] != CUSTOM:
            with self.text.hold_trait_notifications():
                self.text.value = self._article(change["new"])
        self.update()

    # ---------------------------------------------------------------- drawing

    def token_html(self) -> str:
        spans = token_spans(self.tokenizers[self.tokenizer.value], self.text.value)
        cells = []
        for i, s in enumerate(spans):
            shown = html.escape(s["text"]).replace("\n", "↵<br>").replace(" ", "&nbsp;") or "∅"
            tip = f"token {i}: id {s['id']}, bytes {s['start']}-{s['end']} ({len(s['bytes'])} B: {s['bytes'].hex(' ')})"
            cells.append(f"<span title='{html.escape(tip)}' style='background:{_SHADES[i % len(_SHADES)]};"
                         f"border-right:1px solid #888;padding:1px 0;font-family:monospace;font-size:13px'>{shown}</span>")
        return "<div style='line-height:1.9;word-break:break-all;max-width:100%'>" + "".join(cells) + "</div>"

    def figure(self) -> go.Figure:
        name, lang = self.tokenizer.value, self.language.value
        premium = self.table(name).premium.to_series().sort_values()
        colors = [OKABE_ITO[5] if c == lang else OKABE_ITO[0] for c in premium.index]
        fig = go.Figure(go.Bar(x=list(premium.index), y=premium.values, marker_color=colors,
                               hovertemplate="%{x}: %{y:.2f}x the English tokens<extra></extra>"))
        fig.update_layout(title=f"{name}: tokens for the same 30 articles, relative to English", height=300,
                          margin=dict(l=50, r=10, t=40, b=60), template="simple_white", autosize=True)
        fig.update_yaxes(type="log", title_text="premium (log)")
        fig.update_xaxes(tickangle=-90, tickfont_size=9)
        return fig

    def draw(self) -> None:
        name, lang = self.tokenizer.value, self.language.value
        text = self.text.value
        n_tokens = len(token_spans(self.tokenizers[name], text)) if text else 0
        n_bytes, n_chars = len(text.encode("utf-8")), len(text)
        line = (f"<b>{n_tokens}</b> tokens, {n_bytes} bytes, {n_chars} characters; "
                f"{n_bytes / max(n_tokens, 1):.2f} bytes and {n_chars / max(n_tokens, 1):.2f} characters per token")
        if lang != CUSTOM:
            p = float(self.table(name).premium.sel(language=lang))
            line += f". <b>{self.corpus[lang]['name']}</b> needs <b>{p:.2f}x</b> the tokens of English for the 30 UDHR articles"
        else:
            eng = self.table(name)
            line += f" (English UDHR with this tokenizer: {float(eng.bytes_per_token.sel(language='eng')):.2f} bytes per token)"
        self.counts.value = line
        self.tokens.value = self.token_html()
        show_figure(self.bars, self.figure())

    def export(self, path_stem: str | Path, formats=("svg", "pdf", "png")) -> list[Path]:
        """Write the premium bars as shown (selected language highlighted), publication theme."""
        self.wait()
        return export_figure(self.figure(), Path(path_stem), formats=formats, columns="two", height=260)
