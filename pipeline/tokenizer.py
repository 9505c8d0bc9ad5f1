"""Tokenizer: train a byte-level BPE, or adopt an existing tokenizer.json, with our special tokens."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.columns import SPECIAL_TOKENS
from pipeline.config import InputConfig, StorageConfig
from pipeline.counters import Counters
from pipeline.errors import UserError
from pipeline.readers import read_documents
from pipeline.storage import expand_inputs, filesystem_for, read_bytes, storage_errors
from pipeline.text import normalise, split_sentences


class TokenizerError(UserError):
    pass


@dataclass(frozen=True)
class LoadedTokenizer:
    tokenizer: Tokenizer
    json: str
    """Serialised tokenizer, special tokens included: what the manifest's sha256 covers."""
    sha256: str
    special_ids: dict[str, int]
    vocab_size: int

    @classmethod
    def from_json(cls, text: str) -> LoadedTokenizer:
        try:
            tok = Tokenizer.from_str(text)
        except Exception as exc:
            raise TokenizerError(f"not a valid tokenizers JSON file: {exc}") from exc
        missing = [t for t in SPECIAL_TOKENS.values() if tok.token_to_id(t) is None]
        if missing:
            tok.add_special_tokens(missing)
            text = tok.to_str()
        ids = {role: tok.token_to_id(t) for role, t in SPECIAL_TOKENS.items()}
        return cls(
            tokenizer=tok,
            json=text,
            sha256=hashlib.sha256(text.encode()).hexdigest(),
            special_ids={k: int(v) for k, v in ids.items() if v is not None},
            vocab_size=tok.get_vocab_size(with_added_tokens=True),
        )


def load_tokenizer(uri: str, storage: StorageConfig | None = None) -> LoadedTokenizer:
    """Load a tokenizer JSON (local or URL); missing special tokens are appended to the vocab."""
    try:
        text = read_bytes(uri, storage).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{uri} is not a tokenizer JSON file (not UTF-8)") from exc
    try:
        return LoadedTokenizer.from_json(text)
    except TokenizerError as exc:
        raise TokenizerError(f"{uri}: {exc}") from exc


def new_byte_level_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # add_prefix_space: every sentence is encoded alone, and starts like a mid-text word.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def sample_sentences(
    uris: list[str], input_cfg: InputConfig, storage: StorageConfig | None, sample_bytes: int
) -> Iterator[str]:
    """Sentences from an even share of every input file, up to ``sample_bytes`` in all."""
    files = expand_inputs(uris, storage)
    share = max(1, sample_bytes // len(files))
    counters = Counters()
    for f in files:
        fs, path = filesystem_for(f.uri, storage)
        taken = 0
        with storage_errors(f.uri, "read"):
            for doc in read_documents(fs, path, f.uri, input_cfg, counters):
                for sentence in split_sentences(normalise(doc.text)):
                    yield sentence
                    taken += len(sentence)
                    if taken >= share:
                        break
                if taken >= share:
                    break


def train_tokenizer(
    uris: list[str],
    output: str,
    *,
    vocab_size: int = 8192,
    sample_bytes: int = 50_000_000,
    input_cfg: InputConfig | None = None,
    storage: StorageConfig | None = None,
) -> LoadedTokenizer:
    """Train a byte-level BPE on a sample of the inputs and write it to ``output``."""
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise TokenizerError("vocab_size must exceed the 256 byte tokens plus the special tokens")
    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        sample_sentences(uris, input_cfg or InputConfig(), storage, sample_bytes), trainer=trainer
    )
    loaded = LoadedTokenizer.from_json(tok.to_str())
    fs, path = filesystem_for(output, storage)
    with storage_errors(output, "write"):
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(loaded.json.encode())
    return loaded
