"""Which tokens a Train-Attention model would weight, as in the paper's figure (``ckl weights``).

Each token is painted white -> red by its weight in the terminal (24-bit ANSI backgrounds) or in a
self-contained HTML page. The weight of token t is the TA model's output at position t (training uses
``w[:, 1:]``: the first token is never a target), so the first token is shown greyed: its output is not
a weight that training ever uses.

torch and transformers are imported inside the functions that need them: ``ckl --help`` stays fast.
"""

from __future__ import annotations

import html
import math
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from ckl_toolkit.core.io import JsonlError, parse_json_object

TokenWeights = list[tuple[str, float]]

RED = (220, 38, 38)  # weight 1; weight 0 is white
GREY_BG, GREY_FG = (225, 225, 225), (120, 120, 120)  # the first token: no target weight
DARK_TEXT_ABOVE = 0.65  # intensity above which white text reads better than black
SCALES = ("raw", "minmax")
TOP_K = 10
NEAR_FLAT = 0.05  # target weights within this span: colours cannot tell the tokens apart
RESET = "\x1b[0m"


class InputError(ValueError):
    """A document file or TA directory that cannot be shown; the message names the path (and line)."""


# ----------------------------------------------------------------------------- weights


def _pieces(tokenizer, text: str, ids: list[int], offsets: list[tuple[int, int]]) -> list[str]:
    """The display string of every token, so that the pieces concatenate back to the text.

    A token shows the text from the previous token's end to its own end: spaces that a tokenizer
    trims from offsets stay visible. Special tokens (empty span) show their name, e.g. ``<bos>``;
    a second byte-token of one character shows nothing (the first one shows the character).
    """
    special = set(tokenizer.all_special_ids)
    pieces, prev_end = [], 0
    for tid, (start, end) in zip(ids, offsets):
        if end <= start and tid in special:
            pieces.append(tokenizer.convert_ids_to_tokens(tid))
            continue
        pieces.append(text[prev_end:end] if end > prev_end else "")
        prev_end = max(prev_end, end)
    return pieces


def token_weights(
    ta, tokenizer, texts: Sequence[str], max_length: int = 1024, target=None
) -> list[TokenWeights]:
    """Every token of every text with the TA model's output at its position.

    Documents run one at a time, unpadded, so each value is exactly what ``ta(input_ids, mask)``
    gives for that document alone (no padding side or position-id subtleties). A TA model with the
    surprise feature also reads ``target``'s per-token loss on the same tokens, as in training.
    """
    import torch

    from ckl_toolkit.core.losses import token_nll
    from ckl_toolkit.core.text import encode

    ta.eval()
    device = next(ta.parameters()).device
    docs = []
    for text in texts:
        enc = encode(tokenizer, [text], max_length)
        input_ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)  # (1, T)
        with torch.no_grad():
            nll = token_nll(target, input_ids, mask) if ta.surprise else None  # (1, T-1)
            w = ta(input_ids, mask, None, nll)[0].float().cpu().tolist()
        pieces = _pieces(tokenizer, text, enc.input_ids[0].tolist(), enc.offsets[0])
        docs.append(list(zip(pieces, w)))
    return docs


def target_weights(doc: TokenWeights) -> list[float]:
    """The weights training uses: every token but the first."""
    return [w for _, w in doc[1:]]


def token_label(piece: str) -> str:
    """How a token is named in the top-k lists: trimmed, quoted if only spaces, explained if empty."""
    if not piece:
        return "(continuation byte)"
    return piece.strip() or repr(piece)


def mean_weight(doc: TokenWeights) -> float:
    weights = target_weights(doc)
    return sum(weights) / len(weights) if weights else math.nan


def top_tokens(doc: TokenWeights, k: int = TOP_K) -> list[tuple[int, str, float]]:
    """(position, token, weight) of the k highest-weighted target tokens, earliest first on ties."""
    ranked = sorted(range(1, len(doc)), key=lambda t: (-doc[t][1], t))[:k]
    return [(t, doc[t][0], doc[t][1]) for t in ranked]


def weight_range(doc: TokenWeights) -> tuple[float, float]:
    """(lowest, highest) target weight of a document (NaN, NaN without targets)."""
    weights = target_weights(doc)
    return (min(weights), max(weights)) if weights else (math.nan, math.nan)


def flatness_note(doc: TokenWeights, scale: str) -> str:
    """A warning when a document's weights sit in a narrow band (empty otherwise).

    raw: every token shows the same colour, which reads as "all tokens matter equally"; minmax: the
    stretch turns differences of a few thousandths into white-to-red, which reads as a sharp TA model.
    """
    lo, hi = weight_range(doc)
    if math.isnan(lo) or hi - lo >= NEAR_FLAT:
        return ""
    band = f"[{lo:.3f}, {hi:.3f}]"
    if scale == "raw":
        return (
            f"near-flat: every target weight in {band}, so all tokens look alike; --scale minmax stretches it"
        )
    return (
        f"near-flat: weights only span {band} ({hi - lo:.3f}); the min-max colours exaggerate the differences"
    )


def intensities(doc: TokenWeights, scale: str = "raw") -> list[float]:
    """Colour intensity in [0, 1] per token: the raw weight, or min-max stretched over the targets.

    ``minmax`` helps when a TA model's weights sit in a narrow band (every token looks equally red).
    """
    raw = [min(max(w, 0.0), 1.0) for _, w in doc]
    targets = raw[1:]
    if scale == "raw" or not targets:
        return raw
    lo, hi = min(targets), max(targets)
    span = hi - lo
    return [0.5 if span < 1e-12 else min(max((w - lo) / span, 0.0), 1.0) for w in raw]


def blend(intensity: float) -> tuple[int, int, int]:
    """White (0) to red (1)."""
    return tuple(round(255 + (c - 255) * intensity) for c in RED)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- terminal


def _printable(piece: str) -> str:
    """Control characters in a document must not drive the terminal (escape sequences, cursor moves):
    they are shown escaped; newlines and tabs stay, carriage returns of CRLF files are dropped."""
    return "".join(
        "" if c == "\r" else f"\\x{ord(c):02x}" if unicodedata.category(c) == "Cc" and c not in "\n\t" else c
        for c in piece
    )


def _ansi(piece: str, bg: tuple[int, int, int], fg: tuple[int, int, int]) -> str:
    """Colour a piece; the colour is reset before each newline so it does not bleed across lines."""
    start = f"\x1b[48;2;{bg[0]};{bg[1]};{bg[2]}m\x1b[38;2;{fg[0]};{fg[1]};{fg[2]}m"
    return "\n".join(start + part + RESET if part else "" for part in piece.split("\n"))


def _doc_header(i: int, title: str | None, doc: TokenWeights, scale: str = "raw") -> str:
    name = f"Document {i + 1}" + (f": {title}" if title else "")
    lo, hi = weight_range(doc)
    header = (
        f"── {name} ── {len(doc)} tokens; mean weight {mean_weight(doc):.3f} over "
        f"{max(len(doc) - 1, 0)} target tokens, range {lo:.3f}–{hi:.3f}"
    )
    note = flatness_note(doc, scale)
    return header + (f"\n   ! {note}" if note else "")


def _top_line(doc: TokenWeights, k: int) -> str:
    """One line per ~100 columns, never breaking inside a 'token weight' item."""
    lines, line = [], f"top-{k}:"
    for _, tok, w in top_tokens(doc, k):
        item = f"{_printable(token_label(tok))} {w:.3f}"
        if len(line) + len(item) + 3 > 100 and not line.endswith(":"):
            lines.append(line + " ·")
            line = " "
        line += f" {item}" if line.endswith((":", " ")) else f" · {item}"
    return "\n".join([*lines, line])


def _ansi_tokens(doc: TokenWeights, scale: str) -> str:
    out = []
    for t, ((piece, _), level) in enumerate(zip(doc, intensities(doc, scale))):
        text = _printable(piece)
        if t == 0:
            out.append(_ansi(text, GREY_BG, GREY_FG))
        else:
            fg = (255, 255, 255) if level > DARK_TEXT_ABOVE else (0, 0, 0)
            out.append(_ansi(text, blend(level), fg))
    return "".join(out)


def _plain_tokens(doc: TokenWeights) -> str:
    """``token[0.93]``; the first token shows ``[--]`` (no target weight)."""
    return "".join(
        f"{_printable(piece)}[--]" if t == 0 else f"{_printable(piece)}[{w:.2f}]"
        for t, (piece, w) in enumerate(doc)
    )


def _ansi_legend(color: bool, scale: str) -> str:
    if not color:
        return "legend: token[w] = Train-Attention weight; [--] = first token, no target weight"
    ramp = "".join(_ansi(" ", blend(i / 19), (0, 0, 0)) for i in range(20))
    first = _ansi(" first ", GREY_BG, GREY_FG)
    ends = (
        ("weight 0", "1")
        if scale == "raw"
        else ("each document's lowest weight", "its highest (header: range)")
    )
    return f"legend: {ends[0]} {ramp} {ends[1]} (white → red);  {first} = first token, no target weight"


def render_ansi(
    docs: Sequence[TokenWeights],
    titles: Sequence[str | None] | None = None,
    color: bool = True,
    scale: str = "raw",
    top_k: int = TOP_K,
) -> str:
    """Terminal rendering: per document a header with the mean weight, the painted tokens and the
    top-k tokens; a legend at the end."""
    titles = list(titles) if titles is not None else [None] * len(docs)
    blocks = []
    for i, doc in enumerate(docs):
        body = _ansi_tokens(doc, scale) if color else _plain_tokens(doc)
        blocks.append("\n".join([_doc_header(i, titles[i], doc, scale), body, _top_line(doc, top_k)]))
    return "\n\n".join([*blocks, _ansi_legend(color, scale)]) + "\n"


# ----------------------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 64em;
       color: #111; padding: 0 1em; }
h1 { font-size: 1.4em; }
h2 { font-size: 1.1em; margin: 0 0 .3em; }
h3 { font-size: 1em; margin: .8em 0 .2em; }
.doc { margin: 1.5em 0; padding: 1em 1.2em; border: 1px solid #ddd; border-radius: 6px; }
.tokens { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 15px; line-height: 1.9;
          white-space: pre-wrap; word-break: break-word; }
.t { border-radius: 2px; }
.t.first { background: rgb(225, 225, 225); color: rgb(120, 120, 120); }
.meta, .legend, ol.top { color: #444; font-size: 14px; }
.bar { display: inline-block; width: 16em; height: 1em; vertical-align: middle; border: 1px solid #aaa;
       background: linear-gradient(to right, rgb(255, 255, 255), rgb(220, 38, 38)); }
"""


def _span(t: int, piece: str, weight: float, level: float) -> str:
    text = html.escape(piece, quote=True)
    if t == 0:
        title = f"first token: no target weight (model output {weight:.4f})"
        return f'<span class="t first" title="{title}">{text}</span>'
    fg = "color: #fff; " if level > DARK_TEXT_ABOVE else ""
    style = f"{fg}background: rgba({RED[0]}, {RED[1]}, {RED[2]}, {level:.3f})"
    return f'<span class="t" style="{style}" title="weight {weight:.4f}">{text}</span>'


def _html_doc(i: int, title: str | None, doc: TokenWeights, scale: str, top_k: int) -> str:
    name = f"Document {i + 1}" + (f": {title}" if title else "")
    spans = "".join(_span(t, p, w, lv) for t, ((p, w), lv) in enumerate(zip(doc, intensities(doc, scale))))
    top = "".join(
        f"<li><code>{html.escape(token_label(tok))}</code> {w:.3f} <small>(token {t})</small></li>"
        for t, tok, w in top_tokens(doc, top_k)
    )
    lo, hi = weight_range(doc)
    meta = (
        f"{len(doc)} tokens · mean weight {mean_weight(doc):.3f} over {max(len(doc) - 1, 0)} target tokens"
        f" · range {lo:.3f}–{hi:.3f}"
    )
    note = flatness_note(doc, scale)
    if note:
        meta += f'</p>\n<p class="meta"><strong>{html.escape(note)}</strong>'
    return (
        f'<section class="doc">\n<h2>{html.escape(name)}</h2>\n<p class="meta">{meta}</p>\n'
        f'<div class="tokens">{spans}</div>\n'
        f'<h3>Top-{top_k} tokens</h3>\n<ol class="top">{top}</ol>\n</section>'
    )


def render_html(
    docs: Sequence[TokenWeights],
    titles: Sequence[str | None] | None = None,
    scale: str = "raw",
    top_k: int = TOP_K,
    heading: str = "Train-Attention token weights",
) -> str:
    """A self-contained page (inline CSS, no scripts): one block per document, a colour legend;
    hovering a token shows its weight."""
    titles = list(titles) if titles is not None else [None] * len(docs)
    lo_hi = (
        ("weight 0", "1") if scale == "raw" else ("each document's lowest weight", "its highest (its range)")
    )
    legend = (
        f'<p class="legend">{lo_hi[0]} <span class="bar"></span> {lo_hi[1]} &nbsp;·&nbsp; '
        '<span class="t first">&nbsp;grey&nbsp;</span> first token: no target weight &nbsp;·&nbsp; '
        "hover a token to see its weight</p>"
    )
    body = "\n".join(_html_doc(i, titles[i], d, scale, top_k) for i, d in enumerate(docs))
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(heading)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(heading)}</h1>\n{legend}\n{body}\n</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------- inputs


def read_documents(path: Path, limit: int) -> tuple[list[tuple[str, str]], bool]:
    """(title, text) pairs from a .jsonl (field ``text``, else LAMA-ckl's ``evidence``) or any other
    file as one plain-text document; also whether the limit left documents out.

    Raises:
        InputError: naming file and line of a bad row, or an unreadable or empty file.
    """
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    if path.suffix.lower() != ".jsonl":
        if not raw.strip():
            raise InputError(f"{path}: empty document")
        return [(path.name, raw)], False
    docs: list[tuple[str, str]] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        if len(docs) == limit:
            return docs, True
        try:
            row = parse_json_object(line)
        except JsonlError as e:
            raise InputError(f"{path}:{lineno}: {e}") from None
        text = next((row[f] for f in ("text", "evidence") if isinstance(row.get(f), str)), None)
        if not text:
            raise InputError(f"{path}:{lineno}: no non-empty string field 'text' or 'evidence'")
        ident = row.get("id")
        docs.append((f"{path.name}:{lineno}" + (f" (id {ident})" if ident is not None else ""), text))
    if not docs:
        raise InputError(f"{path}: no documents")
    return docs, False


def load_ta(ta_dir: Path, tokenizer_dir: Path | None):
    """The TA model and the tokenizer it reads with (saved inside the TA directory by default).

    Raises:
        InputError: not a TA directory, or a tokenizer bigger than the model's vocabulary (its ids
            would index past the embedding).
        FileNotFoundError: no tokenizer files in ``tokenizer_dir`` (default: the TA directory).
    """
    from ckl_toolkit.core.ta_model import load_ta_model, load_ta_tokenizer

    try:
        ta = load_ta_model(ta_dir)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"{ta_dir}: cannot load the Train-Attention model: {e}") from None
    source = tokenizer_dir or ta_dir
    if not (source / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"{source}: no tokenizer files (tokenizer_config.json); the TA model was saved without its "
            "tokenizer: pass --tokenizer DIR"
        )
    tokenizer = load_ta_tokenizer(source)
    if len(tokenizer) > ta.config.vocab_size:
        raise InputError(
            f"{source}: tokenizer has {len(tokenizer)} tokens, more than the TA model's vocabulary "
            f"({ta.config.vocab_size}); it is not the TA model's tokenizer"
        )
    return ta, tokenizer


def load_target(ta, ta_dir: Path, tokenizer, target_dir: Path | None):
    """The target model a surprise TA model reads the per-token loss of (None for any other TA model).

    Raises:
        InputError: a surprise TA model without ``target_dir``, a target that cannot be loaded, or one
            whose tokenizer is not the TA model's (its losses would sit on other tokens).
    """
    if not ta.surprise:
        return None
    if target_dir is None:
        raise InputError(
            f"{ta_dir}: this TA model reads the target's per-token loss (meta-trained with "
            "ta.surprise=true): pass --target DIR, the model it weighs for (the meta-training base)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ckl_toolkit.core.ta_model import tokenizer_identity

    try:
        target_tokenizer = AutoTokenizer.from_pretrained(target_dir)
        target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    except (OSError, ValueError) as e:
        raise InputError(f"{target_dir}: cannot load the target model (--target): {e}") from None
    mine, theirs = tokenizer_identity(tokenizer), tokenizer_identity(target_tokenizer)
    if mine["vocab_sha256_16"] != theirs["vocab_sha256_16"]:
        raise InputError(
            f"{target_dir}: its tokenizer is not the TA model's ({ta_dir}); a surprise TA model reads the "
            "target's loss token by token, so both must tokenize alike"
        )
    return target
