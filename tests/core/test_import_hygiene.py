"""No folder or module of the repository shadows an installed distribution.

Whenever the repository root is on ``sys.path`` (``python -m pytest``, a script started from the
root, ``PYTHONPATH=<repo>``), a top-level package of ours with an ``__init__.py`` would win over an
installed distribution of the same name: the top-level ``kernels/`` once hid Hugging Face's
``kernels``, which transformers imports, and every ``python -m pytest`` broke at collection.
"""
import importlib
import importlib.metadata
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OURS = {"fused_balance"}

# What a user's script does first: import the library beside transformers and PEFT, including the
# model classes (transformers imports `kernels` through its hub-kernels integration).
PROBE = textwrap.dedent("""
    import kernels
    import transformers, peft, fused_balance
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from fused_balance.kernels import pointer_table
    print("kernels:", getattr(kernels, "__file__", None))
""")


def _installed_kernels_file():
    """``kernels/__init__.py`` of the installed distribution, or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return str(Path(dist.locate_file("kernels/__init__.py")).resolve())


def _run(args, cwd, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("how", ["c-from-root", "pythonpath-repo", "m-from-root"])
def test_imports_from_the_repository_root_resolve_to_installed_distributions(tmp_path, how):
    if how == "c-from-root":  # sys.path[0] is '' (the root)
        run = _run(["-c", PROBE], cwd=REPO)
    elif how == "pythonpath-repo":  # from elsewhere, the root on PYTHONPATH
        run = _run(["-c", PROBE], cwd=tmp_path, pythonpath=REPO)
    else:  # python -m: sys.path[0] is the working directory
        (tmp_path / "import_probe.py").write_text(PROBE)
        run = _run(["-m", "import_probe"], cwd=REPO, pythonpath=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    got = run.stdout.strip().splitlines()[-1].removeprefix("kernels: ")
    want = _installed_kernels_file()
    if want is None:  # only our folder, as a namespace portion: no file of ours stands for `kernels`
        assert got == "None", got
    else:
        assert str(Path(got).resolve()) == want, (got, want)


def _pythonpath_folders():
    """The folders this repository puts on sys.path: its root, and pytest's ``pythonpath``."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    extra = config["tool"]["pytest"]["ini_options"].get("pythonpath", [])
    return [REPO, *(REPO / p for p in extra)]


def _regular_top_level_names(folder: Path):
    """Names a folder on sys.path makes importable as regular modules or packages (a folder
    without ``__init__.py`` is a namespace portion, which any regular package outranks)."""
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix == ".py":
            yield entry.stem
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            yield entry.name


def test_no_repository_name_is_an_installed_distribution_name():
    installed = importlib.metadata.packages_distributions()  # top-level name -> distributions
    clashes = {}
    for folder in _pythonpath_folders():
        for name in _regular_top_level_names(folder):
            owners = [d for d in installed.get(name, []) if d.replace("-", "_").lower() != "fused_balance"]
            if name not in OURS and owners:
                clashes[str(folder.relative_to(REPO) / name) if folder != REPO else name] = owners
    assert not clashes, f"these repository names shadow installed distributions: {clashes}"


def test_top_level_kernels_is_a_namespace_portion_reached_as_fused_balance_kernels():
    """The layout promised to users (kernels/ at the top) without a top-level package."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    link = REPO / "fused_balance" / "kernels"
    assert link.is_symlink() and link.resolve() == (REPO / "kernels").resolve()
    import fused_balance.kernels as package
    assert [Path(p).resolve() for p in package.__path__] == [(REPO / "kernels").resolve()]


def _library_modules() -> list[str]:
    """Every module of the package that imports without optional extras (triton kernels aside:
    importing them loads Triton, which has its own tests)."""
    root = Path(__file__).resolve().parents[2] / "fused_balance"
    names = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        if "kernels" in rel.parts:
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        names.append(".".join(parts))
    return names


@pytest.mark.parametrize("module", _library_modules())
def test_every_name_in_a_module_all_exists(module):
    """``from module import *`` must not fail on a name the module promises but does not define."""
    mod = importlib.import_module(module)
    missing = [name for name in getattr(mod, "__all__", ()) if not hasattr(mod, name)]
    assert not missing, f"{module}.__all__ names undefined {missing}"
