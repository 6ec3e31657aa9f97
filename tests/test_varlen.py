"""Packed variable-length sequences (cu_seqlens) in the selective scan and the causal conv1d.

The proof of issue 7 for these two ops: on every backend, one packed call equals running each sequence
on its own through the same backend and concatenating — outputs, per-sequence final states and every
gradient — for random boundaries with length-1 and empty sequences, and one sequence filling the pack;
and the packed call matches the float64 reference. (Attention's varlen tests: test_attention_varlen.py.)
"""
import random

import pytest
import torch

import fastscan
from fastscan.causal_conv1d import causal_conv1d_ref
from fastscan.selective_scan import selective_scan_ref
from conftest import rel_err

BACKENDS = [b for b in ("torch", "cpu", "cuda_emu", "triton") if b in fastscan.available_backends()]


def boundaries(total, kind, seed):
    """int32 cu_seqlens over `total` tokens: 'mixed' has random lengths with a 1 and an empty sequence
    in it, 'whole' is one sequence filling the pack, 'short' is mostly lengths 0-2."""
    rng = random.Random(seed)
    if kind == "whole":
        return torch.tensor([0, total], dtype=torch.int32)
    if kind == "short":
        lengths = [rng.choice([0, 1, 1, 2]) for _ in range(total)]
    else:
        lengths = [1, 0] + [rng.randint(1, max(1, total // 4)) for _ in range(total)]
        rng.shuffle(lengths)
    cuts, acc = [0], 0
    for n in lengths:
        if acc + n > total:
            break
        acc += n
        cuts.append(acc)
    if cuts[-1] != total:
        cuts.append(total)
    return torch.tensor(cuts, dtype=torch.int32)


def check_close(actual, expected, tol, what):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def leaves(tensors):
    return {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in tensors.items()}


def grads(tensors):
    return {k: v.grad for k, v in tensors.items() if v is not None and v.grad is not None}


# ---------------------------------------------------------------------------------------------
# selective scan
# ---------------------------------------------------------------------------------------------

def scan_inputs(total, num_seqs, dim=12, dstate=8, groups=2, dtype=torch.float32, channel_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    seq = lambda: (r(1, total, dim).transpose(1, 2) if channel_last else r(1, dim, total)).to(dtype)
    return dict(u=seq(), delta=(0.5 * torch.rand(1, dim, total, generator=g)).to(dtype),
                A=-torch.rand(dim, dstate, generator=g) - 0.1, B=r(1, groups, dstate, total).to(dtype),
                C=r(1, groups, dstate, total).to(dtype), D=r(dim), z=seq(), delta_bias=0.1 * r(dim),
                initial_state=r(num_seqs, dim, dstate))


def run_scan_packed(t, cu, backend, gy, glast):
    y, last = fastscan.selective_scan_fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"],
                                         t["delta_bias"], True, True, t["initial_state"], backend, cu_seqlens=cu)
    ((y.float() * gy).sum() + (last * glast).sum()).backward()
    return y, last


def run_scan_each(t, cu, backend, gy, glast):
    """The definition: every sequence alone (an empty one hands its initial state through)."""
    bounds = cu.tolist()
    ys, lasts = [], []
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
        init = t["initial_state"][i:i + 1]
        if s == e:
            lasts.append(init)
            continue
        cut = lambda x: x[..., s:e]
        y, last = fastscan.selective_scan_fn(cut(t["u"]), cut(t["delta"]), t["A"], cut(t["B"]), cut(t["C"]),
                                             t["D"], cut(t["z"]), t["delta_bias"], True, True, init, backend)
        ys.append(y)
        lasts.append(last)
    y, last = torch.cat(ys, -1), torch.cat(lasts)
    ((y.float() * gy).sum() + (last * glast).sum()).backward()
    return y, last


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("total,kind", [(150, "mixed"), (16, "short"), (70, "whole"), (2300, "mixed")])
def test_scan_packed_equals_each_sequence(backend, total, kind):
    if backend == "triton" and total > 1000:
        pytest.skip("interpreter time: the long pack runs on the compiled backends")
    cu = boundaries(total, kind, seed=total)
    num_seqs = cu.numel() - 1
    base = scan_inputs(total, num_seqs, dim=8 if total > 1000 else 12, channel_last=kind == "short")
    gy = torch.randn(base["u"].shape)
    glast = torch.randn(base["initial_state"].shape)

    packed = leaves(base)
    y, last = run_scan_packed(packed, cu, backend, gy, glast)
    assert last.shape == (num_seqs,) + tuple(base["initial_state"].shape[1:])

    # vs the float64 definition
    ref = leaves({k: (v.double() if k not in ("A",) else v.double()) for k, v in base.items()})
    y_ref, last_ref = selective_scan_ref(ref["u"], ref["delta"], ref["A"], ref["B"], ref["C"], ref["D"], ref["z"],
                                         ref["delta_bias"], True, True, ref["initial_state"], cu)
    ((y_ref * gy.double()).sum() + (last_ref * glast.double()).sum()).backward()
    check_close(y, y_ref, 1e-5, "y vs float64")
    check_close(last, last_ref, 1e-5, "last_state vs float64")
    for k, g in grads(ref).items():
        check_close(packed[k].grad, g, 2e-5, f"d{k} vs float64")

    if backend == "torch":
        return  # the torch backend *is* the per-sequence loop; the float64 check above is its test
    each = leaves(base)
    y_each, last_each = run_scan_each(each, cu, backend, gy, glast)
    check_close(y, y_each, 1e-6, "y vs each sequence")
    check_close(last, last_each, 1e-6, "last_state vs each sequence")
    for k, g in grads(each).items():
        check_close(packed[k].grad, g, 1e-5, f"d{k} vs each sequence")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_scan_packed_bf16(backend):
    cu = boundaries(90, "mixed", seed=3)
    base = scan_inputs(90, cu.numel() - 1, dtype=torch.bfloat16, seed=3)
    base["initial_state"] = None
    y, last = fastscan.selective_scan_fn(**base, delta_softplus=True, return_last_state=True, backend=backend,
                                         cu_seqlens=cu)
    ref = {k: (v.double() if v is not None else None) for k, v in base.items()}
    y_ref, last_ref = selective_scan_ref(**ref, delta_softplus=True, return_last_state=True, cu_seqlens=cu)
    check_close(y, y_ref, 2e-2, "bf16 y")
    check_close(last, last_ref, 2e-2, "bf16 last_state")


# ---------------------------------------------------------------------------------------------
# causal conv1d
# ---------------------------------------------------------------------------------------------

def conv_inputs(total, num_seqs, dim, width, dtype=torch.float32, channel_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, total, dim, generator=g).transpose(1, 2) if channel_last else torch.randn(1, dim, total,
                                                                                              generator=g)
    return dict(x=x.to(dtype), weight=torch.randn(dim, width, generator=g), bias=torch.randn(dim, generator=g),
                initial_states=torch.randn(num_seqs, dim, width - 1, generator=g).to(dtype))


def run_conv_packed(t, cu, backend, gout, gfinal):
    out, final = fastscan.causal_conv1d_fn(t["x"], t["weight"], t["bias"], t["initial_states"], True, "silu",
                                           backend, cu_seqlens=cu)
    ((out.float() * gout).sum() + (final.float() * gfinal).sum()).backward()
    return out, final


def run_conv_each(t, cu, backend, gout, gfinal):
    bounds = cu.tolist()
    outs, finals = [], []
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
        init = t["initial_states"][i:i + 1]
        if s == e:
            finals.append(init)
            continue
        out, final = fastscan.causal_conv1d_fn(t["x"][..., s:e], t["weight"], t["bias"], init, True, "silu", backend)
        outs.append(out)
        finals.append(final)
    out, final = torch.cat(outs, -1), torch.cat(finals)
    ((out.float() * gout).sum() + (final.float() * gfinal).sum()).backward()
    return out, final


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("total,kind,width,channel_last", [
    (150, "mixed", 4, False), (150, "mixed", 4, True), (16, "short", 4, False), (16, "short", 8, True),
    (60, "whole", 2, False), (2300, "mixed", 3, True)])
def test_conv_packed_equals_each_sequence(backend, total, kind, width, channel_last):
    if backend == "triton" and total > 1000:
        pytest.skip("interpreter time: the long pack runs on the compiled backends")
    cu = boundaries(total, kind, seed=total + width)
    num_seqs = cu.numel() - 1
    base = conv_inputs(total, num_seqs, dim=20, width=width, channel_last=channel_last, seed=width)
    gout = torch.randn(base["x"].shape)
    gfinal = torch.randn(base["initial_states"].shape)

    packed = leaves(base)
    out, final = run_conv_packed(packed, cu, backend, gout, gfinal)
    assert final.shape == (num_seqs, 20, width - 1)

    ref = leaves({k: v.double() for k, v in base.items()})
    out_ref, final_ref = causal_conv1d_ref(ref["x"], ref["weight"], ref["bias"], ref["initial_states"], True, "silu",
                                           cu)
    ((out_ref * gout.double()).sum() + (final_ref * gfinal.double()).sum()).backward()
    check_close(out, out_ref, 1e-5, "out vs float64")
    check_close(final, final_ref, 1e-6, "final_states vs float64")
    for k, g in grads(ref).items():
        check_close(packed[k].grad, g, 1e-5, f"d{k} vs float64")

    if backend == "torch":
        return
    each = leaves(base)
    out_each, final_each = run_conv_each(each, cu, backend, gout, gfinal)
    check_close(out, out_each, 1e-6, "out vs each sequence")
    check_close(final, final_each, 0, "final_states vs each sequence")
    for k, g in grads(each).items():
        check_close(packed[k].grad, g, 1e-5, f"d{k} vs each sequence")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_conv_packed_bf16_without_states(backend):
    cu = boundaries(120, "mixed", seed=5)
    x = torch.randn(1, 24, 120).bfloat16()
    weight, bias = torch.randn(24, 4), torch.randn(24)
    out, final = fastscan.causal_conv1d_fn(x, weight, bias, None, True, None, backend, cu_seqlens=cu)
    out_ref, final_ref = causal_conv1d_ref(x.double(), weight.double(), bias.double(), None, True, None, cu)
    check_close(out, out_ref, 1e-2, "bf16 out")
    check_close(final, final_ref, 0, "bf16 final_states")


# ---------------------------------------------------------------------------------------------
# bad boundaries, op contract, torch.compile
# ---------------------------------------------------------------------------------------------

BAD = [
    (torch.tensor([1, 4, 9], dtype=torch.int32), "cu_seqlens: expected to start at 0, got 1"),
    (torch.tensor([0, 5, 4, 9], dtype=torch.int32), "cu_seqlens: expected non-decreasing boundaries, got 5 then 4"),
    (torch.tensor([0, 4, 8], dtype=torch.int32), "cu_seqlens: expected to end at the packed length 9, got 8"),
    (torch.tensor([0, 4, 9], dtype=torch.int64), "cu_seqlens: expected int32, got torch.int64"),
    (torch.tensor([0], dtype=torch.int32), r"cu_seqlens: expected shape \(num_seqs \+ 1,\)"),
    ([0, 4, 9], "cu_seqlens: expected a torch.Tensor"),
]


@pytest.mark.parametrize("cu,match", BAD)
def test_bad_cu_seqlens_raise(cu, match):
    u = torch.randn(1, 4, 9)
    with pytest.raises(ValueError, match=match):
        fastscan.selective_scan_fn(u, torch.rand(1, 4, 9), -torch.rand(4, 3), torch.randn(1, 3, 9),
                                   torch.randn(1, 3, 9), cu_seqlens=cu)
    with pytest.raises(ValueError, match=match):
        fastscan.causal_conv1d_fn(u, torch.randn(4, 4), cu_seqlens=cu)


def test_packed_needs_batch_1_and_per_sequence_states():
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="u: packed sequences .* need batch 1, got batch 2"):
        fastscan.selective_scan_fn(torch.randn(2, 4, 9), torch.rand(2, 4, 9), -torch.rand(4, 3),
                                   torch.randn(2, 3, 9), torch.randn(2, 3, 9), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"initial_state: expected shape \(num_seqs=2, dim=4, dstate=3\)"):
        fastscan.selective_scan_fn(torch.randn(1, 4, 9), torch.rand(1, 4, 9), -torch.rand(4, 3),
                                   torch.randn(1, 3, 9), torch.randn(1, 3, 9), initial_state=torch.randn(1, 4, 3),
                                   cu_seqlens=cu)
    with pytest.raises(ValueError, match="x: packed sequences .* need batch 1, got batch 2"):
        fastscan.causal_conv1d_fn(torch.randn(2, 4, 9), torch.randn(4, 4), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"initial_states: expected shape \(num_seqs=2, dim=4, width-1=3\)"):
        fastscan.causal_conv1d_fn(torch.randn(1, 4, 9), torch.randn(4, 4), initial_states=torch.randn(1, 4, 3),
                                  cu_seqlens=cu)


COMPILED = [b for b in ("cpu", "cuda_emu") if b in fastscan.available_backends()]


@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck_packed(backend):
    cu = torch.tensor([0, 1, 1, 7, 11], dtype=torch.int32)
    t = scan_inputs(11, 4, dim=4, dstate=3, groups=1)
    for k in ("u", "delta", "B", "C", "initial_state"):
        t[k].requires_grad_(True)
    torch.library.opcheck(torch.ops.fastscan.selective_scan_fwd.default,
                          (t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True,
                           t["initial_state"], cu, backend))
    c = conv_inputs(11, 4, dim=6, width=4, channel_last=True)
    for k in ("x", "weight", "bias", "initial_states"):
        c[k].requires_grad_(True)
    torch.library.opcheck(torch.ops.fastscan.causal_conv1d_fwd.default,
                          (c["x"], c["weight"], c["bias"], c["initial_states"], True, cu, backend))


@pytest.mark.parametrize("backend", COMPILED)
def test_torch_compile_packed_block(backend):
    """conv -> scan over a pack, compiled with fullgraph, equals eager (values and gradients)."""
    torch._dynamo.reset()
    cu = torch.tensor([0, 5, 6, 20, 33], dtype=torch.int32)
    x = torch.randn(1, 8, 33, requires_grad=True)
    weight, A = torch.randn(8, 4), -torch.rand(8, 4)
    B, C = torch.randn(1, 4, 33), torch.randn(1, 4, 33)

    def block(x, cu):
        h = fastscan.causal_conv1d_fn(x, weight, None, None, False, "silu", backend, cu_seqlens=cu)
        y, last = fastscan.selective_scan_fn(h, torch.sigmoid(x), A, B, C, return_last_state=True,
                                             backend=backend, cu_seqlens=cu)
        return y, last

    y, last = block(x, cu)
    (gx,) = torch.autograd.grad((y.sum() + last.sum()), x)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y_c, last_c = compiled(x, cu)
    (gx_c,) = torch.autograd.grad((y_c.sum() + last_c.sum()), x)
    assert last_c.shape == (4, 8, 4)
    check_close(y_c, y, 1e-6, "compiled y")
    check_close(last_c, last, 1e-6, "compiled last_state")
    check_close(gx_c, gx, 1e-6, "compiled dx")
