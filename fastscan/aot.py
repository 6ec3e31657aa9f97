"""Compile every kernel ahead of time for sm_80 and sm_90 and report its resource use — no GPU needed.

    python -m fastscan.aot [--arch 80 90] [--only triton|cuda]

Triton kernels (each op's triton.py exports AOT_SPECS) go through `triton.compile` with a GPUTarget;
the cubin's registers / shared memory / spill bytes come from triton's bundled `cuobjdump
--dump-resource-usage`. CUDA kernels (csrc/*/*.cu) go through nvcc with `-Xptxas -v`.
One table row per kernel x arch. Exit status 1 on a compile error or any spill (STACK/LOCAL bytes > 0
for Triton, spill stores/loads > 0 for nvcc): spills are what the interpreter and the CPU emulation
forgive and a real GPU does not.

TRITON_INTERPRET must be unset (with it, @triton.jit yields interpreter functions that cannot compile).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CSRC = PACKAGE.parent / "csrc"
# Every op folder with a triton.py exports AOT_SPECS.
TRITON_OPS = [f"fastscan.{p.parent.name}.triton" for p in sorted(PACKAGE.glob("*/triton.py"))]


@dataclass
class Row:
    kind: str
    kernel: str
    arch: int
    registers: int | None = None
    shared_bytes: int | None = None
    spill_bytes: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.spill_bytes


def _find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return shutil.which("nvcc") or (str(Path(cuda_home, "bin", "nvcc")) if Path(cuda_home, "bin", "nvcc").exists() else None)


def compile_triton(arch: int) -> list[Row]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    rows = []
    for module_name in TRITON_OPS:
        for spec in importlib.import_module(module_name).AOT_SPECS:
            row = Row("triton", spec["name"], arch)
            rows.append(row)
            try:
                # attrs carry the 16-byte alignment hints the JIT derives for contiguous tensors.
                source = ASTSource(spec["fn"], spec["signature"], constexprs=spec.get("constexprs"),
                                   attrs=spec.get("attrs"))
                options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 1)}
                kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(kernel.asm["cubin"])
                    f.flush()
                    usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                                           capture_output=True, text=True, check=True).stdout
                fields = dict(re.findall(r"(\w+):(\d+)", usage))
                row.registers = int(fields.get("REG", 0))
                row.shared_bytes = int(fields.get("SHARED", 0))
                row.spill_bytes = int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))
            except Exception as exc:  # report every kernel, then fail at the end
                row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return rows


def compile_cuda(arch: int) -> list[Row]:
    nvcc = _find_nvcc()
    if nvcc is None:  # not a compile error: this machine cannot check CUDA kernels at all
        print(f"fastscan.aot: nvcc not found (set CUDA_HOME); CUDA kernels not checked for sm_{arch}", file=sys.stderr)
        return []
    rows = []
    for source in sorted(CSRC.glob("*/*.cu")):
        cmd = [nvcc, "-O3", "-std=c++17", "--use_fast_math", f"-arch=sm_{arch}", "-Xptxas", "-v",
               "-I", str(CSRC / "common"), "-I", str(CSRC), '-DFASTSCAN_BACKEND_NAME="cuda"',
               "-c", str(source), "-o", os.devnull]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append(Row("cuda", source.name, arch, error=proc.stderr.strip()[-400:]))
            continue
        rows.extend(_parse_ptxas(proc.stderr, source.name, arch))
    return rows


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    # "void ns::kernel<128, 8, float>(const Params*)" -> "kernel<128, 8, float>"
    return {n: re.sub(r"\b\w+::", "", re.sub(r"^\S+ ", "", d.split("(")[0])) for n, d in zip(names, out)}


def _parse_ptxas(log: str, source: str, arch: int) -> list[Row]:
    rows: dict[str, Row] = {}
    current = None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            current = rows.setdefault(m.group(1), Row("cuda", m.group(1), arch))
        elif m := re.search(r"Function properties for (\w+)", line):
            current = rows.get(m.group(1), current)
        elif current is not None and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current.spill_bytes = int(m.group(1)) + int(m.group(2))
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current.registers = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current.shared_bytes = int(smem.group(1)) if smem else 0
    names = _demangle(list(rows))
    for mangled, row in rows.items():
        row.kernel = f"{source}:{names[mangled]}"
    return list(rows.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--only", choices=["triton", "cuda"])
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("fastscan.aot: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    rows = []
    for arch in args.arch:
        if args.only in (None, "triton"):
            rows += compile_triton(arch)
        if args.only in (None, "cuda"):
            rows += compile_cuda(arch)
    width = max([len(r.kernel) for r in rows] + [6])
    print(f"{'kind':6}  {'kernel':{width}}  {'arch':>5}  {'regs':>5}  {'smem':>7}  {'spill':>6}  status")
    for r in rows:
        status = "ok" if r.ok else (f"ERROR {r.error}" if r.error else "SPILL")
        fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
        print(f"{r.kind:6}  {r.kernel:{width}}  sm_{r.arch:<2}  {fmt(r.registers):>5}  {fmt(r.shared_bytes):>7}  "
              f"{fmt(r.spill_bytes):>6}  {status}")
    failed = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)} kernels ok, {len(failed)} failed")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
