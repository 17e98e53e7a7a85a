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


class _InlineExecutor:
    """``submit`` runs at once in this process (one worker: no process to start)."""

    def submit(self, fn, *args):
        from concurrent.futures import Future

        future = Future()
        future.set_result(fn(*args))
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_staged(seeds, first, then, workers: int, bar) -> tuple[dict, dict]:
    """Per seed a first job (``first(seed) -> (fn, *args)``, e.g. a pretraining that caches its
    model), then, once it finished, that seed's jobs (``then(seed) -> {key: (fn, *args)}``), in
    ``workers`` spawned processes (one: inline). Returns ({seed: first result}, {key: result});
    ``bar`` advances once per job."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1
            else _InlineExecutor())
    firsts, found = {}, {}
    with pool:
        pending = {pool.submit(*first(seed)): ("first", seed) for seed in seeds}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                stage, key = pending.pop(future)
                if stage == "first":  # the seed's model is ready: its jobs may start
                    firsts[key] = future.result()
                    pending.update({pool.submit(*job): ("then", k) for k, job in then(key).items()})
                else:
                    found[key] = future.result()
                bar.set_postfix_str(f"{' '.join(map(str, key if isinstance(key, tuple) else (key,)))} done")
                bar.update(1)
    return firsts, found


def cached_model(folder: Path, settings: dict, make, build) -> tuple:
    """A model made once per ``settings``: loaded from ``folder`` (``pretrained.pt`` and
    ``pretrained.json``) when it was made with the same settings (``build()``: the empty model its
    weights load into), else ``make() -> (model, info)`` and stored there. Returns the model and
    its info, with ``info["cached"]`` saying which."""
    import torch

    settings = json.loads(json.dumps(settings))
    info_path, weights_path = folder / "pretrained.json", folder / "pretrained.pt"
    if info_path.exists() and weights_path.exists():
        info = json.loads(info_path.read_text())
        if info["settings"] == settings:
            model = build()
            model.load_state_dict(torch.load(weights_path, weights_only=True))
            return model, {**info, "cached": True}
    model, info = make()
    info["settings"] = settings
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights_path.with_suffix(".tmp"))
    weights_path.with_suffix(".tmp").replace(weights_path)
    info_path.write_text(json.dumps(info))  # written last: its presence means the weights are whole
    return model, {**info, "cached": False}


def in_worker() -> None:
    """A job process's settings: one torch thread, library warnings off."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
