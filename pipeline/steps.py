"""The steps a work unit's documents pass through, as a chain of generators.

    read -> normalise -> drop duplicates -> split into sentences -> (tokenize and pack)

Each step takes the documents of the step before and yields its own, counting what it skips
in the unit's ``Counters``; ``pipeline.unit`` ends the chain with tokenizing and packing, and
the fingerprint pass of deduplication (``pipeline.dedup``) runs the same first two steps, so
both passes see the same documents under the same ordinals. A step that needs state across
work units (which copy of a document survives) does not live in a unit: it is decided on the
driver between the two passes, and reaches the units as their ``drop`` lists.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from pipeline.config import InputConfig, StorageConfig
from pipeline.counters import Counters
from pipeline.pieces import WorkUnit
from pipeline.readers import read_documents
from pipeline.storage import filesystem_for, storage_errors
from pipeline.text import normalise, split_sentences


@dataclass
class Doc:
    """A document on its way through the steps."""

    ordinal: int
    """Its position among the documents its work unit reads (records skipped as bad input
    take no ordinal): what the fingerprint pass and the processing pass both call it."""
    doc_id: str
    location: str
    text: str
    paragraphs: list[str] = field(default_factory=list)
    sentences: list[str] = field(default_factory=list)
    n_bytes: int = 0
    """UTF-8 bytes of ``text`` (set by ``sentences``)."""


@dataclass(frozen=True)
class Drop:
    """Why a document of a unit is skipped as a copy, and of what."""

    reason: str
    """``duplicate_exact`` or ``duplicate_near``."""
    original: str
    """The input the surviving copy came from (its unit key, or "an earlier night")."""

    def to_list(self) -> list[str]:
        return [self.reason, self.original]


def read(
    u: WorkUnit, cfg: InputConfig, storage: StorageConfig, counters: Counters
) -> Iterator[Doc]:
    """The unit's documents, numbered; bad records are counted by the reader, not yielded."""
    in_fs, in_path = filesystem_for(u.file.uri, storage)
    with storage_errors(u.file.uri, "read"):
        for i, d in enumerate(read_documents(in_fs, in_path, u.file.uri, cfg, counters, u.span)):
            yield Doc(ordinal=i, doc_id=d.doc_id, location=d.location, text=d.text)


def normalised(docs: Iterator[Doc]) -> Iterator[Doc]:
    """NFC, controls removed, whitespace collapsed (``pipeline.text.normalise``)."""
    for doc in docs:
        doc.paragraphs = normalise(doc.text)
        yield doc


def without_duplicates(
    docs: Iterator[Doc], drop: Mapping[int, Drop], counters: Counters
) -> Iterator[Doc]:
    """The documents the driver did not mark as copies; each copy is counted by its reason,
    with its location and its original's in the examples (never fatal: not an input fault)."""
    for doc in docs:
        d = drop.get(doc.ordinal)
        if d is None:
            yield doc
        else:
            counters.skip(d.reason, f"{doc.location} (copy of {d.original})", fault=False)


def sentences(docs: Iterator[Doc], counters: Counters) -> Iterator[Doc]:
    """Documents split into sentences (blingfire); one with none is skipped as empty."""
    for doc in docs:
        doc.sentences = split_sentences(doc.paragraphs)
        if not doc.sentences:
            counters.skip("empty_document", doc.location)
            continue
        counters.add("documents")
        counters.add("sentences", len(doc.sentences))
        doc.n_bytes = len(doc.text.encode("utf-8"))
        counters.add("source_bytes", doc.n_bytes)
        yield doc
