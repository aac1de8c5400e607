"""Building the benchmarks' C clients: one gcc step for all of them.

The load generators are C so that the client is never what limits a
server; each scenario compiles its own source into the run's temp dir.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from benchmarks.load import BenchError


def compile_c(source: Path, binary: Path, what: str) -> Path:
    """``binary`` built from ``source`` with gcc -O2; BenchError (naming
    ``what`` the client is for) without gcc or when it fails."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BenchError(f"{what}: needs gcc for its C client")
    result = subprocess.run(
        [gcc, "-O2", "-Wall", "-o", str(binary), str(source)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise BenchError(f"{what}: gcc failed on {source.name}: {result.stderr.strip()}")
    return binary
