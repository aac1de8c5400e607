"""Results: the machine, one table per scenario, as text or as JSON.

Every row compares a measured value with its baseline in the same run, and
the ratio is always ``value / baseline``; whether higher is better is said
per row, so a reader never has to guess which way a ratio points.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO


@dataclass(frozen=True, slots=True)
class Row:
    metric: str
    unit: str
    value: float
    baseline: float | None  # None: the baseline could not be measured
    better: Literal["higher", "lower"]

    @property
    def ratio(self) -> float | None:
        return self.value / self.baseline if self.baseline else None


@dataclass(slots=True)
class Table:
    scenario: str
    title: str
    columns: tuple[str, str] = ("ipcd", "raw")
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(
        self, metric: str, unit: str, value: float, baseline: float | None, better: Literal["higher", "lower"]
    ) -> None:
        self.rows.append(Row(metric, unit, value, baseline, better))


def latency_rows(table: Table, label: str, value_ns: list[int], baseline_ns: list[int]) -> None:
    """p50, p99 and mean rows, in microseconds, from two lists of samples."""
    for name, pick in (("p50", _p50), ("p99", _p99), ("mean", statistics.fmean)):
        table.add(f"{label} {name}", "us", pick(value_ns) / 1000, pick(baseline_ns) / 1000, "lower")


def _p50(samples: list[int]) -> float:
    return float(statistics.median(samples))


def _p99(samples: list[int]) -> float:
    ordered = sorted(samples)
    return float(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))])


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": f"{platform.system()} {platform.release()}",
    }


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def print_text(tables: list[Table], settings: dict[str, Any], problems: list[str], out: TextIO) -> None:
    info = machine()
    print(f"command : {shlex.join([Path(sys.executable).name, '-m', 'benchmarks', *sys.argv[1:]])}", file=out)
    print(f"machine : {info['cpus']} x {info['cpu_model']}; {info['kernel']}; {info['python']}", file=out)
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), file=out)
    print("ratio   = value / baseline (same run); 'better' says which way is good", file=out)
    for table in tables:
        print(file=out)
        print(f"== {table.scenario}: {table.title}", file=out)
        head = ["metric", "unit", table.columns[0], table.columns[1], "ratio", "better"]
        body = [
            [r.metric, r.unit, _fmt(r.value), _fmt(r.baseline), _fmt(r.ratio), r.better] for r in table.rows
        ]
        widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
        for line in [head, *body]:
            cells = [
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
            ]
            print("  " + "  ".join(cells).rstrip(), file=out)
        for note in table.notes:
            print(f"  note: {note}", file=out)
    if problems:
        print(file=out)
        print("problems seen:", file=out)
        for problem in problems:
            print(f"  - {problem}", file=out)


def print_json(tables: list[Table], settings: dict[str, Any], problems: list[str], out: TextIO) -> None:
    doc = {
        "command": [sys.executable, "-m", "benchmarks", *sys.argv[1:]],
        "machine": machine(),
        "settings": settings,
        "scenarios": [
            {
                "name": t.scenario,
                "title": t.title,
                "columns": list(t.columns),
                "rows": [{**asdict(r), "ratio": r.ratio} for r in t.rows],
                "notes": t.notes,
            }
            for t in tables
        ],
        "problems": problems,
    }
    json.dump(doc, out, indent=2)
    print(file=out)
