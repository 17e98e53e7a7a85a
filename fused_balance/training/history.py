"""ParetoLoRA's step history: one entry per recorded step, appended on the device during training
(no host read), turned into statistics and moved to the CPU only when it is read."""
from __future__ import annotations

import json
import math
from collections import deque
from typing import Callable, Iterable, Sequence

import torch

import fused_balance as fb

__all__ = ["StepHistory", "check_history_limit"]


def check_history_limit(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"history_limit must be None (unbounded) or an int >= 1, got {value!r}")
    return value


class StepHistory:
    """The last ``limit`` entries (a ring buffer), one every ``every`` steps when ``enabled``.

    An entry holds step, losses [K], weights [S, K], branch [S], found_inf, stepped, and either
    norms/cosines or, for a planned step, its float64 Gram (``_gram``), which ``read`` turns into
    statistics once. ``dead`` (names of the tensors no objective reached) is stored only when that
    set changed."""

    def __init__(self, limit: int | None = 10_000, every: int = 1, enabled: bool = True):
        self.limit = check_history_limit(limit)
        self.every, self.enabled = max(1, int(every)), enabled
        self._entries: deque = deque(maxlen=self.limit)
        self._on_device = 0  # trailing entries whose tensors still live on the device
        self._dead_key = None  # the reach key last looked at by append
        self._dead_names: list[str] = []  # the dead tensors last named

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def append(self, entry: dict, reach_key, dead: Sequence[str]) -> dict:
        """Add ``entry`` (the oldest beyond ``limit`` drops out); ``dead`` is named in it when the
        reach changed (``reach_key``) and the names differ from the last ones named."""
        if reach_key != self._dead_key and dead != self._dead_names:
            entry["dead"] = list(dead)
            self._dead_names = dead
        self._dead_key = reach_key
        self._entries.append(entry)
        self._on_device += 1
        return entry

    def read(self, statistics: Callable) -> list[dict]:
        """Every entry, on the CPU. ``statistics(gram, weights) -> (gram, weights, norms,
        cosines)`` completes a planned step's entry, once."""
        pending = min(self._on_device, len(self._entries))
        for i in range(len(self._entries) - pending, len(self._entries)):
            entry = self._entries[i]
            if "_gram" in entry:
                _, entry["weights"], entry["norms"], entry["cosines"] = statistics(entry.pop("_gram"),
                                                                                   entry["weights"])
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                    entry[key] = value.cpu()
        self._on_device = 0
        return list(self._entries)

    def load(self, entries: Iterable[dict]) -> None:
        """Replace the entries (a checkpoint's, already on the CPU)."""
        self._entries = deque((dict(e) for e in entries), maxlen=self.limit)
        self._on_device = len(self._entries)
        self._dead_key, self._dead_names = None, []

    @staticmethod
    def records(entries: Sequence[dict], objectives: Sequence[str], segments: Sequence[str]) -> Iterable[dict]:
        """``entries`` (from ``read``) as JSON-ready dicts, one sub-dict per segment."""
        for e in entries:
            segs = []
            for s, seg_name in enumerate(segments):
                rec = {"segment": seg_name,
                       "norms": dict(zip(objectives, e["norms"][s].tolist())),
                       "weights": dict(zip(objectives, e["weights"][s].tolist())),
                       "branch": fb.BRANCH_NAMES.get(int(e["branch"][s]), str(int(e["branch"][s])))}
                if len(objectives) == 2:
                    rec["cosine"] = float(e["cosines"][s, 0, 1])
                else:
                    rec["cosines"] = e["cosines"][s].tolist()
                segs.append(rec)
            losses = e["losses"].tolist()
            record = {"step": e["step"], "losses": dict(zip(objectives, losses)),
                      "nonfinite_losses": [n for n, v in zip(objectives, losses) if not math.isfinite(v)],
                      "found_inf": bool(e["found_inf"]), "stepped": e["stepped"], "segments": segs}
            if "dead" in e:
                record["dead_tensors"] = list(e["dead"])
            yield record

    @classmethod
    def export(cls, path, entries: Sequence[dict], objectives: Sequence[str], segments: Sequence[str]) -> None:
        """The records as JSON lines."""
        with open(path, "w") as f:
            for record in cls.records(entries, objectives, segments):
                f.write(json.dumps(record) + "\n")
