"""Every figure the READMEs publish comes from a committed result file that the text names.

A paragraph or table row that names a result file (``benchmarks/results/*.json`` or
``benchmarks/gpu_runs/**/*.json``; a table inherits the files named in the paragraph just
before it) may quote only figures found in those files: each decimal or thousands-separated
number must equal, at the precision it is printed with, a number in one of them (as itself, or
times 100 when followed by ``%``). A "Figures" section must name its file. Code spans and
fenced blocks are commands, not figures, and are skipped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "benchmarks/README.md"]
CITATION = re.compile(r"(?:benchmarks/)?((?:results|gpu_runs)/[\w./-]+?\.json)")
FIGURE = re.compile(r"(?<![\w.,/-])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+)(%|x)?(?![\w]|\.\d)")


def _blocks(text: str) -> Iterator[tuple[str, list[str], str]]:
    """(kind, citations, text) for each paragraph and table row, outside fenced code, with a
    table's rows inheriting the citations of the paragraph before the table, and the heading
    each block is under."""
    fenced = False
    para: list[str] = []
    last_cites: list[str] = []
    heading = ""

    def flush() -> Iterator[tuple[str, list[str], str]]:
        nonlocal para, last_cites
        if para:
            body = " ".join(para)
            last_cites = CITATION.findall(body)
            yield "para:" + heading, last_cites, body
        para = []

    in_table = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            yield from flush()
            continue
        if fenced:
            continue
        if line.startswith("#"):
            yield from flush()
            heading = line.strip("# ")
            last_cites = []
            in_table = False
            continue
        if line.startswith("|"):
            if not in_table:
                yield from flush()
                in_table = True
            own = CITATION.findall(line)
            yield "row:" + heading, own or last_cites, line
            continue
        in_table = False
        if not line.strip():
            yield from flush()
            continue
        para.append(line)
    yield from flush()


def _numbers(doc: Any) -> list[float]:
    if isinstance(doc, bool):
        return []
    if isinstance(doc, int | float):
        return [float(doc)]
    if isinstance(doc, dict):
        return [x for v in doc.values() for x in _numbers(v)]
    if isinstance(doc, list):
        return [x for v in doc for x in _numbers(v)]
    return []


def _figures(text: str) -> list[tuple[str, float, int, bool]]:
    text = re.sub(r"`[^`]*`", " ", text)  # code spans: commands, paths, commits
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    out = []
    for m in FIGURE.finditer(text):
        raw = m.group(1).replace(",", "")
        decimals = len(raw.split(".")[1]) if "." in raw else 0
        out.append((m.group(0), float(raw), decimals, m.group(2) == "%"))
    return out


def _found(value: float, decimals: int, percent: bool, numbers: list[float]) -> bool:
    scale = 100.0 if percent else 1.0
    return any(
        round(n * scale, decimals) == value or round(abs(n) * scale, decimals) == value
        for n in numbers
    )


def _checked_blocks() -> list[tuple[str, str, list[str], str]]:
    out = []
    for doc in DOCS:
        for kind, cites, text in _blocks((ROOT / doc).read_text()):
            if cites:
                out.append((doc, kind, cites, text))
    return out


def test_every_figures_section_names_its_result_file() -> None:
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for m in re.finditer(r"^#+ .*Figures.*$", text, flags=re.M):
            section = text[m.end() :].split("\n#", 1)[0]
            assert CITATION.search(section), f"{doc}: '{m.group(0)}' names no committed result"


def test_cited_result_files_are_committed_json() -> None:
    blocks = _checked_blocks()
    assert blocks, "no figure cites a result file"
    for doc, _, cites, _ in blocks:
        for c in cites:
            path = ROOT / "benchmarks" / c
            assert path.is_file(), f"{doc} cites {c}, which is not in benchmarks/"
            json.loads(path.read_text())


@pytest.mark.parametrize("doc", DOCS)
def test_each_quoted_figure_is_in_the_file_it_cites(doc: str) -> None:
    missing = []
    for d, kind, cites, text in _checked_blocks():
        if d != doc:
            continue
        numbers = [
            n for c in cites for n in _numbers(json.loads((ROOT / "benchmarks" / c).read_text()))
        ]
        for shown, value, decimals, percent in _figures(text):
            if not _found(value, decimals, percent, numbers):
                missing.append(f"{shown} ({kind}, citing {', '.join(cites)}): {text[:120]}")
    assert not missing, "figures not in the files they cite:\n" + "\n".join(missing)


def test_the_checker_catches_a_figure_that_is_not_in_its_file() -> None:
    numbers = [0.8934, 17289.0, 0.026]
    assert _found(0.89, 2, False, numbers) and _found(17289, 0, False, numbers)
    assert _found(2.6, 1, True, numbers)  # 0.026 printed as 2.6%
    assert not _found(0.91, 2, False, numbers) and not _found(1.03, 2, False, numbers)
    shown = [f[0] for f in _figures("ran at 0.89x (`8b7742c`, 1.2.3), 17,289 tok/s, 2.6% MFU")]
    assert shown == ["0.89x", "17,289", "2.6%"]
