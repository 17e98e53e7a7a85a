"""The `fused-balance` command: info, build, study, bench."""
from __future__ import annotations

import argparse
import platform
import sys

import torch


def _info(args) -> int:
    import fused_balance
    from fused_balance import _extension
    from fused_balance.backends import backend_report

    print(f"fused_balance {fused_balance.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} "
          f"(CUDA build: {torch.version.cuda or 'no'}), GPU present: {torch.cuda.is_available()}")
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    try:
        built = _extension.is_built()
    except FileNotFoundError as exc:  # an install without its C++ sources: say so, report the rest
        built = None
        print(f"C++ extension: cannot be built ({exc})")
    if built:
        info = _extension.build_info()
        print("C++ extension: built in", info.get("build_dir"))
        print(f"  CPU kernel path: {info.get('cpu_isa')}")
        if info.get("cuda_compiled"):
            print(f"  CUDA kernels: compiled for {', '.join(info.get('cuda_archs', []))}")
        else:
            print(f"  CUDA kernels: not compiled ({info.get('cuda_reason')})")
    elif built is not None:
        print("C++ extension: not built yet (run `fused-balance build`; it also builds at first use)")
    try:
        from fused_balance.kernels import backend as triton_backend
        print(f"Triton: {triton_backend.describe()}")
    except Exception as exc:  # Triton is optional at run time
        print(f"Triton: unavailable ({exc})")
    print("Backends (available / reason):")
    for name, per_device in backend_report().items():
        for device, (ok, reason) in per_device.items():
            print(f"  {name:7s} {device:5s} {'yes' if ok else 'no ':3s}  {reason}")
    return 0


def _build(args) -> int:
    from fused_balance import _extension
    _extension.build(verbose=True)
    info = _extension.build_info()
    print(f"built: CPU kernel path {info.get('cpu_isa')}; CUDA "
          + (f"compiled for {', '.join(info.get('cuda_archs', []))}" if info.get("cuda_compiled")
             else f"not compiled ({info.get('cuda_reason')})"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-balance", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build status, backends and kernel paths").set_defaults(func=_info)
    sub.add_parser("build", help="build the C++ (and CUDA) extension now").set_defaults(func=_build)

    from fused_balance import benchmarking
    from fused_balance import study
    study_parser = sub.add_parser("study", help="the study: Pareto-LoRA and baselines on tiny unified "
                                  "models, the BalanceScheduler on a tiny LLaVA (--quick / --full)")
    study.add_arguments(study_parser)
    study_parser.set_defaults(func=study.main)
    bench = sub.add_parser("bench", help="throughput benchmarks against peers and the roofline")
    benchmarking.add_arguments(bench)
    bench.set_defaults(func=benchmarking.main)
    from fused_balance.benchmarking import gpu_check
    check = sub.add_parser("gpu-check", help="the first run on a GPU: every op and the plan against a "
                           "float64 reference, no hidden syncs, CUDA graphs, > 2^31 rows, GB/s vs a copy")
    gpu_check.add_arguments(check)
    check.set_defaults(func=gpu_check.main)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
