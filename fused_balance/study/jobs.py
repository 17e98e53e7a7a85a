"""Resumable jobs: a finished job is a JSON file holding its result and settings; a rerun with
the same settings reads it back instead of running again."""
from __future__ import annotations

import json
from pathlib import Path


def run_job(path: Path, fn, settings: dict, report_only: bool = False) -> dict | None:
    """The job's result: read back when a finished file with the same settings exists, else run
    (``report_only``: never run, None when missing)."""
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("settings") == json.loads(json.dumps(settings)):
            return stored
    if report_only:
        return None
    result = fn()
    result["settings"] = settings
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)  # atomic: an interrupted write never looks finished
    return result
