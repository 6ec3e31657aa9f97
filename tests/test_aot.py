"""Every Triton and CUDA kernel compiles for sm_80 and sm_90 without spilling (`python -m fastscan.aot`)."""
import os
import subprocess
import sys

import pytest


def test_aot_compiles_every_kernel_without_spills():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastscan.aot"], capture_output=True, text=True, env=env,
                          timeout=1500)
    print(proc.stdout)
    assert proc.returncode == 0, f"fastscan.aot failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    kernel_rows = [line for line in proc.stdout.splitlines() if line.startswith(("triton", "cuda"))]
    assert any(line.startswith("triton") for line in kernel_rows), proc.stdout
    assert all(" ok" in line for line in kernel_rows), proc.stdout
