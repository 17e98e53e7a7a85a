"""Build (JIT, with ninja) and load the C++/CUDA extension that registers torch.ops.fused_balance.*.

The sources are the package's ``csrc/`` folder in an installed wheel (the build ships them as
package data) or the checkout's top-level ``csrc/`` in an editable install; every ``*.cpp`` (and,
when CUDA builds, every ``*.cu``) in it is compiled, so a new source file needs no registration here.

The build lands in a cache folder keyed on the torch version, CUDA-or-not and a hash of the sources
and flags, so a stale build is never loaded: ``$FUSED_BALANCE_BUILD_DIR`` if set, else
``~/.cache/fused_balance/``. CUDA kernels are compiled when torch has CUDA and a CUDA toolkit is
found (``CUDA_HOME``/``CUDA_PATH``, else ``/usr/local/cuda``: a folder with ``bin/nvcc`` and
``lib64/libcudart.so``); ``FUSED_BALANCE_NO_CUDA=1`` builds the CPU kernels only.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["build", "load", "is_built", "build_info", "EXTENSION_NAME", "CSRC_DIR"]

EXTENSION_NAME = "fused_balance_C"
# What the wheel ships from csrc/ (pyproject.toml's package-data lists the same patterns) and
# what the build hash covers: the checkout and an installed wheel share one cached build.
SOURCE_PATTERNS = ("*.cpp", "*.cu", "*.h", "*.cuh")


def _find_sources() -> Path:
    """The installed package's csrc/ first, else the checkout's (editable install)."""
    package = Path(__file__).resolve().parent
    candidates = (package / "csrc", package.parent / "csrc")
    return next((c for c in candidates if any(c.glob("*.cpp"))), candidates[-1])


CSRC_DIR = _find_sources()

# -ffp-contract=off: no silent FMA contraction, so the combine / AdamW roundings are those of the
# reference on every ISA path. -fno-math-errno lets sqrt vectorise; it is not -ffast-math.
_CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
# at::parallel_for is inline: with torch's OpenMP backend its `#pragma omp parallel` is compiled in
# our own translation units, which run serially unless built with -fopenmp. Linking -fopenmp adds
# libgomp.so.1, which resolves to the copy torch has already loaded (one thread pool).
_OPENMP = bool(getattr(torch._C, "has_openmp", False)) and os.name != "nt" and sys.platform != "darwin"
if _OPENMP:
    _CXX_FLAGS.append("-fopenmp")
_LD_FLAGS = ["-fopenmp"] if _OPENMP else []
CUDA_ARCHS = ["sm_80", "sm_90", "compute_90"]
_NVCC_FLAGS = [
    "-O3",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",  # PTX for newer GPUs
    "-Xcompiler=-ffp-contract=off",
    # No silent FMA contraction in device code either (the host has -ffp-contract=off): the CPU
    # and GPU round alike (1 - lr*wd, the policy solve); the hot loops call __fma_rn explicitly.
    "--fmad=false",
]

_lock = threading.Lock()
_module = None
_last_build_seconds: float | None = None
_spec_cache: "_BuildSpec | None" = None


@dataclass(frozen=True)
class _BuildSpec:
    cuda: bool
    cuda_home: str | None
    cuda_reason: str
    sources: tuple[str, ...]
    cflags: tuple[str, ...]
    cuda_cflags: tuple[str, ...]
    build_dir: Path


def _toolkit_candidates() -> list[str]:
    named = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    found = [c for c in named if c]
    found.append("/usr/local/cuda")
    found += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return found


def _is_toolkit(root: str) -> bool:
    return (Path(root) / "bin" / "nvcc").is_file() and (Path(root) / "lib64" / "libcudart.so").exists()


def _nvcc_release(root: str) -> str | None:
    try:
        text = subprocess.run([str(Path(root) / "bin" / "nvcc"), "--version"], capture_output=True,
                              text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", text)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _find_cuda() -> tuple[str | None, str]:
    """(toolkit root or None, why)."""
    if os.environ.get("FUSED_BALANCE_NO_CUDA", "") not in ("", "0"):
        return None, "CUDA disabled by FUSED_BALANCE_NO_CUDA"
    if not (torch.version.cuda and torch.cuda._is_compiled()):
        return None, f"torch {torch.__version__} is built without CUDA"
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit and not _is_toolkit(explicit):
        return None, f"CUDA_HOME={explicit} has no bin/nvcc and lib64/libcudart.so"
    root = next((c for c in _toolkit_candidates() if _is_toolkit(c)), None)
    if root is None:
        return None, "no CUDA toolkit found (set CUDA_HOME to a folder with bin/nvcc and lib64/libcudart.so)"
    release = _nvcc_release(root)
    if release is None:
        return None, f"{root}/bin/nvcc does not run"
    if release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return None, f"nvcc {release} at {root} does not match torch's CUDA {torch.version.cuda}"
    return root, f"compiled for {', '.join(CUDA_ARCHS)} with nvcc {release} at {root}"


def _cache_root() -> Path:
    env = os.environ.get("FUSED_BALANCE_BUILD_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fused_balance"


def _build_spec(cpu_only_reason: str | None = None) -> _BuildSpec:
    """The build to use (cached); cpu_only_reason replaces it with a CPU-only build."""
    global _spec_cache
    if _spec_cache is not None and cpu_only_reason is None:
        return _spec_cache
    cuda_home, reason = _find_cuda() if cpu_only_reason is None else (None, cpu_only_reason)
    cuda = cuda_home is not None
    sources = sorted(str(p) for p in CSRC_DIR.glob("*.cpp"))
    if not sources:
        raise FileNotFoundError(f"no C++ sources (*.cpp) in {CSRC_DIR}: the package is installed "
                                "without its csrc/ folder")
    if cuda:
        sources += sorted(str(p) for p in CSRC_DIR.glob("*.cu"))
    cflags = list(_CXX_FLAGS) + (["-DFUSED_BALANCE_WITH_CUDA=1"] if cuda else [])
    cuda_cflags = list(_NVCC_FLAGS) if cuda else []
    digest = hashlib.sha256()
    for path in sorted({p for pattern in SOURCE_PATTERNS for p in CSRC_DIR.glob(pattern)}):  # headers too
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    # The toolkit's real path, so /usr/local/cuda and the folder it links to share one build.
    toolkit = os.path.realpath(cuda_home) if cuda_home else None
    digest.update(repr((cflags, cuda_cflags, _LD_FLAGS, toolkit, sysconfig.get_config_var("EXT_SUFFIX"),
                        sys.version_info[:2])).encode())
    tag = f"torch{torch.__version__}-{'cu' + torch.version.cuda if cuda else 'cpu'}-{digest.hexdigest()[:16]}"
    tag = re.sub(r"[^A-Za-z0-9._-]", "_", tag)
    _spec_cache = _BuildSpec(cuda, cuda_home, reason, tuple(sources), tuple(cflags), tuple(cuda_cflags),
                        _cache_root() / tag)
    return _spec_cache


def _library_path(spec: _BuildSpec) -> Path:
    return spec.build_dir / f"{EXTENSION_NAME}{'.pyd' if os.name == 'nt' else '.so'}"


# Written after a build succeeded: its presence (not the library file, which the linker writes in
# place, nor torch's lock file, which torch >= 2.14 leaves behind) says the build is finished.
_FINISHED = "fused_balance.built"
# Our own build lock, an OS advisory lock (released when its holder dies) on a file holding the
# holder's pid and start time, so a waiting process can say whom it waits for.
_BUILD_LOCK = "fused_balance.build-lock"
# How long a process waits for another one's build before giving up (seconds; a cold CUDA build
# of every kernel takes minutes on a loaded 2-core machine).
_DEFAULT_WAIT_S = 1800.0


def _is_finished(spec: _BuildSpec) -> bool:
    return (spec.build_dir / _FINISHED).exists() and _library_path(spec).exists()


def is_built() -> bool:
    """Whether the extension is loaded or compiled on disk for the current sources (never builds)."""
    return _module is not None or _is_finished(_build_spec())


def _import_cpp_extension():
    """torch.utils.cpp_extension, without its import-time warning about guessing CUDA_HOME from a
    `which nvcc` that points outside a toolkit (we set CUDA_HOME ourselves before building)."""
    import logging

    if "torch.utils.cpp_extension" in sys.modules:
        return sys.modules["torch.utils.cpp_extension"]
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _import_built(library: Path):
    """Import a finished build directly. The build folder is keyed on the sources' content, not
    their location, so the checkout and an installed wheel share it; going through ninja instead
    would rebuild whenever the sources' path differs from the one recorded in build.ninja."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(EXTENSION_NAME, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _BuildLock:
    """An exclusive advisory lock on ``build_dir/fused_balance.build-lock``. Waiting prints whom it
    waits for (pid, for how long) and gives up after ``$FUSED_BALANCE_BUILD_WAIT`` seconds (default
    1800) with a TimeoutError naming the holder, never silently forever."""

    def __init__(self, build_dir: Path):
        self.path = build_dir / _BUILD_LOCK
        self.file = None

    def _holder(self) -> str:
        try:
            pid, started = self.path.read_text().split()[:2]
            return f"process {pid} (building for {time.time() - float(started):.0f} s)"
        except (OSError, ValueError):
            return "another process"

    def __enter__(self):
        import fcntl

        wait_s = float(os.environ.get("FUSED_BALANCE_BUILD_WAIT", _DEFAULT_WAIT_S))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        start = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self._holder()
                waited = time.monotonic() - start
                if waited >= wait_s:
                    self.file.close()
                    raise TimeoutError(
                        f"fused_balance: gave up after {waited:.0f} s waiting for {holder} to finish the "
                        f"extension build in {self.path.parent} (FUSED_BALANCE_BUILD_WAIT={wait_s:g}); "
                        "if no such build runs, delete that folder and retry") from None
                if not told:
                    print(f"fused_balance: waiting for {holder} to finish the extension build in "
                          f"{self.path.parent} (giving up after {wait_s:g} s)", file=sys.stderr, flush=True)
                    told = True
                time.sleep(min(1.0, max(0.05, wait_s - waited)))
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()} {time.time():.3f}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def _compile(spec: _BuildSpec, verbose: bool):
    library = _library_path(spec)
    # A finished build is imported directly, wherever the sources lie: the folder is keyed on their
    # content, so a checkout and an installed wheel share it (ninja would rebuild whenever the
    # sources' path differs from the one recorded in build.ninja).
    if _is_finished(spec):
        try:
            return _import_built(library)
        except ImportError:
            pass  # a damaged file: rebuild it below
    with _BuildLock(spec.build_dir):
        finished = spec.build_dir / _FINISHED
        if _is_finished(spec):  # another process built it while we waited
            try:
                return _import_built(library)
            except ImportError:
                pass
        finished.unlink(missing_ok=True)
        cpp_extension = _import_cpp_extension()
        if spec.cuda:
            # torch guesses the toolkit from `which nvcc` at import time, which may be a wrapper
            # script outside the toolkit: point both the environment and the module at the real root.
            os.environ["CUDA_HOME"] = spec.cuda_home
            cpp_extension.CUDA_HOME = spec.cuda_home
        module = cpp_extension.load(
            name=EXTENSION_NAME,
            sources=list(spec.sources),
            extra_cflags=list(spec.cflags),
            extra_cuda_cflags=list(spec.cuda_cflags),
            extra_ldflags=list(_LD_FLAGS),
            build_directory=str(spec.build_dir),
            with_cuda=spec.cuda,
            verbose=verbose and os.environ.get("FUSED_BALANCE_VERBOSE_BUILD", "") not in ("", "0"),
        )
        finished.write_text(f"{spec.build_dir.name}\n")
        return module


def build(verbose: bool = True):
    """Compile (if needed) and import the extension; returns the Python module. Loading registers
    the ops torch.ops.fused_balance.{gram, combine, combine_into, balanced_adamw_}."""
    global _module, _last_build_seconds
    with _lock:
        if _module is not None:
            return _module
        spec = _build_spec()
        fresh = not _is_finished(spec)
        if verbose and fresh:
            what = "C++/CUDA" if spec.cuda else "C++ (CPU only: " + spec.cuda_reason + ")"
            print(f"fused_balance: building the {what} extension (first use, a few minutes) "
                  f"in {spec.build_dir} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            module = _compile(spec, verbose)
        except TimeoutError:
            raise  # waited too long for another process's build: not a CUDA failure
        except Exception as exc:
            if not spec.cuda:
                raise
            # Keep the CPU kernels usable; the reason is reported by build_info() and the tests
            # fail when a toolkit exists but CUDA was not compiled.
            print(f"fused_balance: the CUDA build failed ({type(exc).__name__}: {exc}); "
                  "building the CPU kernels only", file=sys.stderr, flush=True)
            spec = _build_spec(cpu_only_reason=f"CUDA build failed: {type(exc).__name__}: {str(exc)[:500]}")
            module = _compile(spec, verbose)
        _last_build_seconds = time.perf_counter() - start
        if verbose and fresh:
            print(f"fused_balance: extension built in {_last_build_seconds:.0f} s "
                  f"(CUDA kernels: {'yes' if module.cuda_compiled() else 'no'}; "
                  f"CPU path: {module.cpu_isa()})", file=sys.stderr, flush=True)
        _module = module
        return module


def load():
    """The extension module, built on first use and cached for the process."""
    return _module if _module is not None else build(verbose=True)


def loaded():
    """The extension module if this process has loaded it already, else None (never builds)."""
    return _module


def _predicted_cpu_isa() -> str:
    forced = os.environ.get("FUSED_BALANCE_CPU_ISA")
    if forced:
        return forced
    cap = torch.backends.cpu.get_cpu_capability()
    return "avx512" if "AVX512" in cap else "avx2" if "AVX2" in cap else "default"


def build_info() -> dict:
    """What was (or would be) built: for `fused-balance info`. Loads an already-compiled extension
    (cheap) but never compiles."""
    spec = _build_spec()
    built = is_built()
    module = None
    if built:
        try:
            module = load()
        except Exception as exc:  # a broken cached build must not break `info`
            return {"built": False, "error": f"{type(exc).__name__}: {exc}", "cuda_compiled": False,
                    "cuda_reason": spec.cuda_reason, "cuda_archs": [], "cpu_isa": _predicted_cpu_isa(),
                    "build_dir": str(spec.build_dir)}
        spec = _build_spec()  # a failed CUDA build replaces the spec
    cuda_compiled = bool(module.cuda_compiled()) if module is not None else False
    return {
        "built": built,
        "cuda_compiled": cuda_compiled,
        "cuda_planned": spec.cuda,
        "cuda_reason": spec.cuda_reason if (cuda_compiled or not spec.cuda or not built)
        else "toolkit found but the loaded build has no CUDA kernels",
        "cuda_archs": list(CUDA_ARCHS) if (cuda_compiled or (spec.cuda and not built)) else [],
        "cpu_isa": module.cpu_isa() if module is not None else _predicted_cpu_isa(),
        "cpu_isas_supported": list(module.supported_cpu_isas()) if module is not None else None,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "build_dir": str(spec.build_dir),
        "build_seconds": _last_build_seconds,
    }
