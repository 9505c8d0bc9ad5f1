"""The benchmark protocol (``benchmarks/protocol.py``): interleaving, ratios, fits, records."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.protocol import (  # noqa: E402
    Run,
    bounded,
    fit_line,
    interleave,
    rate_of,
    ratio,
    same_work,
    write_result,
)


def test_sides_run_in_turn_and_the_order_rotates() -> None:
    order: list[str] = []

    def side(name: str, seconds: float) -> Run:
        order.append(name)
        return Run(seconds, {"tokens": 10})

    samples = interleave(
        {"a": lambda: side("a", 2.0), "b": lambda: side("b", 1.0), "c": lambda: side("c", 4.0)},
        repeats=3,
        log=lambda _: None,
    )
    # Each repeat runs every side once; no side is always first.
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [len(s.runs) for s in samples.values()] == [3, 3, 3]
    r = ratio(samples, "b", "a")  # b takes half a's time: twice as fast, every repeat
    assert (r.spread.median, r.spread.low, r.spread.high) == (2.0, 2.0, 2.0)


def test_a_ratio_is_taken_per_repeat_with_its_spread() -> None:
    times = iter([1.0, 2.0, 1.0, 3.0, 1.0, 2.5])  # a, b; b, a (rotated); a, b
    samples = interleave(
        {"a": lambda: Run(next(times)), "b": lambda: Run(next(times))}, 3, log=lambda _: None
    )
    assert samples["a"].seconds == [1.0, 3.0, 1.0] and samples["b"].seconds == [2.0, 1.0, 2.5]
    r = ratio(samples, "b", "a")
    assert r.spread.low == pytest.approx(0.4) and r.spread.high == pytest.approx(3.0)
    assert r.spread.median == pytest.approx(0.5)


def test_unequal_work_is_refused() -> None:
    n = iter([100, 100, 100, 99])
    samples = interleave(
        {"a": lambda: Run(1.0, {"tokens": next(n)}), "b": lambda: Run(1.0, {"tokens": next(n)})},
        2,
        log=lambda _: None,
    )
    with pytest.raises(AssertionError, match="unequal work"):
        same_work(samples, "a", "b")


def test_a_ratio_beyond_the_hardware_is_flagged_not_published() -> None:
    samples = interleave({"1w": lambda: Run(3.2), "2w": lambda: Run(1.0)}, 3, log=lambda _: None)
    r = bounded(ratio(samples, "2w", "1w"), 2.0, "on 2 cores")
    assert r.flag and "exceeds 2.00x" in r.flag and r.fmt().startswith("noise")
    ok = bounded(ratio(samples, "1w", "1w"), 2.0, "on 2 cores")
    assert not ok.flag


def test_the_fit_recovers_a_line_and_its_error_grows_with_noise() -> None:
    x = [10.0, 20.0, 30.0, 10.0, 20.0, 30.0]
    exact = fit_line(x, [5 + 0.25 * a for a in x])
    assert exact.slope == pytest.approx(0.25) and exact.intercept == pytest.approx(5)
    assert exact.slope_se == pytest.approx(0, abs=1e-12) and exact.r2 == pytest.approx(1)
    assert rate_of(exact)[0] == pytest.approx(4.0)  # MB/s from s/MB
    rng = random.Random(0)
    noisy = fit_line(x, [5 + 0.25 * a + rng.gauss(0, 0.5) for a in x])
    assert noisy.slope_se > 0 and abs(noisy.slope - 0.25) < 4 * noisy.slope_se
    rate, se = rate_of(noisy)
    assert rate == pytest.approx(1 / noisy.slope)
    assert se == pytest.approx(noisy.slope_se / noisy.slope**2)
    with pytest.raises(ValueError, match="three distinct"):
        fit_line([10.0, 20.0, 10.0, 20.0], [1.0, 2.0, 1.0, 2.0])


def test_a_result_records_its_environment_and_is_strict_json(tmp_path: Path) -> None:
    path = write_result("x", {"value": 1.5}, tmp_path / "x.json")
    doc = json.loads(path.read_text())
    env = doc["environment"]
    assert doc["value"] == 1.5 and doc["benchmark"] == "x"
    assert env["cpus"] and env["python"] and len(env["commit"]) == 12
    with pytest.raises(ValueError):
        write_result("y", {"value": math.nan}, tmp_path / "y.json")  # NaN is not JSON
