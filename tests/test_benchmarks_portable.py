"""The model benchmarks run on a machine with PyTorch but no Ray (the lent GPU machine).

``benchmarks/train_step.py`` and ``benchmarks/generation.py`` must import only torch, numpy,
the standard library, ``training.model``/``training.generation``/``training.data.collate`` and
the optional transformers peer. A subprocess blocks the project's packages that machine lacks
(Ray, DeepSpeed, blingfire, s3fs; pyarrow too, so the model side stays free of it) and runs a
tiny training-step benchmark end to end, with the peer and with transformers blocked as well.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ["ray", "deepspeed", "blingfire", "s3fs", "pyarrow"]  # absent on the GPU machine

RUNNER = """
import importlib.abc, runpy, sys
blocked = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is not on this machine")
        return None
sys.meta_path.insert(0, Block())
script = sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name=sys.argv.pop(1) if sys.argv[1:2] == ["--import-only"] else "__main__")
"""


def _run(*args: str, blocked: list[str] = BLOCKED) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", RUNNER, ",".join(blocked), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )


def test_the_generation_benchmark_imports_without_ray() -> None:
    r = _run("benchmarks/generation.py", "--import-only", "not_main")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("peer", [True, False])
def test_the_training_step_benchmark_runs_without_ray(tmp_path: Path, peer: bool) -> None:
    out = tmp_path / "ts.json"
    args = ["--quick", "--sentences", "4", "--steps", "1", "--repeats", "1", "--out", str(out)]
    blocked = BLOCKED if peer else [*BLOCKED, "transformers"]
    r = _run("benchmarks/train_step.py", *args, *([] if peer else ["--no-peer"]), blocked=blocked)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {e["doc_sentences"] for e in report["results"]} == {20, 0}
    for e in report["results"]:
        assert e["gpt"]["tokens_per_s"] > 0 and e["gpthf"]["tokens_per_s"] > 0
        assert ("llama" in e) is peer
    if peer:
        assert report["peer_max_logit_diff"] < 1e-3  # the peer computes our GPT's function


def test_the_controlled_sparsity_benchmark_runs_without_ray_and_prunes_what_it_aims_at(
    tmp_path: Path,
) -> None:
    """``benchmarks/pruning_decode.py`` end to end at tiny shapes on a machine without Ray: the
    planted gates prune about the fraction asked for (measured from the caches, not assumed),
    0% keeps (nearly) every key, and the pruned caches hold less than the unpruned one."""
    out = tmp_path / "pd.json"
    args = ["--presets", "gpt-tiny,gpthf-tiny", "--prompt-tokens", "256", "--batch", "2"]
    args += ["--new-tokens", "8", "--fractions", "0,0.5,0.8", "--repeats", "1", "--out", str(out)]
    r = _run("benchmarks/pruning_decode.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [p["preset"] for p in report["points"]] == ["gpt-tiny", "gpthf-tiny"]
    for point in report["points"]:
        rows = {row["side"]: row for row in point["rows"]}
        assert rows["unpruned"]["kept_of_keys"] == 1.0
        # The GPT's keys are tokens (hundreds): close to the aim. GPTHF's are the sentence
        # ends of two rows (about 20): coarser.
        tol = 0.08 if point["arch"] == "gpt" else 0.2
        for side, fraction in (("pruned 0%", 0.0), ("pruned 50%", 0.5), ("pruned 80%", 0.8)):
            assert abs(rows[side]["kept_of_keys"] - (1 - fraction)) < tol, (point, side)
        assert (
            rows["pruned 80%"]["cache_bytes_live_ratio"]
            < rows["pruned 50%"]["cache_bytes_live_ratio"]
            < 1.0
        )
        assert (
            rows["pruned 80%"]["evicted"] > 0
            and rows["pruned 0%"]["evicted"] <= rows["pruned 50%"]["evicted"]
        )
