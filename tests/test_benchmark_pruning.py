"""The pruning benchmark's generation (``benchmarks/pruning.py``): every variant decodes the
same tokens (teacher-forced), the protocol checks it, and the figures it reports are there."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests._model_helpers import generation_model, one_torch_thread
from tests.test_generate import PROMPTS, given_continuation
from tests.test_pruning_generate import pruning_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.protocol import interleave, same_work, write_result  # noqa: E402
from benchmarks.pruning import QUICK, THOROUGH, decode_side, generation, parse_args  # noqa: E402

pytestmark = pytest.mark.usefixtures(one_torch_thread.__name__)


@pytest.mark.parametrize("arch", ["gpthf", "gpt"])
def test_the_variants_do_the_same_work_and_are_compared_per_repeat(
    arch: str, tmp_path: Path
) -> None:
    given = given_continuation(16)
    models = {"unpruned": generation_model(arch), "lambda=0.1": pruning_model(arch)}
    gen = generation(models, PROMPTS, given, repeats=3, log=lambda _: None)
    ref, pruned = gen["unpruned"], gen["lambda=0.1"]
    assert ref["work"] == pruned["work"]  # same prompts, tokens and sequences (checksum)
    assert ref["work"]["new_tokens"] == 16 * len(PROMPTS)
    assert "decode_speed_ratio" not in ref
    for key in ("decode_speed_ratio", "prefill_speed_ratio", "call_speed_ratio"):
        r = pruned[key]
        assert (r["side"], r["base"], r["n"]) == ("lambda=0.1", "unpruned", 3)
        assert r["low"] <= r["median"] <= r["high"]
    assert pruned["decode_tokens_per_s"]["n"] == 3 and len(pruned["repeats_s"]) == 3
    # The same sequence: the pruned cache holds less of it, and it evicted something.
    assert pruned["cache_bytes_live_ratio"] < 1 == ref["cache_bytes_live_ratio"]
    assert pruned["evicted"] > 0 and ref["evicted"] == 0
    path = write_result("pruning_test", {"results": gen}, tmp_path / "p.json")  # strict JSON
    assert json.loads(path.read_text())["results"]["unpruned"]["work"] == ref["work"]


def test_free_running_variants_would_fail_the_same_work_check() -> None:
    """Sides that decode different tokens (here: different continuations) are refused."""
    last: dict = {}
    sides = {
        "a": decode_side(generation_model("gpt"), PROMPTS, given_continuation(8), last, "a"),
        "b": decode_side(
            generation_model("gpt"), PROMPTS, [g[::-1] for g in given_continuation(8)], last, "b"
        ),
    }
    t = interleave(sides, 1, log=lambda _: None)
    same_work(t, "a", "b", keys=["new_tokens", "prompt_tokens"])  # the counts alone agree
    with pytest.raises(AssertionError, match="unequal work"):
        same_work(t, "a", "b")


def test_quick_is_a_smaller_run_and_flags_override_it() -> None:
    quick, thorough = parse_args(["--quick"]), parse_args([])
    assert quick.lambdas == QUICK["lambdas"] and thorough.lambdas == THOROUGH["lambdas"]
    assert quick.steps < thorough.steps and quick.work != thorough.work
    assert parse_args(["--quick", "--steps", "7"]).steps == 7
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "2"])
