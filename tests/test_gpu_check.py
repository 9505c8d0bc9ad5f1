"""`make gpu-check` keeps working between GPU runs: its --cpu rehearsal runs every stage here.

The rehearsal runs in processes that cannot import what the GPU machine lacks (Ray, blingfire,
s3fs, tensorboardX: a ``sitecustomize`` on PYTHONPATH blocks them in every child process too),
so a stage that picked up a Ray import would fail here first. DeepSpeed is importable: the GPU
machine gets it from the wheels of ``make gpu-wheels``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402

ABSENT_ON_GPU = ["ray", "blingfire", "s3fs", "tensorboardX"]

BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not on the GPU machine")
        return None
sys.meta_path.insert(0, _Absent())
"""


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_cpu_rehearsal_runs_every_stage(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=set(ABSENT_ON_GPU)))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--cpu", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == list(gpu_check.STAGES)
    # The gpu tests are skipped without CUDA; everything else ran and passed.
    assert stages["tests"]["status"] == "skip" and stages["tests"]["figures"]["skipped"] > 0
    for name in gpu_check.STAGES[1:]:
        assert stages[name]["status"] == "pass", stages[name]

    train = stages["train"]["figures"]
    for model in gpu_check.CPU.models:
        fig = train[model]
        assert math.isfinite(fig["loss_first"]) and fig["loss_last"] < fig["loss_first"]
        assert fig["tokens_per_s"] > 0 and fig["peak_memory_gib"] > 0
        assert fig["steps"] == gpu_check.CPU.train_steps

    resume = stages["resume"]["figures"]
    assert resume["bitwise_equal_after_resume"]
    assert resume["losses_resumed"] == resume["losses_straight"]
    assert len(resume["losses_straight"]) == gpu_check.CPU.resume_steps

    gen = stages["generation"]["figures"]
    assert {p["prompt"] for p in gen["points"]} and gen["exactness"]["gpthf"]
    assert all(r["nll_rel_diff"] < 1e-5 for r in stages["eval"]["figures"]["rows"])
    table = (out / "gpu_check.md").read_text()
    assert "| resume | pass |" in table and "all passed" in table
    for name in ("gpu_check.log", "train_step.json", "generation.json", "eval.json"):
        assert (out / name).stat().st_size > 0


def test_a_failed_stage_is_recorded_and_the_rest_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = []

    def failing(ck: gpu_check.Check, timeout: float) -> gpu_check.StageResult:
        ran.append("tests")
        raise gpu_check.StageFailed("a planted failure")

    def buggy(ck: gpu_check.Check, timeout: float) -> gpu_check.StageResult:
        ran.append("train")
        raise KeyError("a planted bug")

    def passing(ck: gpu_check.Check, timeout: float) -> gpu_check.StageResult:
        ran.append("eval")
        return gpu_check.StageResult("eval", status="pass", summary="fine")

    monkeypatch.setitem(gpu_check.RUNNERS, "tests", failing)
    monkeypatch.setitem(gpu_check.RUNNERS, "train", buggy)
    monkeypatch.setitem(gpu_check.RUNNERS, "eval", passing)
    rc = gpu_check.main(["--cpu", "--out", str(tmp_path), "--stages", "tests,train,eval"])
    assert rc == 1
    assert ran == ["tests", "train", "eval"]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    by_name = {s["name"]: s for s in report["stages"]}
    assert by_name["tests"]["status"] == "fail" and "planted failure" in by_name["tests"]["error"]
    assert by_name["train"]["status"] == "fail" and "KeyError" in by_name["train"]["error"]
    assert by_name["eval"]["status"] == "pass"
    assert report["verdict"] == "FAILED: tests, train"
    assert "ERROR: a planted failure" in (tmp_path / "gpu_check.md").read_text()


def test_a_stage_past_its_time_is_killed(tmp_path: Path) -> None:
    ck = gpu_check.Check(tmp_path, tmp_path, gpu_check.CPU, cpu=True, python=sys.executable)
    t0 = time.monotonic()
    with pytest.raises(gpu_check.StageFailed, match="timed out after 1s"):
        ck.run([sys.executable, "-c", "import time; time.sleep(60)"], timeout=1)
    assert time.monotonic() - t0 < 10
    with pytest.raises(gpu_check.StageFailed, match="exit 3"):
        ck.run([sys.executable, "-c", "raise SystemExit(3)"], timeout=30)


def test_unknown_stage_and_missing_cuda_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        gpu_check.main(["--cpu", "--out", str(tmp_path), "--stages", "tests,warp"])
    import torch

    if not torch.cuda.is_available():
        assert gpu_check.main(["--out", str(tmp_path)]) == 2
