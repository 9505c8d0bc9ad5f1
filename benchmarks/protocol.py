"""The benchmark protocol every benchmark follows: how sides are timed, compared and recorded.

- **Interleaved**: the sides of a comparison run in turn within each repeat (A, B, C, then
  B, C, A, ...: the order rotates, so no side always runs first, after a warm cache or a cold
  one). A slow spell of a shared machine then costs every side alike.
- **Repeated, with a spread**: each side's figure is the median over ``repeats`` (at least
  3), reported with its min-max; a ratio is taken per repeat (the sides of one repeat ran
  moments apart) and reported as the median of those ratios with their min-max.
- **Same work**: each measurement reports the work it did (tokens, bytes, documents, ...), and
  the sides of a comparison are asserted to have done the same (:func:`same_work`), so a ratio
  never compares unequal work.
- **Within what the hardware allows**: a ratio that claims more than the hardware can give
  (two workers more than ``min(2, cores)`` times one worker) is flagged as noise
  (:func:`bounded`) and a report prints the flag instead of the figure.
- **Slopes from fits**: a rate that is a slope (marginal MB/s, a fixed cost) comes from a
  least-squares line over at least three sizes, with the fit's standard errors
  (:func:`fit_line`), never from the difference of two timings.
- **Recorded**: results go to ``benchmarks/results/<name>.json`` with the environment (machine,
  cores, threads, package versions, the commit and whether the tree was dirty); the results
  quoted in the READMEs are committed there and a test checks every quoted figure against the
  file it cites (``tests/test_published_figures.py``).

Standard library only: the model benchmarks run on a GPU machine without Ray or numpy extras.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MIN_REPEATS = 3

PACKAGES = ("torch", "ray", "deepspeed", "tokenizers", "pyarrow", "blingfire", "transformers")


@dataclass(frozen=True)
class Run:
    """One timed measurement: its seconds and the work it did (counts that must match
    between the sides of a comparison)."""

    seconds: float
    work: Mapping[str, int | float] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Samples:
    """Every repeat of one side, in repeat order."""

    name: str
    runs: list[Run] = field(default_factory=list)

    @property
    def seconds(self) -> list[float]:
        return [r.seconds for r in self.runs]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def work(self) -> Mapping[str, int | float]:
        return self.runs[0].work if self.runs else {}

    def rate(self, unit: str) -> Spread:
        """``work[unit]`` per second: median and min-max over the repeats."""
        return Spread.of([r.work[unit] / r.seconds for r in self.runs])

    def summary(self) -> dict[str, Any]:
        s = Spread.of(self.seconds)
        return {"seconds": s.to_dict(), "work": dict(self.work), "repeats": self.seconds}


@dataclass(frozen=True)
class Spread:
    """A median with the min and max it came from."""

    median: float
    low: float
    high: float
    n: int

    @staticmethod
    def of(values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no values")
        return Spread(statistics.median(values), min(values), max(values), len(values))

    def to_dict(self) -> dict[str, float | int]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def fmt(self, nd: int = 2) -> str:
        return f"{self.median:.{nd}f} ({self.low:.{nd}f}-{self.high:.{nd}f})"


@dataclass(frozen=True)
class Ratio:
    """How many times faster ``side`` is than ``base`` (base seconds over side seconds, per
    repeat), with the spread over repeats; ``flag`` says why it is not publishable."""

    side: str
    base: str
    spread: Spread
    flag: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"side": self.side, "base": self.base, **self.spread.to_dict(), "flag": self.flag}

    def fmt(self, nd: int = 2) -> str:
        return f"noise ({self.flag})" if self.flag else self.spread.fmt(nd) + "x"


def interleave(
    sides: Mapping[str, Callable[[], Run]],
    repeats: int,
    *,
    warmup: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Samples]:
    """Run every side ``repeats`` times, in turn within each repeat, the order rotating by one
    each repeat; ``warmup`` runs each side once first, untimed (compilation, caches)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    names = list(sides)
    if warmup:
        for n in names:
            sides[n]()
    out = {n: Samples(n) for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            run = sides[n]()
            out[n].runs.append(run)
            say(f"  repeat {r + 1}/{repeats} {n}: {run.seconds:.3f}s")
    return out


def timed(fn: Callable[[], Mapping[str, int | float] | None]) -> Callable[[], Run]:
    """A side from a function that does the work and returns its counts."""

    def side() -> Run:
        t0 = time.perf_counter()
        work = fn()
        return Run(time.perf_counter() - t0, dict(work or {}))

    return side


def same_work(samples: Mapping[str, Samples], *names: str, keys: Sequence[str] = ()) -> None:
    """Assert that the named sides did the same work in every repeat (all counts, or ``keys``)."""

    def counts(r: Run) -> dict[str, int | float]:
        return {k: v for k, v in r.work.items() if not keys or k in keys}

    ref = samples[names[0]].runs
    for n in names[1:]:
        for a, b in zip(ref, samples[n].runs, strict=True):
            if counts(a) != counts(b):
                raise AssertionError(
                    f"unequal work: {names[0]} did {counts(a)}, {n} did {counts(b)}"
                )
    if any(counts(a) != counts(ref[0]) for a in ref):
        raise AssertionError(f"{names[0]} did different work in different repeats")


def ratio(samples: Mapping[str, Samples], side: str, base: str) -> Ratio:
    """``side``'s speed over ``base``'s (base seconds / side seconds), per repeat."""
    a, b = samples[side].seconds, samples[base].seconds
    return Ratio(side, base, Spread.of([y / x for x, y in zip(a, b, strict=True)]))


def bounded(r: Ratio, limit: float, why: str) -> Ratio:
    """Flag ``r`` when its median exceeds ``limit`` (what the hardware allows, ``why``)."""
    if r.spread.median > limit * 1.05:  # 5%: timer and cache effects, not a second core
        return Ratio(
            r.side, r.base, r.spread, f"{r.spread.median:.2f}x exceeds {limit:.2f}x, {why}"
        )
    return r


def core_bound(workers: int) -> float:
    """The most ``workers`` processes can beat one by on this machine."""
    return float(min(workers, os.cpu_count() or 1))


@dataclass(frozen=True)
class Fit:
    """y = intercept + slope * x by least squares, with standard errors."""

    slope: float
    intercept: float
    slope_se: float
    intercept_se: float
    r2: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def fit_line(x: Sequence[float], y: Sequence[float]) -> Fit:
    """Least squares over at least three distinct x (two points leave no error to report)."""
    if len(set(x)) < 3 or len(x) != len(y):
        raise ValueError("a fit needs at least three distinct sizes")
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    slope = sxy / sxx
    intercept = my - slope * mx
    resid = [b - (intercept + slope * a) for a, b in zip(x, y, strict=True)]
    ss_res = sum(r * r for r in resid)
    ss_tot = sum((b - my) ** 2 for b in y)
    s2 = ss_res / (n - 2) if n > 2 else 0.0
    slope_se = math.sqrt(s2 / sxx)
    intercept_se = math.sqrt(s2 * (1 / n + mx * mx / sxx))
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return Fit(slope, intercept, slope_se, intercept_se, r2, n)


def rate_of(fit: Fit) -> tuple[float, float]:
    """The marginal rate 1/slope (x units per second when y is seconds) and its standard error
    (first-order propagation: se(1/s) = se(s)/s^2)."""
    if fit.slope <= 0:
        return math.inf, math.inf
    return 1 / fit.slope, fit.slope_se / fit.slope**2


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict[str, Any]:
    """What a result was measured on: machine, cores, threads, versions, commit."""
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            continue
    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "versions": versions,
        "threads_env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS") if k in os.environ
        },
        "commit": _git("rev-parse", "--short=12", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    return env


def write_result(name: str, payload: Mapping[str, Any], out: str | Path | None = None) -> Path:
    """``payload`` with the environment as ``benchmarks/results/<name>.json`` (or ``out``)."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "environment": environment(), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_default, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def _default(x: Any) -> Any:
    if hasattr(x, "to_dict"):
        return x.to_dict()
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    raise TypeError(f"not JSON: {type(x).__name__}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
