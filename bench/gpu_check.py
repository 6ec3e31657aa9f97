"""On a GPU: every op on every compiled backend against the reference, then the key speed ratios.

    python bench/gpu_check.py [--skip-timing] [--out DIR]

The tests run the CUDA sources through cuda_emu and the Triton kernels through the interpreter, on the
CPU. This script is the same proof on real hardware, in one short run: for each op and backend (cuda,
triton) dense and packed (cu_seqlens) cases, forward and backward, relative error against the float64
reference on the same device; then speed ratios against the PyTorch peers in the same run. Without a GPU
it runs the same cases at toy sizes on the CPU backends (cpu, cuda_emu, interpreted triton): a dry run of
the script itself. Prints one line per check and a summary; writes gpu_check.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

GPU = __import__("torch").cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import fastscan  # noqa: E402
from fastscan.attention.reference import attention_ref, attention_varlen_ref  # noqa: E402
from fastscan.causal_conv1d import causal_conv1d_ref  # noqa: E402
from fastscan.pool2d.reference import pool2d_tokens_ref  # noqa: E402
from fastscan.selective_scan import selective_scan_ref  # noqa: E402
from fastscan.state_update.reference import selective_state_update_ref  # noqa: E402

DEV = torch.device("cuda" if GPU else "cpu")
BACKENDS = [b for b in (("cuda", "triton") if GPU else ("cpu", "cuda_emu", "triton"))
            if b in fastscan.available_backends()]
if not GPU and "--only-timing" in sys.argv:
    BACKENDS = ["cpu"]
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
RESULTS: list = []


def size(gpu_value, cpu_value):
    return gpu_value if GPU else cpu_value


def rel(actual, expected) -> float:
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def record(op, backend, case, errors: dict, tol: float):
    worst = max(errors.values())
    ok = worst <= tol and all(v == v for v in errors.values())
    RESULTS.append(dict(op=op, backend=backend, case=case, ok=ok, worst=worst, tol=tol, errors=errors))
    detail = " ".join(f"{k}={v:.1e}" for k, v in errors.items())
    print(f"{'ok  ' if ok else 'FAIL'} {op:14} {backend:8} {case:34} {detail}", flush=True)


def guarded(fn):
    def run(*args):
        try:
            fn(*args)
        except Exception as e:  # one broken case must not hide the others
            RESULTS.append(dict(op=fn.__name__, backend=str(args[:1]), case="exception", ok=False, error=repr(e)))
            print(f"FAIL {fn.__name__} {args[:1]}: {e!r}", flush=True)
            traceback.print_exc()
    return run


def leaf(t):
    return t.detach().clone().requires_grad_(True) if t is not None else None


def grads_vs(inputs: dict, ref_inputs: dict) -> dict:
    return {f"d{k}": rel(inputs[k].grad, ref_inputs[k].grad) for k in inputs
            if inputs[k] is not None and inputs[k].grad is not None and ref_inputs[k].grad is not None}


# ---------------------------------------------------------------- checks

@guarded
def check_scan(backend, dtype, lens):
    """Dense (lens None: batch 2) or packed scan, all options on, fwd + bwd vs float64."""
    dim, dstate = size(256, 16), 16
    total = sum(lens) if lens else size(1500, 70)
    batch = 1 if lens else 2
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    states = len(lens) if lens else batch
    base = dict(u=r(batch, total, dim).transpose(1, 2), delta=(0.5 * torch.rand(batch, dim, total, generator=g)),
                A=-torch.rand(dim, dstate, generator=g) - 0.1, B=r(batch, 2, dstate, total), C=r(batch, 2, dstate, total),
                D=r(dim), z=r(batch, dim, total), delta_bias=0.1 * r(dim), initial_state=r(states, dim, dstate))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32) if lens else None
    low = {k: (v.to(DEV, dtype) if k in ("u", "delta", "B", "C", "z") else v.to(DEV)) for k, v in base.items()}
    ins = {k: leaf(v) for k, v in low.items()}
    ref = {k: leaf(v.double()) for k, v in low.items()}
    y, last = fastscan.selective_scan_fn(**ins, delta_softplus=True, return_last_state=True, backend=backend,
                                         cu_seqlens=cu)
    y_ref, last_ref = selective_scan_ref(**ref, delta_softplus=True, return_last_state=True, cu_seqlens=cu)
    gy, gl = torch.randn_like(y_ref), torch.randn_like(last_ref)
    ((y.double() * gy).sum() + (last.double() * gl).sum()).backward()
    ((y_ref * gy).sum() + (last_ref * gl).sum()).backward()
    errors = {"y": rel(y, y_ref), "last": rel(last, last_ref), **grads_vs(ins, ref)}
    record("scan", backend, f"{'packed' if lens else 'dense'} {str(dtype)[6:]} L={total}", errors,
           TOL[dtype] * (10 if dtype == torch.float32 else 1))


@guarded
def check_conv(backend, dtype, lens):
    dim, width = size(512, 24), 4
    total = sum(lens) if lens else size(2000, 90)
    batch = 1 if lens else 2
    g = torch.Generator().manual_seed(1)
    states = len(lens) if lens else batch
    base = dict(x=torch.randn(batch, total, dim, generator=g).transpose(1, 2), weight=torch.randn(dim, width, generator=g),
                bias=torch.randn(dim, generator=g), initial_states=torch.randn(states, dim, width - 1, generator=g))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32) if lens else None
    low = {k: (v.to(DEV, dtype) if k in ("x", "initial_states") else v.to(DEV)) for k, v in base.items()}
    ins = {k: leaf(v) for k, v in low.items()}
    ref = {k: leaf(v.double()) for k, v in low.items()}
    out, final = fastscan.causal_conv1d_fn(**ins, return_final_states=True, activation="silu", backend=backend,
                                           cu_seqlens=cu)
    out_ref, final_ref = causal_conv1d_ref(**ref, return_final_states=True, activation="silu", cu_seqlens=cu)
    go, gf = torch.randn_like(out_ref), torch.randn_like(final_ref)
    ((out.double() * go).sum() + (final.double() * gf).sum()).backward()
    ((out_ref * go).sum() + (final_ref * gf).sum()).backward()
    errors = {"out": rel(out, out_ref), "final": rel(final, final_ref), **grads_vs(ins, ref)}
    record("conv", backend, f"{'packed' if lens else 'dense'} {str(dtype)[6:]} L={total}", errors, TOL[dtype])


@guarded
def check_state_update(backend, dtype):
    batch, dim, dstate = size(16, 3), size(512, 24), 16
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g).to(DEV)
    state = r(batch, dim, dstate)
    args = dict(x=r(batch, dim).to(dtype), dt=r(batch, dim).to(dtype), A=-torch.rand(dim, dstate, generator=g).to(DEV),
                B=r(batch, dstate).to(dtype), C=r(batch, dstate).to(dtype), D=r(dim), z=r(batch, dim).to(dtype),
                dt_bias=r(dim), dt_softplus=True)
    s1, s2 = state.clone(), state.double()
    y = fastscan.selective_state_update(s1, **args, backend=backend)
    y_ref = selective_state_update_ref(s2, **{k: (v.double() if torch.is_tensor(v) else v) for k, v in args.items()})
    record("state_update", backend, f"{str(dtype)[6:]} batch={batch}", {"y": rel(y, y_ref), "state": rel(s1, s2)},
           TOL[dtype])


@guarded
def check_pool(backend, dtype, mode):
    n, side, channels = size(16, 2), 24, size(1024, 40)
    x = torch.randn(n, side * side, channels).to(DEV, dtype)
    a, b = leaf(x), leaf(x.double())
    out = fastscan.pool2d_tokens(a, (side, side), 2, mode, backend=backend)
    out_ref = pool2d_tokens_ref(b, (side, side), 2, mode)
    go = torch.randn_like(out_ref)
    (out.double() * go).sum().backward()
    (out_ref * go).sum().backward()
    record("pool2d", backend, f"{mode} {str(dtype)[6:]} {n}x{side}x{side}", {"out": rel(out, out_ref),
                                                                           "dx": rel(a.grad, b.grad)}, TOL[dtype])


@guarded
def check_attention(backend, dtype, head_dim, varlen):
    heads, kv_heads = 8, 2
    g = torch.Generator().manual_seed(3)
    if varlen:
        lens = size([1, 700, 0, 1300, 33], [1, 20, 0, 33, 5])
        total = sum(lens)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        shape_q, shape_k = (total, heads, head_dim), (total, kv_heads, head_dim)
    else:
        seqlen = size(1500, 70)
        shape_q, shape_k = (2, seqlen, heads, head_dim), (2, seqlen, kv_heads, head_dim)
    qkv = [torch.randn(*s, generator=g).to(DEV, dtype) for s in (shape_q, shape_k, shape_k)]
    ins, ref = [leaf(t) for t in qkv], [leaf(t.double()) for t in qkv]
    if varlen:
        m = max(lens)
        out = fastscan.flash_attn_varlen_func(*ins, cu, cu, m, m, causal=True, backend=backend)
        out_ref = attention_varlen_ref(*ref, cu, cu, causal=True)
    else:
        out = fastscan.flash_attn_func(*ins, causal=True, backend=backend)
        out_ref = attention_ref(*ref, causal=True)
    go = torch.randn_like(out_ref)
    (out.double() * go).sum().backward()
    (out_ref * go).sum().backward()
    errors = {"out": rel(out, out_ref), **{f"d{n}": rel(a.grad, b.grad) for n, a, b in zip("qkv", ins, ref)}}
    record("attention", backend, f"{'varlen' if varlen else 'dense'} {str(dtype)[6:]} d{head_dim}", errors, TOL[dtype])


# ---------------------------------------------------------------- timing

def timing():
    """Speed ratios in one run (GPU only): each compiled backend against the PyTorch peer."""
    rows = []

    def add(op, name, fn, base=None):
        median, _, _ = common.measure(fn, DEV, repeats=20)
        rows.append(dict(op=op, backend=name, ms=round(median, 4)))
        ratio = f"{base / median:.2f}x" if base else ""
        print(f"time {op:28} {name:12} {median:9.4f} ms {ratio}", flush=True)
        return median

    bf = torch.bfloat16
    # scan: batch 4, dim 2048, L 2048, dstate 16, bf16; peer: the reference loop (what HF's slow path runs)
    g = lambda *s: torch.randn(*s, device=DEV)
    L, d = size(2048, 64), size(2048, 32)
    u, delta, z = (g(4, L, d).to(bf).transpose(1, 2) for _ in range(3))
    B, C = (g(4, L, 16).to(bf).transpose(1, 2) for _ in range(2))
    A, D, bias = -torch.rand(d, 16, device=DEV), g(d), g(d)
    scan = lambda b: (lambda: fastscan.selective_scan_fn(u, delta, A, B, C, D, z, bias, True, backend=b))
    with torch.no_grad():
        base = add("scan fwd b4 d2048 L2048", "torch", scan("torch"))
        for b in BACKENDS:
            add("scan fwd b4 d2048 L2048", b, scan(b), base)
    L, d = size(4096, 64), size(4096, 32)
    x = g(4, L, d).to(bf).transpose(1, 2)
    w, wb = g(d, 4), g(d)
    peer = lambda: F.silu(F.conv1d(x, w.to(bf).unsqueeze(1), wb.to(bf), padding=3, groups=d)[..., :L])
    with torch.no_grad():
        base = add("conv fwd b4 d4096 L4096", "F.conv1d", peer)
        for b in BACKENDS:
            add("conv fwd b4 d4096 L4096", b, lambda b=b: fastscan.causal_conv1d_fn(x, w, wb, activation="silu",
                                                                                   backend=b), base)
    L = size(4096, 64)
    q = g(4, L, 32, 128).to(bf)
    k, v = g(4, L, 8, 128).to(bf), g(4, L, 8, 128).to(bf)
    sdpa = lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=True)
    with torch.no_grad():
        base = add("attn fwd b4 L4096 h32/8 d128", "sdpa", sdpa)
        if "triton" in BACKENDS:
            add("attn fwd b4 L4096 h32/8 d128", "triton",
                lambda: fastscan.flash_attn_func(q, k, v, causal=True, backend="triton"), base)
    # packed vs loop: 16 random lengths summing to 16384, the scan and conv (bf16)
    T = size(16384, 256)
    lens = torch.distributions.Dirichlet(torch.ones(16)).sample().mul(T).long().clamp_min(1)
    lens[-1] += T - int(lens.sum())
    cu = torch.tensor([0] + lens.cumsum(0).tolist(), dtype=torch.int32)
    bounds = cu.tolist()
    up, dp, zp = (g(1, T, 2048 if GPU else 32).to(bf).transpose(1, 2) for _ in range(3))
    Bp, Cp = (g(1, T, 16).to(bf).transpose(1, 2) for _ in range(2))
    A, D, bias = -torch.rand(up.shape[1], 16, device=DEV), g(up.shape[1]), g(up.shape[1])
    for b in BACKENDS:
        with torch.no_grad():
            loop = lambda b=b: [fastscan.selective_scan_fn(up[..., s:e], dp[..., s:e], A, Bp[..., s:e], Cp[..., s:e], D,
                                                           zp[..., s:e], bias, True, backend=b)
                                for s, e in zip(bounds, bounds[1:])]
            base = add("scan packed 16 seqs, 16384", f"{b}:loop", loop)
            add("scan packed 16 seqs, 16384", f"{b}:packed",
                lambda b=b: fastscan.selective_scan_fn(up, dp, A, Bp, Cp, D, zp, bias, True, backend=b, cu_seqlens=cu),
                base)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--only-timing", action="store_true", help="skip the checks (without a GPU: a dry run "
                                                                     "of the timing code at toy sizes, cpu backend)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    started = time.time()
    print(f"device {common.device_name(DEV)}, torch {torch.__version__}, backends {BACKENDS}", flush=True)
    packed = size([1, 0, 700, 33, 1, 1100, 17, 0], [1, 0, 20, 33, 1, 7, 0])
    for b in ([] if args.only_timing else BACKENDS):
        for dtype in (torch.float32, torch.bfloat16):
            check_scan(b, dtype, None)
            check_conv(b, dtype, None)
        check_scan(b, torch.float32, packed)
        check_conv(b, torch.float32, packed)
        check_conv(b, torch.bfloat16, packed)
        check_state_update(b, torch.float32)
        check_state_update(b, torch.bfloat16)
        check_pool(b, torch.float32, "avg")
        check_pool(b, torch.bfloat16, "max")
    if "triton" in BACKENDS and not args.only_timing:
        for head_dim, dtype in ((64, torch.float16), (128, torch.bfloat16)):
            check_attention("triton", dtype, head_dim, False)
            check_attention("triton", dtype, head_dim, True)
    print(f"checks: {sum(r['ok'] for r in RESULTS)}/{len(RESULTS)} ok in {time.time() - started:.0f} s", flush=True)
    rows = timing() if (GPU or args.only_timing) and not args.skip_timing else []
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "gpu_check.json"
    path.write_text(json.dumps({"device": common.device_name(DEV), "torch": torch.__version__,
                                "checks": RESULTS, "timing": rows, "seconds": time.time() - started}, indent=1,
                               default=str))
    print(f"wrote {path}; {time.time() - started:.0f} s", flush=True)
    return 0 if all(r["ok"] for r in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
