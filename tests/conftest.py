"""Shared fixtures: one in-process Ray for the whole session, a SeaweedFS S3 server, a tokenizer."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "river",
    "stone",
    "light",
    "king",
    "queen",
    "sword",
    "ship",
    "wind",
    "morning",
    "night",
    "walks",
    "sings",
    "falls",
    "rises",
    "sleeps",
    "hears",
    "speaks",
    "under",
    "over",
    "beyond",
    "quietly",
    "slowly",
    "bright",
    "dark",
    "old",
    "young",
    "green",
    "golden",
    "silent",
]


def make_sentence(rng: random.Random, n_words: int | None = None) -> str:
    n = n_words if n_words is not None else rng.randint(3, 14)
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + rng.choice([".", ".", "!", "?"])


def make_document(rng: random.Random, n_sentences: int | None = None) -> str:
    n = n_sentences if n_sentences is not None else rng.randint(1, 40)
    return " ".join(make_sentence(rng) for _ in range(n))


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One in-process Ray for the suite. 4 logical CPUs on 2 cores: see STACK.md's 2-CPU deadlock."""
    import ray
    from ray.data import DataContext

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def corpus_text() -> list[str]:
    rng = random.Random(1234)
    return [make_document(rng) for _ in range(200)]


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory, corpus_text: list[str]) -> Path:
    """A small byte-level BPE trained on made-up text (what `gpthf tokenizer train` does)."""
    from pipeline.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    src = d / "train.txt"
    src.write_text("\n\n".join(corpus_text))
    out = d / "tokenizer.json"
    train_tokenizer([str(src)], str(out), vocab_size=400)
    return out


@pytest.fixture(scope="module")
def process_group() -> Iterator[None]:
    """A gloo process group of one rank (this process) for the tests of one module; torn
    down through DeepSpeed so that the next module's engine does not meet a stale group."""
    import torch.distributed as dist

    from training.train.worker import destroy_distributed, init_distributed

    created = not dist.is_initialized()
    assert init_distributed(gpu=False) == (0, 1)
    yield
    if created:
        destroy_distributed()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from tests.s3_server import seaweedfs

    with seaweedfs(tmp_path_factory.mktemp("weed"), buckets=["corpus", "shards"]) as server:
        yield server


def preprocessed(
    root: Path, tokenizer: Path, *, files: int, docs: int, seed: int, heldout: float
) -> Path:
    """A small `gpthf preprocess` output (S=8, M=32) of made-up JSONL documents; returns its path."""
    import json

    from pipeline.config import InputConfig, PackingConfig, PreprocessConfig
    from pipeline.preprocess import run_preprocess

    rng = random.Random(seed)
    (root / "raw").mkdir(parents=True, exist_ok=True)
    for k in range(files):
        texts = [make_document(rng) for _ in range(docs)]
        (root / "raw" / f"p{k}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in texts)
        )
    run_preprocess(
        PreprocessConfig(
            input=InputConfig(paths=[str(root / "raw")]),
            output=str(root / "data"),
            tokenizer=str(tokenizer),
            packing=PackingConfig(
                sentences_per_block=8, max_sentence_tokens=32, heldout_fraction=heldout
            ),
            plot=False,
        )
    )
    return root / "data"
