"""sdbot's version, written once: `version` in pyproject.toml.

Read from the installed package's metadata; a source checkout that is not installed
reads pyproject.toml itself. Torch-free: the PNG infotext (`Version: sdbot X`) and
the trained LoRA files' metadata (`sdbot_version`) both use it.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@cache
def sdbot_version() -> str:
    """e.g. "0.1.0"; "unknown" only when neither the metadata nor pyproject.toml exist."""
    try:
        return version("sdbot")
    except PackageNotFoundError:
        return _from_pyproject(PYPROJECT)


def _from_pyproject(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    try:
        import tomllib
    except ImportError:  # Python 3.10: the [project] table's `version = "…"` line
        found = re.search(r'^\[project\][^\[]*?^version\s*=\s*"([^"]+)"', text, re.M | re.S)
        return found.group(1) if found else "unknown"
    return str(tomllib.loads(text).get("project", {}).get("version", "unknown"))
