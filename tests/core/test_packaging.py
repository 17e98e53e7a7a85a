"""The package as a user gets it: an sdist and a wheel built from the sources, the wheel installed
into a fresh virtual environment outside the checkout, used from there. And a broken backend never
breaks the backend registry."""
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from shared import run_process

REPO = Path(__file__).resolve().parents[2]
# The files the wheel must carry from csrc/ (fused_balance/_extension.py's SOURCE_PATTERNS).
NATIVE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")


def _copy_sources(dest: Path) -> None:
    """The checkout's files (tracked, and new ones git does not ignore), without build leftovers."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
        files = [name.decode() for name in listed if name]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an unpacked sdist)
        skip = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", "runs", "bench_out"}
        files = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(REPO).parts)
                 and not any(part.endswith(".egg-info") for part in p.parts)]
    for name in files:
        source, target = REPO / name, dest / name
        if source.is_symlink():  # fused_balance/kernels -> ../kernels stays a link
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.readlink(source))
        elif source.is_file():  # a deleted but still tracked file is not there
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _site_dirs_of(*modules: str) -> list[str]:
    """The folders the named installed packages live in (torch and its dependencies), for the
    fresh environment to import them from without reinstalling them."""
    import importlib.util

    dirs = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            folder = str(Path(spec.origin).resolve().parents[1])
            if folder not in dirs:
                dirs.append(folder)
    return dirs


SMOKE = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    import fused_balance as fb
    from fused_balance import _extension

    venv = Path(sys.argv[1]).resolve()
    assert venv in Path(fb.__file__).resolve().parents, fb.__file__  # the wheel, not the checkout
    assert venv in _extension.CSRC_DIR.resolve().parents, _extension.CSRC_DIR
    # A kernel library: the optional layers' heavy dependencies are not imported with it.
    heavy = sorted({"transformers", "peft", "matplotlib", "accelerate", "torchjd"} & set(sys.modules))
    assert not heavy, heavy
    assert "cpp" in fb.available_backends("cpu"), fb.backends.backend_report()

    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(5, 7, generator=gen), torch.randn(11, generator=gen)] for _ in range(3)]
    G = fb.gram(grads, backend="cpp")
    flat = torch.stack([torch.cat([g.double().flatten() for g in per]) for per in grads])
    torch.testing.assert_close(G[0].double(), flat @ flat.T, rtol=1e-5, atol=1e-5)
    print("smoke ok")
""")


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    pytest.importorskip("build", reason="the `build` package (in the [test] extra) builds the sdist and wheel")
    source = tmp_path / "src"
    _copy_sources(source)
    dist = tmp_path / "dist"
    # Not isolated: the test environment has the build requirements (the [test] extra); the wheel
    # is built from the unpacked sdist, so a file missing from the sdist fails here too.
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]

    native = sorted(p.name for p in (REPO / "csrc").iterdir() if p.suffix in NATIVE_SUFFIXES)
    kernels = sorted(p.name for p in (REPO / "kernels").glob("*.py"))
    assert native and kernels
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in archive.getnames()}
    assert {f"csrc/{n}" for n in native} <= names
    assert {f"fused_balance/kernels/{n}" for n in kernels} <= names  # files, not the checkout's link
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"fused_balance/csrc/{n}" for n in native} <= names
    assert {f"fused_balance/kernels/{n}" for n in kernels} <= names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # The fresh environment imports torch & co. from this one's folders; a path listed in a .pth
    # is not a site folder, so this environment's own .pth files (the editable install) do not run.
    Path(purelib, "test_env_packages.pth").write_text(
        "\n".join(_site_dirs_of("torch", "numpy", "ninja", "triton")) + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "--no-index", "--disable-pip-version-check", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    (cwd / "smoke.py").write_text(SMOKE)
    # The wheel's first use compiles its own sources into a cache of its own (no other process's
    # build or lock is involved); CPU kernels only, which keeps a cold build near two minutes
    # (test_cuda_compile compiles the CUDA sources the wheel carries).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(FUSED_BALANCE_BUILD_DIR=str(tmp_path / "extension-build"), FUSED_BALANCE_NO_CUDA="1")
    run = run_process([str(python), "smoke.py", str(venv)],
                      "the wheel's smoke test, which compiles the C++ extension cold", cwd=cwd, env=env)
    assert run.returncode == 0 and "smoke ok" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    assert "building the C++ (CPU only" in run.stderr, run.stderr[-3000:]  # its own, cold build
    info = run_process([str(venv / "bin" / "fused-balance"), "info"],
                       "`fused-balance info` in the fresh venv (loads the finished build)", cwd=cwd, env=env)
    assert info.returncode == 0 and "cpp" in info.stdout, info.stdout[-3000:] + info.stderr[-3000:]


BROKEN = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    import fused_balance as fb
    from fused_balance import _extension, backends

    _extension.CSRC_DIR = Path(sys.argv[1])  # where an install without its sources would look
    names = fb.available_backends("cpu")
    assert "torch" in names and "cpp" not in names, names
    ok, reason = backends.availability("cpp", "cpu")
    assert not ok and "no C++ sources" in reason, reason
    # 'auto' falls back to a working backend; asking for the broken one names the reason.
    G = fb.gram([[torch.ones(3)], [torch.ones(3)]])
    assert G.shape == (1, 2, 2), G.shape
    try:
        fb.gram([[torch.ones(3)], [torch.ones(3)]], backend="cpp")
    except RuntimeError as exc:
        assert "no C++ sources" in str(exc), exc
    else:
        raise AssertionError("the cpp backend ran without sources")
    print("registry ok")
""")


@pytest.mark.parametrize("layout", ["missing", "empty"])
def test_backend_without_native_sources_is_reported_not_raised(tmp_path, layout):
    """In a fresh process (the extension not loaded yet): the C++ sources absent (a folder that does
    not exist, or one without sources) makes `cpp` unavailable with the reason; the others work."""
    sources = tmp_path / "csrc"
    if layout == "empty":
        sources.mkdir()
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    run = run_process([sys.executable, "-c", BROKEN, str(sources)], "the backend registry without sources",
                      cwd=tmp_path, env=env)
    assert run.returncode == 0 and "registry ok" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
