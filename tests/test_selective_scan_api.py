"""selective_scan_fn as an API: validation errors, torch.library op contract, torch.compile."""
import pytest
import torch

import fastscan
from fastscan.selective_scan import selective_scan_ref
from conftest import rel_err


def good(batch=2, dim=4, seqlen=9, dstate=3, groups=None):
    shape_bc = (batch, dstate, seqlen) if groups is None else (batch, groups, dstate, seqlen)
    return dict(u=torch.randn(batch, dim, seqlen), delta=torch.rand(batch, dim, seqlen),
                A=-torch.rand(dim, dstate), B=torch.randn(*shape_bc), C=torch.randn(*shape_bc))


@pytest.mark.parametrize("change,match", [
    (dict(u=torch.randn(4, 9)), r"u: expected \(batch, dim, seqlen\)"),
    (dict(delta=torch.rand(2, 4, 8)), r"delta: expected shape \(2, 4, 9\)"),
    (dict(delta=torch.rand(2, 4, 9, dtype=torch.float64)), "delta: expected u's dtype"),
    (dict(A=-torch.rand(4, 3, dtype=torch.float64)), "A: expected float32"),
    (dict(A=-torch.rand(5, 3)), r"A: expected \(dim=4, dstate\)"),
    (dict(B=torch.randn(2, 3, 8)), "C: expected B's shape"),
    (dict(B=torch.randn(2, 3, 3, 9), C=torch.randn(2, 3, 3, 9)), "divisible by groups=3"),
    (dict(B=torch.randn(2, 4, 9), C=torch.randn(2, 4, 9)), r"B: expected \(batch=2, \[groups,\] dstate=3"),
    (dict(B=torch.randn(9), C=torch.randn(9)), "B: expected"),
    (dict(D=torch.randn(5)), r"D: expected shape \(4,\)"),
    (dict(z=torch.randn(2, 4)), "z: expected shape"),
    (dict(delta_bias=torch.randn(4, 1)), "delta_bias: expected shape"),
    (dict(initial_state=torch.randn(2, 4, 4)), r"initial_state: expected shape \(batch=2, dim=4, dstate=3\)"),
    (dict(u=torch.randn(2, 4, 9).int()), "u: expected float32, float16 or bfloat16"),
    (dict(u=[1.0]), "u: expected a torch.Tensor"),
])
def test_bad_input_names_the_argument(change, match):
    args = good()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        fastscan.selective_scan_fn(**args)


def test_mixed_devices_rejected():
    args = good()
    args["D"] = torch.randn(4, device="meta")
    with pytest.raises(ValueError, match="D: expected device cpu"):
        fastscan.selective_scan_fn(**args)


def test_complex_A_not_implemented():
    args = good()
    args["A"] = torch.complex(-torch.rand(4, 3), torch.rand(4, 3))
    with pytest.raises(NotImplementedError, match="complex"):
        fastscan.selective_scan_fn(**args)


def _compiled_backends():
    return [b for b in ("cpu", "cuda_emu") if b in fastscan.available_backends()]


@pytest.mark.parametrize("backend", _compiled_backends())
def test_opcheck(backend):
    args = good(groups=2)
    args["A"] = -torch.rand(4, 3)
    for k in ("u", "delta", "B", "C"):
        args[k].requires_grad_(True)
    D, z, bias, h0 = torch.randn(4), torch.randn(2, 4, 9), torch.randn(4), torch.randn(2, 4, 3)
    torch.library.opcheck(torch.ops.fastscan.selective_scan_fwd.default,
                          (args["u"], args["delta"], args["A"], args["B"], args["C"], D, z, bias, True, h0, None, backend))
    torch.library.opcheck(torch.ops.fastscan.selective_scan_fwd.default,
                          (args["u"], args["delta"], args["A"], args["B"], args["C"], None, None, None, False, None,
                           None, backend))


@pytest.mark.parametrize("backend", _compiled_backends())
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    args = good(dim=8, seqlen=33, dstate=4)
    D = torch.randn(8)

    def block(u, delta, A, B, C, D):
        y, last = fastscan.selective_scan_fn(u.sin(), delta, A, B, C, D=D, delta_softplus=True,
                                             return_last_state=True, backend=backend)
        return y * 2 + 1, last

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y_c, last_c = compiled(*args.values(), D)
    y_e, last_e = block(*args.values(), D)
    assert rel_err(y_c, y_e) < 1e-6 and rel_err(last_c, last_e) < 1e-6
    u = args["u"].clone().requires_grad_(True)
    compiled(u, *list(args.values())[1:], D)[0].sum().backward()
    expected = torch.autograd.grad(selective_scan_ref(u.sin(), args["delta"], args["A"], args["B"], args["C"], D,
                                                      delta_softplus=True).sum() * 2, u)[0]
    assert rel_err(u.grad, expected) < 1e-4


@pytest.mark.parametrize("backend", _compiled_backends())
def test_torch_compile_inductor(backend):
    """The default inductor backend (C++ codegen on CPU) also traces through the op."""
    torch._dynamo.reset()
    args = good(dim=8, seqlen=17, dstate=4)
    fn = torch.compile(lambda *a: fastscan.selective_scan_fn(*a, backend=backend) + 1, fullgraph=True)
    try:
        out = fn(*args.values())
    except Exception as exc:  # inductor needs a working C++ toolchain; report it as a skip, not a pass
        if "CppCompileError" in type(exc).__name__ or "InvalidCxxCompiler" in type(exc).__name__:
            pytest.skip(f"inductor cannot compile C++ here: {exc}")
        raise
    assert rel_err(out, selective_scan_ref(*args.values()) + 1) < 1e-5
