"""The Triton kernels with the real `tl.associative_scan` under the interpreter.

The interpreter runs associative_scan's combine one element at a time in Python, so the main tests
swap in a vectorised scan built on tl.gather (fastscan/selective_scan/triton.py explains). Here a small
multi-chunk case runs the exact scan the GPU compiles, forward and backward, in a fresh process
(the switch is read at import time).
"""
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import torch, fastscan
    from fastscan.selective_scan import selective_scan_ref
    torch.manual_seed(0)
    b, d, n, L = 1, 4, 4, 70   # 3 chunks of 32: carries cross chunk boundaries both ways
    leaves = dict(u=torch.randn(b, d, L), delta=torch.randn(b, d, L) * 0.5 - 1, A=-torch.rand(d, n) - 0.1,
                  B=torch.randn(b, n, L), C=torch.randn(b, n, L), D=torch.randn(d), z=torch.randn(b, d, L),
                  delta_bias=torch.randn(d) * 0.5, initial_state=torch.randn(b, d, n))
    def run(fn, **kw):
        xs = {k: v.clone().double().requires_grad_(True) if fn is selective_scan_ref else
              v.clone().requires_grad_(True) for k, v in leaves.items()}
        y, last = fn(**xs, delta_softplus=True, return_last_state=True, **kw)
        (y.double().sin().sum() + last.double().cos().sum()).backward()
        return [y, last] + [x.grad for x in xs.values()]
    got = run(fastscan.selective_scan_fn, backend="triton")
    want = run(selective_scan_ref)
    errs = [((g.double() - w).norm() / w.norm()).item() for g, w in zip(got, want)]
    print("errors", errs)
    assert max(errs) < 6e-4, errs
""")


def test_real_associative_scan_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", FASTSCAN_INTERPRET_ASSOC_SCAN="1", FASTSCAN_BACKEND="")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
