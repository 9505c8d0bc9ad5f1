"""Normalise and sentence-split stages (pure functions)."""

from __future__ import annotations

import re
import unicodedata

import blingfire

# C0/C1 controls except tab and newline, plus zero-width and BOM characters.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\ufeff]")
# blingfire always ends a sentence at U+2029, so whole documents go through it in one call.
_PARAGRAPH_SEPARATOR = "\u2029"


def normalise(text: str) -> list[str]:
    """NFC, controls removed, whitespace collapsed; returns the non-empty paragraphs.

    Paragraphs (blank-line separated: a line of spaces and tabs only) are kept apart because
    blingfire joins lines across blank lines, which would glue a heading onto the next sentence.

    This is on every byte's path, so each step is skipped when it cannot change the text, and
    paragraphs are found by grouping lines rather than by a regex split (the stage profile of
    benchmarks/preprocess.py times it); tests/test_stages.py holds it equal to the plain
    step-by-step definition.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii():
        text = text.replace(_PARAGRAPH_SEPARATOR, "\n\n").replace("\u2028", "\n")
        text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    out: list[str] = []
    para: list[str] = []
    for line in [*text.split("\n"), ""]:  # the final blank line ends the last paragraph
        if line.strip(" \t"):
            para.append(line)
        elif para:
            joined = " ".join(para)
            if (
                joined.isascii()  # O(1): a flag of the string
                and "  " not in joined
                and "\t" not in joined
                and joined[0] != " "
                and joined[-1] != " "
            ):
                # Already collapsed: ASCII whitespace other than space and tab is gone (\r and
                # \n split lines, the rest are controls), so splitting would rebuild it as is.
                out.append(joined)
            else:
                # str.split() splits on exactly the characters regex \s matches (Unicode
                # whitespace): this collapses every run of whitespace to one space.
                collapsed = " ".join(joined.split())
                if collapsed:
                    out.append(collapsed)
            para = []
    return out


def split_sentences(paragraphs: list[str]) -> list[str]:
    """Sentences of the paragraphs, in order, via blingfire (one sentence per output line)."""
    if not paragraphs:
        return []
    joined = blingfire.text_to_sentences(_PARAGRAPH_SEPARATOR.join(paragraphs))
    out = []
    for s in joined.split("\n"):
        s = s.strip(_PARAGRAPH_SEPARATOR + " ")
        if s:
            out.append(s)
    return out
