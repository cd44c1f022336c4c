"""Every family's component sizes as published, counted on the meta device from the
configs in bench/configs/ by `python bench/component_sizes.py --write`. The planner uses
them when a model's own files cannot be read.

The table itself is generated data, so it lives in `published_sizes.json` next to this
file (shipped as package data, see pyproject.toml); this module only reads it."""

import json
from pathlib import Path

TABLE = Path(__file__).with_suffix(".json")

# family → component → ComponentSize fields (params, stored_bytes, stored_dtype, ...)
PUBLISHED_SIZES: dict[str, dict[str, dict[str, int | str]]] = json.loads(TABLE.read_text())
