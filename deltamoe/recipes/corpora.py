"""Readers for the public texts the demo uses, as they ship in Debian packages (see `demo_assets`).

Each reader turns one on-disk format into plain Python records and knows nothing about splits or JSONL:
- SWORD zText Bible modules (`sword-text-kjv`, `-web`, `-sparv`): one string per verse slot of the module's
  versification, OSIS markup and footnotes stripped. Modules with the same versification (KJV and Reina-Valera 1909
  both declare `Versification=KJV`) are parallel slot by slot, which gives verse-aligned translation pairs.
- fortune files (`fortunes-ru`): `%`-separated entries, ANSI colour codes stripped.
- the Debian FAQ plain-text rendering (`debian-faq`, `debian-faq-ru`, ...): numbered sections as question/answer
  pairs, keyed by section number so that translations pair up.
- bsdgames `quiz` files: `question:answer` lines with the quiz game's `{optional}` / `[alt|alt]` / `a|b` syntax.
- DocBook HTML manuals (`aptitude-doc-en`, `-es`, `-ru`): the prose paragraphs of each page, navigation and
  screen/program listings left out; the translations keep the English file names, so pages pair up by name.
"""

from __future__ import annotations

import gzip
import html.parser
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from deltamoe.common.errors import DeltaMoEError

# --------------------------------------------------------------------------------------------------------------------
# SWORD zText
# Layout (SWORD's zverse.cpp): per testament `ot`/`nt`, `.bzs` = block index of 12-byte little-endian records
# (offset, compressed size, uncompressed size) into `.bzz` (zlib blocks); `.bzv` = verse index of 10-byte records
# (block number uint32, offset in the uncompressed block uint32, size uint16). A slot of size 0 is empty.
_BZS = struct.Struct("<III")
_BZV = struct.Struct("<IIH")
# Footnotes, cross-references and headings are not verse text: drop them with their content; keep the words of
# every other element (<w lemma=...>word</w>, <transChange>, <divineName>, ...).
_OSIS_DROP = re.compile(r"<(note|title|reference)\b[^>]*?(?<!/)>.*?</\1>", re.DOTALL)
# Structural elements separate words; inline ones (<w>, <transChange>, ...) sit inside words' own spacing.
_BREAK_TAG = re.compile(r"</?(?:div|p|l|lg|lb|milestone|chapter|verse|list|item)\b[^>]*>")
_TAG = re.compile(r"<[^>]*(?:>|$)")  # a tag cut off at the end of a slot too (seen once in the WEB module)
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,;:.?!])")


def strip_osis(markup: str) -> str:
    """Verse text without OSIS tags, footnotes or headings, whitespace collapsed."""
    text = _TAG.sub("", _BREAK_TAG.sub(" ", _OSIS_DROP.sub(" ", markup)))
    return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(text.split()))


def read_ztext(module_dir: str | os.PathLike, testament: str) -> list[str]:
    """All verse slots of one testament ("ot" or "nt") of a zText module, markup stripped ("" for empty slots)."""
    if testament not in ("ot", "nt"):
        raise DeltaMoEError(f"zText testament must be 'ot' or 'nt', got {testament!r}")
    folder = Path(module_dir)
    paths = {ext: folder / f"{testament}.{ext}" for ext in ("bzs", "bzv", "bzz")}
    for path in paths.values():
        if not path.is_file():
            raise DeltaMoEError(f"SWORD zText module {folder}: missing {path.name}")
    bzs, bzv, bzz = (paths[e].read_bytes() for e in ("bzs", "bzv", "bzz"))
    if len(bzs) % _BZS.size or len(bzv) % _BZV.size:
        raise DeltaMoEError(f"SWORD zText module {folder}: {testament}.bzs/.bzv sizes are not whole records")
    blocks = [_BZS.unpack_from(bzs, i) for i in range(0, len(bzs), _BZS.size)]
    cache: dict[int, bytes] = {}
    verses = []
    for i in range(0, len(bzv), _BZV.size):
        block, offset, size = _BZV.unpack_from(bzv, i)
        if size == 0:
            verses.append("")
            continue
        if block >= len(blocks):
            raise DeltaMoEError(f"SWORD zText module {folder}: verse {i // _BZV.size} points to block {block} of {len(blocks)}")
        if block not in cache:
            start, compressed, _ = blocks[block]
            try:
                cache[block] = zlib.decompress(bzz[start : start + compressed])
            except zlib.error as e:
                raise DeltaMoEError(f"SWORD zText module {folder}: block {block} of {testament}.bzz is corrupt ({e})") from e
        verses.append(strip_osis(cache[block][offset : offset + size].decode("utf-8", errors="replace")))
    return verses


def read_bible(module_dir: str | os.PathLike) -> list[str]:
    """Both testaments, OT slots then NT slots; slot i of two same-versification modules is the same verse."""
    return read_ztext(module_dir, "ot") + read_ztext(module_dir, "nt")


# --------------------------------------------------------------------------------------------------------------------
# fortune files
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_FORTUNE_SEP = re.compile(r"^%[ \t\r]*$", re.MULTILINE)


def read_fortunes(path: str | os.PathLike) -> list[str]:
    """Entries of a `%`-separated fortune file, ANSI escape sequences removed, trailing spaces trimmed per line."""
    text = _ANSI.sub("", Path(path).read_text(encoding="utf-8", errors="replace")).replace("\r\n", "\n")
    entries = []
    for part in _FORTUNE_SEP.split(text):
        lines = [line.rstrip() for line in part.strip("\n").split("\n")]
        entry = "\n".join(lines).strip()
        if entry:
            entries.append(entry)
    return entries


def fortune_files(folder: str | os.PathLike) -> list[Path]:
    """Text files of a fortunes folder: not the `.dat` indexes, not the `.u8` symlinks, sorted for determinism."""
    return sorted(
        p for p in Path(folder).iterdir() if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
    )


# --------------------------------------------------------------------------------------------------------------------
# Debian FAQ (plain-text rendering)
@dataclass(frozen=True)
class FAQSection:
    number: str
    """Section number like "1.3" or "3.1.11": the same in every translation."""
    question: str
    answer: str


# A section heading starts in column 0 with a dotted number of at least two parts ("1.3." then a space, which is a
# no-break space in the English file); the table of contents repeats the headings indented, so it never matches.
_FAQ_HEADING = re.compile(r"^(\d+(?:\.\d+)+)\.\s+(\S.*)$")
_FAQ_CHAPTER = re.compile(r"^\d+\.\s+\S")


def _paragraphs(lines: list[str]) -> str:
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(" ".join(line.split()))  # also turns no-break spaces into spaces
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return "\n\n".join(paragraphs)


def parse_faq_text(text: str) -> list[FAQSection]:
    """Numbered sections of a Debian FAQ text: question = heading (may wrap), answer = body until the next heading."""
    sections: list[FAQSection] = []
    number, title, body, in_title = None, [], [], False

    def close():
        if number is not None:
            answer = _paragraphs(body)
            if answer:
                sections.append(FAQSection(number=number, question=" ".join(title), answer=answer))

    for line in text.replace("\r\n", "\n").split("\n"):
        heading = _FAQ_HEADING.match(line)
        if heading:
            close()
            number, title, body, in_title = heading.group(1), [heading.group(2).strip()], [], True
        elif _FAQ_CHAPTER.match(line):
            close()
            number, title, body, in_title = None, [], [], False
        elif in_title and line.strip() and not line[0].isspace():
            title.append(line.strip())  # a wrapped heading continues in column 0
        else:
            in_title = False
            body.append(line)
    close()
    return sections


def read_faq(path: str | os.PathLike) -> list[FAQSection]:
    """Sections of `debian-faq.<lang>.txt.gz` (or an uncompressed .txt)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        sections = parse_faq_text(f.read())
    if not sections:
        raise DeltaMoEError(f"Debian FAQ {path}: no numbered sections found (expected headings like '1.1. Question')")
    return sections


# --------------------------------------------------------------------------------------------------------------------
# bsdgames quiz files
# Accent codes inside [...] alternatives, e.g. Yaound['e|e'|e]: prefer the plain-ASCII spelling.
_ACCENT_MARKS = set("'^,~°/`\"")


def _split_top(text: str, sep: str = "|") -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _expand(text: str) -> str:
    """One spelling of a quiz pattern: `{x}` included, `[a|b]` the first plain alternative, `a|b` the first."""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch in "{[":
            close = {"{": "}", "[": "]"}[ch]
            depth, j = 1, i + 1
            while j < len(text) and depth:
                if text[j] in "{[":
                    depth += 1
                elif text[j] in "}]":
                    depth -= 1
                j += 1
            if depth:
                raise DeltaMoEError(f"quiz pattern {text!r}: unbalanced {ch!r}")
            alternatives = [_expand(a) for a in _split_top(text[i + 1 : j - 1])]
            if close == "]":
                plain = [a for a in alternatives if not _ACCENT_MARKS & set(a)]
                out.append(plain[0] if plain else alternatives[-1])
            else:
                out.append(alternatives[0])
            i = j
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def quiz_choice(pattern: str, prefer: str = "first") -> str:
    """Expand a quiz answer pattern to one spelling; `prefer="longest"` picks the longest top-level alternative
    (country names: "United Kingdom|England|UK" -> "United Kingdom"), "first" the first ("Beijing|Peking")."""
    alternatives = [" ".join(_expand(a).split()) for a in _split_top(pattern)]
    alternatives = [a for a in alternatives if a]
    if not alternatives:
        raise DeltaMoEError(f"quiz pattern {pattern!r} expands to nothing")
    return max(alternatives, key=len) if prefer == "longest" else alternatives[0]


def read_quiz(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(question, answer) pairs of a two-column quiz file such as `quiz/europe` (country -> capital)."""
    pairs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = _split_top(line, ":")
        if len(fields) < 2:
            raise DeltaMoEError(f"quiz file {path}, line {n}: expected 'question:answer', got {line!r}")
        pairs.append((quiz_choice(fields[0], prefer="longest"), quiz_choice(fields[1], prefer="first")))
    return pairs


# --------------------------------------------------------------------------------------------------------------------
# DocBook HTML manuals
class _ProseParagraphs(html.parser.HTMLParser):
    """Text of every <p> outside navigation bars (<div class="nav...">) and verbatim blocks (<pre>: commands, screens)."""

    _SKIPPED = ("pre", "script", "style", "head")

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._current: list[str] | None = None
        self._skip = 0
        self._divs: list[bool] = []  # per open <div>: is it navigation?

    def handle_starttag(self, tag, attrs):
        if tag == "div":
            nav = (dict(attrs).get("class") or "").startswith("nav")
            self._divs.append(nav)
            self._skip += nav
        elif tag in self._SKIPPED:
            self._skip += 1
        elif tag == "p" and not self._skip:
            self._current = []

    def handle_endtag(self, tag):
        if tag == "div" and self._divs:
            self._skip -= self._divs.pop()
        elif tag in self._SKIPPED:
            self._skip = max(0, self._skip - 1)
        elif tag == "p" and self._current is not None:
            text = " ".join("".join(self._current).split())
            if text:
                self.paragraphs.append(text)
            self._current = None

    def handle_data(self, data):
        if self._current is not None and not self._skip:
            self._current.append(data)


def html_paragraphs(markup: str) -> list[str]:
    """Prose paragraphs of one HTML page, whitespace collapsed (entities decoded)."""
    parser = _ProseParagraphs()
    parser.feed(markup)
    parser.close()
    return parser.paragraphs


def read_html_manual(folder: str | os.PathLike) -> dict[str, list[str]]:
    """Page file name -> prose paragraphs, for every `*.html` page of a manual folder that has any prose."""
    folder = Path(folder)
    pages = sorted(folder.glob("*.html"))
    if not pages:
        raise DeltaMoEError(f"HTML manual {folder}: no .html pages")
    out = {}
    for page in pages:
        paragraphs = html_paragraphs(page.read_text(encoding="utf-8", errors="replace"))
        if paragraphs:
            out[page.name] = paragraphs
    return out
