"""Reading JSON files with errors that name the file (missing, unreadable or not JSON)."""
from __future__ import annotations

import json
import os
from typing import Any


def read_json(path: str, what: str = "JSON file") -> Any:
    """Parsed contents of ``path``; FileNotFoundError / ValueError naming ``what`` and the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
