"""The CUDA sources compile for Ampere (sm_80) and Hopper (sm_90) with the extension's own nvcc
flags, and no kernel spills registers beyond MAX_SPILL_BYTES (ptxas -v, no GPU needed).

Device code only (``-cubin``, one arch per nvcc run, two runs at a time): the host pass adds
nothing to the register report and most of the compile time.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fused_balance import _extension

ROOT = Path(__file__).resolve().parents[2]
ARCHS = ("sm_80", "sm_90")
# Spill bytes (stores or loads) per thread allowed in any kernel: 8, today's worst (the fp64
# adamw_mixed_kernel<double, float> on sm_80; 4 B in combine_kernel<double> on sm_90 and two
# bank_cuda adamw_chunks half-precision instances on sm_80): a register or two parked by ptxas,
# not a spilled tile. Anything larger fails.
MAX_SPILL_BYTES = 8


def _nvcc():
    root = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    path = Path(root) / "bin" / "nvcc"
    return str(path) if path.is_file() else shutil.which("nvcc")


def _compile_flags():
    from torch.utils import cpp_extension

    try:
        includes = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6
        includes = cpp_extension.include_paths(cuda=True)
    includes += [sysconfig.get_paths()["include"], str(_extension.CSRC_DIR)]
    # the extension's flags minus its -gencode list (one arch per run here)
    flags = [f for f in _extension._NVCC_FLAGS if not f.startswith("-gencode")]
    flags += list(cpp_extension.COMMON_NVCC_FLAGS) + ["-std=c++20", "-DFUSED_BALANCE_WITH_CUDA=1",
                                                      "-DTORCH_EXTENSION_NAME=fused_balance_ext"]
    return flags + [f"-I{p}" for p in includes]


def parse_ptxas(log: str) -> dict:
    """{(kernel, arch): {registers, stack, spill_stores, spill_loads}} from a ptxas -v log."""
    usage, current = {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line):
            current = (m.group(1), m.group(2))
            usage[current] = dict(registers=None, stack=0, spill_stores=0, spill_loads=0)
        elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                         r"(\d+) bytes spill loads", line)):
            usage[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                  spill_loads=int(m.group(3)))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            usage[current]["registers"] = int(m.group(1))
    return usage


def _compile(nvcc, flags, source, arch, out_dir):
    out = Path(out_dir) / f"{source.stem}.{arch}.cubin"
    proc = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-Xptxas", "-v", *flags, str(source),
                           "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return parse_ptxas(proc.stdout + proc.stderr)


def test_parse_ptxas_reads_every_entry():
    log = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3fooPf\n"
           "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 0 barriers, 360 bytes cmem[0]\n"
           "ptxas info    : Compiling entry function '_Z3barv' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3barv\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 8 registers\n")
    assert parse_ptxas(log) == {
        ("_Z3fooPf", "sm_90"): dict(registers=40, stack=16, spill_stores=8, spill_loads=12),
        ("_Z3barv", "sm_90"): dict(registers=8, stack=0, spill_stores=0, spill_loads=0)}


def test_cuda_kernels_compile_for_sm80_and_sm90_without_spills():
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME, /usr/local/cuda, PATH)")
    sources = sorted(Path(_extension.CSRC_DIR).glob("*.cu"))
    assert sources, _extension.CSRC_DIR
    flags = _compile_flags()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as pool:
        runs = [(s, a, pool.submit(_compile, nvcc, flags, s, a, tmp)) for s in sources for a in ARCHS]
        usage = {}
        for source, arch, future in runs:
            found = future.result()
            assert found, f"no kernel reported by ptxas for {source.name} {arch}"
            usage.update({(source.name,) + key: value for key, value in found.items()})
    table = "\n".join(f"{f:16} {a:6} {u['registers']:4} regs {u['stack']:5} B stack "
                      f"{u['spill_stores']:5} B st {u['spill_loads']:5} B ld  {k}"
                      for (f, k, a), u in sorted(usage.items()))
    print(table, file=sys.stderr)
    assert {a for (_, _, a) in usage} == set(ARCHS)
    spilling = [line for line, u in zip(table.splitlines(), (usage[k] for k in sorted(usage)))
                if max(u["spill_stores"], u["spill_loads"]) > MAX_SPILL_BYTES]
    assert not spilling, "\n".join(spilling)


CONTRACTIBLE = """
extern "C" __global__ void decay(double* out, const double* lr, const double* wd) {
  out[0] = 1.0 - lr[0] * wd[0];  // the host computes this with two roundings (-ffp-contract=off)
}
"""


def _cuobjdump():
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.is_file() else shutil.which("cuobjdump")


def test_device_code_is_not_contracted_into_fma_as_the_host_is_not(tmp_path):
    """With nvcc's default --fmad=true, ``1 - lr*wd`` becomes one DFMA (one rounding) on the GPU
    and two roundings on the CPU: the extension's flags must keep them alike."""
    nvcc, cuobjdump = _nvcc(), _cuobjdump()
    if nvcc is None or cuobjdump is None:
        pytest.skip("nvcc or cuobjdump not found")
    source = tmp_path / "decay.cu"
    source.write_text(CONTRACTIBLE)
    flags = [f for f in _extension._NVCC_FLAGS if not f.startswith("-gencode")]
    cubin = tmp_path / "decay.cubin"
    subprocess.run([nvcc, "-cubin", "-arch=sm_90", *flags, str(source), "-o", str(cubin)], check=True,
                   capture_output=True, timeout=300)
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True,
                          timeout=120).stdout
    assert "DMUL" in sass and "DADD" in sass, sass[-2000:]
    assert "DFMA" not in sass, sass[-2000:]


def sass_by_function(sass: str) -> dict:
    """{mangled kernel name: its SASS} from ``cuobjdump -sass`` output."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_sass_by_function_splits_kernels():
    sass = ("\tcode for sm_90\n\t\tFunction : _Z1av\n\t/*0000*/ LDG.E.128 R4, desc[UR4][R2.64] ;\n"
            "\t\t..........\n\n\t\tFunction : _Z1bv\n\t/*0000*/ LDG.E R4, desc[UR4][R2.64] ;\n")
    found = sass_by_function(sass)
    assert list(found) == ["_Z1av", "_Z1bv"]
    assert "LDG.E.128" in found["_Z1av"] and "LDG.E.128" not in found["_Z1bv"]


def _sm90_sass(source_name: str, tmp_path) -> str:
    """The sm_90 SASS of one csrc/*.cu file (nvcc, then cuobjdump); skips without the tools."""
    nvcc, cuobjdump = _nvcc(), _cuobjdump()
    if nvcc is None or cuobjdump is None:
        pytest.skip("nvcc or cuobjdump not found")
    _compile(nvcc, _compile_flags(), Path(_extension.CSRC_DIR) / source_name, "sm_90", tmp_path)
    cubin = tmp_path / (Path(source_name).stem + ".sm_90.cubin")
    return subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True,
                          timeout=300).stdout


# The plan's bank kernels (bank_cuda.cu), by mangled template arguments: float32, float64, bf16, fp16
# gradients (combine; the K <= 8 Gram, with its KMAX), and (gradient, parameter) dtype pairs (AdamW).
BANK_KERNEL = re.compile(r"(combine_chunks|adamw_chunks|gram_partials)I(\w+?)EEvPK")


def test_plan_bank_kernels_move_data_in_128_bit_accesses(tmp_path):
    """combine_chunks, adamw_chunks and the K <= 8 Gram (gram_partials) stream every element of
    the bank (and the output and the AdamW state) once: they are bandwidth-bound only if the
    element loop issues 16-byte loads (LDG.E.128 in the sm_90 SASS, as the list API's
    combine_kernel) and, where they write, 16-byte stores (STG.E.128); one element per thread and
    access leaves them latency-bound (no LDG.E.128 at all)."""
    sass = _sm90_sass("bank_cuda.cu", tmp_path)
    kernels = {}
    for name, code in sass_by_function(sass).items():
        if m := BANK_KERNEL.search(name):
            kernels[(m.group(1), m.group(2))] = code
    assert ("combine_chunks", "f") in kernels and ("adamw_chunks", "ff") in kernels, sorted(kernels)
    assert ("gram_partials", "fLi8E") in kernels, sorted(kernels)
    assert sum(k == "combine_chunks" for k, _ in kernels) == 4, sorted(kernels)
    assert sum(k == "adamw_chunks" for k, _ in kernels) == 16, sorted(kernels)
    assert sum(k == "gram_partials" for k, _ in kernels) == 12, sorted(kernels)  # 4 dtypes x KMAX 2, 4, 8
    counts = {key: (len(re.findall(r"\bLDG\.E\.128\b", code)), len(re.findall(r"\bSTG\.E\.128\b", code)))
              for key, code in kernels.items()}
    print("\n".join(f"{k:15} {t:24} {ld:3} LDG.E.128 {st:3} STG.E.128" for (k, t), (ld, st) in
                    sorted(counts.items())), file=sys.stderr)
    scalar_only = {key: c for key, c in counts.items()
                   if c[0] == 0 or (c[1] == 0 and key[0] != "gram_partials")}  # the Gram writes partials only
    assert not scalar_only, f"no 128-bit global load or store in {sorted(scalar_only)}"


# The list API's AdamW fast path (adamw_cuda.cu), by mangled (gradient, state) dtypes; not
# adamw_mixed_kernel, the general path for moments in another dtype than the parameters'.
LIST_ADAMW_KERNEL = re.compile(r"(?<=\d)adamw_kernelI(\w+?)EEvNS0_4Meta")


def test_list_adamw_kernel_element_loop_is_typed_and_vectorised(tmp_path):
    """adamw_kernel is compiled per (gradient, parameter/moment) dtype pair: its element loop has
    no run-time dtype switch (no BRX jump table, as load_as / store_as compile to), reaches the
    data through global pointers read once per chunk (no generic LD.E / ST.E, which pointers read
    per element from the table or from shared memory become), and moves the data in 16-byte
    accesses (LDG.E.128 / STG.E.128 in the sm_90 SASS, as the plan's adamw_chunks)."""
    sass = _sm90_sass("adamw_cuda.cu", tmp_path)
    kernels = {m.group(1): code for name, code in sass_by_function(sass).items()
               if (m := LIST_ADAMW_KERNEL.search(name))}
    assert "ff" in kernels, sorted(kernels)
    patterns = {"LDG.E.128": r"\bLDG\.E\.128\b", "STG.E.128": r"\bSTG\.E\.128\b", "BRX": r"\bBRX\b",
                "LD.E*": r"(?<![\w.])LD\.E\b", "ST.E*": r"(?<![\w.])ST\.E\b"}  # LD.E*: generic, any width
    ops = {t: {op: len(re.findall(pattern, code)) for op, pattern in patterns.items()} for t, code in kernels.items()}
    print("\n".join(f"adamw_kernel {t:24} {c}" for t, c in sorted(ops.items())), file=sys.stderr)
    bad = {t: c for t, c in ops.items()
           if c["LDG.E.128"] == 0 or c["STG.E.128"] == 0 or c["BRX"] or c["LD.E*"] or c["ST.E*"]}
    assert not bad, f"scalar, generic or dtype-switching accesses in {bad}"
    assert len(kernels) == 16, sorted(kernels)  # 4 gradient x 4 parameter dtypes


def innermost_loops(code: str) -> list:
    """The bodies (lists of instruction texts) of the loops of one kernel's SASS that contain no
    other loop: the instructions from a backward branch's target to the branch."""
    instrs = [(int(m.group(1), 16), m.group(2).strip())
              for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;/]*?)\s*;", code)]
    spans = [(int(m.group(1), 16), addr) for addr, text in instrs
             if (m := re.search(r"\bBRA\s+(?:!?U?P\w+,\s*)?0x([0-9a-f]+)\b", text)) and int(m.group(1), 16) <= addr]
    inner = [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]
    return [[text for addr, text in instrs if a <= addr <= b] for a, b in inner]


def test_innermost_loops_finds_the_loop_inside_a_loop():
    sass = ("/*0000*/ MOV R1, c[0x0][0x28] ;\n/*0010*/ LDG.E R2, desc[UR4][R4.64] ;\n"
            "/*0020*/ FFMA R3, R2, R2, R3 ;\n/*0030*/ @P0 BRA 0x10 ;\n/*0040*/ IADD3 R5, R5, 0x1, RZ ;\n"
            "/*0050*/ @P1 BRA P2, 0x0 ;\n/*0060*/ EXIT ;\n")
    assert innermost_loops(sass) == [["LDG.E R2, desc[UR4][R4.64]",
                                      "FFMA R3, R2, R2, R3", "@P0 BRA 0x10"]]


def _count(instructions, pattern):
    return sum(bool(re.search(pattern, text)) for text in instructions)


# Stage 1 of the Gram for K > 8, list (gram_cuda.cu) and bank (bank_cuda.cu): the stage-1 kernels
# templated on the gradient dtype alone (the K <= 8 ones also carry KMAX).
MANY_OBJECTIVES_GRAM = re.compile(r"(gram_partials\w*?)I(f|d|N\w+?_tE)EEv")


def test_gram_for_many_objectives_reads_rows_once_per_tile_pass(tmp_path):
    """The Gram for K > 8 must not make one pass per pair (2 row loads for 1 product: K = 9 reads
    10x the minimal bytes). Its hot loop (the innermost loop with the products) reads only shared
    memory, at least 4 products per value read (an 8 x 8 tile: 16 values, 64 products), and the
    rows come from global memory in 16-byte loads (LDG.E.128), every dtype, list and bank."""
    found = {}
    for source in ("gram_cuda.cu", "bank_cuda.cu"):
        for name, code in sass_by_function(_sm90_sass(source, tmp_path)).items():
            if m := MANY_OBJECTIVES_GRAM.search(name):
                found[(source, m.group(1), m.group(2))] = code
    assert len(found) == 8, sorted(found)  # 4 dtypes x (list, bank)
    report, bad = [], []
    for key, code in sorted(found.items()):
        loops = [body for body in innermost_loops(code) if _count(body, r"\b[DF]FMA\b")]
        assert loops, f"no product loop in {key}"
        hot = max(loops, key=lambda body: _count(body, r"\b[DF]FMA\b"))
        fma, shared = _count(hot, r"\b[DF]FMA\b"), _count(hot, r"\bLDS\b")
        glob = _count(hot, r"(?<![\w.])LDG\.|(?<![\w.])LD\.E")  # global or generic loads
        ldg128 = len(re.findall(r"\bLDG\.E\.128\b", code))
        report.append(f"{key[0]:13} {key[1]:28} {key[2]:10} hot loop: {fma:3} FMA {shared:3} LDS {glob:3} global "
                      f"loads; kernel: {ldg128} LDG.E.128")
        if glob or fma < 4 * max(shared, 1) or ldg128 == 0:
            bad.append(report[-1])
    print("\n".join(report), file=sys.stderr)
    assert not bad, "\n".join(bad)


# The policy solve (policy_cuda.cu), by mangled template arguments: the Gram's dtype (f, d) and the
# workspace capacity KMAX (none: one kernel for every K).
POLICY_KERNEL = re.compile(r"policy_kernelI([fd])(?:Li(\d+)E)?EEv")
STATIC_SHARED_LIMIT = 48 * 1024  # bytes of __shared__ a block may declare without an opt-in


def test_policy_kernel_keeps_its_workspace_in_shared_memory(tmp_path):
    """One warp per segment, its system in shared memory: the K <= 8 instances have no local
    memory at all (no stack frame, no LDL / STL in the SASS, for sm_80 and sm_90) and no workspace
    in global memory either: no workspace pointer among the parameters, every global load through
    the read-only path (the Gram and the mask: a global workspace is written, so not read-only),
    and the float32 kernel stores only its float32 weights and one int64 branch code (a global
    workspace is float64s, ints and bools). Every instance stays within MAX_SPILL_BYTES and the
    static shared-memory limit."""
    nvcc, cuobjdump = _nvcc(), _cuobjdump()
    if nvcc is None or cuobjdump is None:
        pytest.skip("nvcc or cuobjdump not found")
    source = Path(_extension.CSRC_DIR) / "policy_cuda.cu"
    with ThreadPoolExecutor(2) as pool:
        usage = {arch: pool.submit(_compile, nvcc, _compile_flags(), source, arch, tmp_path) for arch in ARCHS}
        usage = {arch: future.result() for arch, future in usage.items()}
    rows, small = [], {}
    for arch in ARCHS:
        cubin = str(tmp_path / f"policy_cuda.{arch}.cubin")
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True,
                              timeout=300).stdout
        resources = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True,
                                   timeout=300).stdout
        shared = dict(re.findall(r"Function (\S+):\s*\n\s*REG:\d+ STACK:\d+ SHARED:(\d+)", resources))
        for name, code in sass_by_function(sass).items():
            if not (m := POLICY_KERNEL.search(name)):
                continue
            dtype, kmax = m.group(1), int(m.group(2) or 32)
            u = usage[arch][(name, arch)]
            ops = {op: len(re.findall(rf"\b{op}(?:\.[\w.]+)?\b", code)) for op in ("LDL", "STL", "LDG", "STG")}
            loads = re.findall(r"\bLDG(\.[\w.]+)?\b", code)
            stores = re.findall(r"\bSTG(\.[\w.]+)?\b", code)
            rows.append(f"{arch} {dtype} KMAX={kmax:2} {u['registers']:3} regs {u['stack']:4} B stack "
                        f"{u['spill_stores']:3}/{u['spill_loads']:3} B spill {int(shared.get(name, -1)):6} B shared "
                        f"{ops}")
            assert max(u["spill_stores"], u["spill_loads"]) <= MAX_SPILL_BYTES, rows[-1]
            if kmax <= 8 or not m.group(2):
                small[(arch, dtype)] = rows[-1]
                assert u["stack"] == 0 and ops["LDL"] == 0 and ops["STL"] == 0, rows[-1]
                assert "Workspace" not in name, name
                assert loads and all(".CONSTANT" in (s or "") for s in loads), loads
                if dtype == "f":
                    wide = [s for s in stores if s not in (".E", ".E.64")]
                    assert not wide and stores.count(".E.64") == 1, stores
            assert 0 < int(shared[name]) <= STATIC_SHARED_LIMIT, rows[-1]
    print("\n".join(rows), file=sys.stderr)
    assert set(small) == {(arch, dtype) for arch in ARCHS for dtype in "fd"}, rows
