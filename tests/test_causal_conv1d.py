"""causal_conv1d_fn / causal_conv1d_update on every backend against the float64 reference: outputs,
final states, all gradients (through final_states too), sequence splitting, decode updates, the API."""
import pytest
import torch

import fastscan
from fastscan.causal_conv1d import causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_update
from conftest import rel_err

KERNEL_BACKENDS = ["torch", "cpu", "cuda_emu", "triton"]
TOLERANCE = {torch.float32: 6e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def require(backend):
    if backend not in fastscan.available_backends():
        pytest.skip(f"backend {backend} not available here")


def make_x(batch, dim, seqlen, dtype, layout, g):
    if layout == "channel_last":  # (batch, seqlen, dim) memory viewed as (batch, dim, seqlen)
        return torch.randn(batch, seqlen, dim, generator=g).to(dtype).transpose(1, 2)
    if layout == "strided":  # neither axis has stride 1
        return torch.randn(batch, dim, 2 * seqlen, generator=g).to(dtype)[..., ::2]
    return torch.randn(batch, dim, seqlen, generator=g).to(dtype)


def make_inputs(batch, dim, seqlen, width, dtype, layout, bias, initial, seed):
    g = torch.Generator().manual_seed(seed)
    x = make_x(batch, dim, seqlen, dtype, layout, g)
    weight = torch.randn(dim, width, generator=g) / width ** 0.5
    b = torch.randn(dim, generator=g) if bias else None
    h0 = None
    if initial:  # the opposite layout of x: states are read by strides too
        h0 = make_x(batch, dim, width - 1, dtype, "contiguous" if layout == "channel_last" else "channel_last", g)
    return dict(x=x, weight=weight, bias=b, initial_states=h0)


def run(inputs, backend, activation, grad_out, grad_final):
    """Forward + backward through out and final_states; {name: tensor} of outputs and gradients."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    if backend == "oracle":
        out, final = causal_conv1d_ref(**leaves, return_final_states=True, activation=activation)
    else:
        out, final = causal_conv1d_fn(**leaves, return_final_states=True, activation=activation, backend=backend)
    ((out.double() * grad_out).sum() + (final.double() * grad_final).sum()).backward()
    result = {"out": out.detach(), "final_states": final.detach()}
    result.update({f"d{k}": v.grad for k, v in leaves.items() if v is not None})
    return result


def check(backend, batch, dim, seqlen, width, dtype=torch.float32, layout="contiguous", activation="silu",
          bias=True, initial=True, seed=0):
    require(backend)
    inputs = make_inputs(batch, dim, seqlen, width, dtype, layout, bias, initial, seed)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(batch, dim, seqlen, generator=g, dtype=torch.float64)
    grad_final = torch.randn(batch, dim, width - 1, generator=g, dtype=torch.float64)
    expected = run({k: (v.double() if v is not None else None) for k, v in inputs.items()}, "oracle", activation,
                   grad_out, grad_final)
    actual = run(inputs, backend, activation, grad_out, grad_final)
    if layout == "channel_last" and backend != "torch":
        assert actual["out"].stride(1) == 1, "out should keep x's channel-last layout"
    tol = TOLERANCE[dtype]
    errors = {}
    for name, exp in expected.items():
        assert actual[name] is not None and actual[name].shape == exp.shape, name
        errors[name] = rel_err(actual[name], exp)
    bad = {k: v for k, v in errors.items() if not v <= tol}  # `not <=` also catches NaN
    assert not bad, f"{backend} {dtype}: relative error above {tol}: {bad} (all: {errors})"


# (batch, dim, seqlen, width, dtype, layout, activation, bias, initial): odd sizes, seqlen 1 and
# seqlen < width-1, widths 2/3/4/8, dims that are not powers of two (partial SIMD vectors / tiles).
CASES = [
    (2, 37, 1, 4, torch.float32, "contiguous", "silu", True, True),
    (2, 37, 2, 4, torch.float32, "channel_last", "silu", True, True),
    (1, 24, 67, 2, torch.float32, "contiguous", "swish", False, True),
    (2, 19, 131, 3, torch.float32, "channel_last", None, True, False),
    (1, 9, 45, 8, torch.float32, "contiguous", "silu", True, True),
    (2, 40, 97, 4, torch.bfloat16, "contiguous", "silu", True, True),
    (2, 33, 129, 4, torch.bfloat16, "channel_last", "silu", True, True),
    (1, 300, 23, 4, torch.float32, "channel_last", "silu", True, True),
    (1, 21, 50, 3, torch.float16, "strided", "silu", True, True),
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}d{c[1]}l{c[2]}w{c[3]}-{str(c[4])[6:]}-{c[5]}-"
                                                    f"{c[6]}-{'bias' if c[7] else 'nobias'}-{'h0' if c[8] else 'noh0'}")
def test_matches_reference(backend, case):
    batch, dim, seqlen, width, dtype, layout, activation, bias, initial = case
    check(backend, batch, dim, seqlen, width, dtype, layout, activation, bias, initial, seed=seqlen * 7 + dim)


@pytest.mark.parametrize("backend", ["cpu", "cuda_emu"])
@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
def test_long_sequences(backend, layout):
    """Longer than one work chunk of the compiled kernels (cpu rows 2048, CUDA blocks 512/128 steps)."""
    check(backend, 2, 70, 2100, 4, torch.float32, layout, seed=3)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("split", [1, 30])
def test_split_sequence_through_states(backend, split):
    """[0, t) then [t, L) from its final_states equals one call over [0, L), outputs and gradients."""
    require(backend)
    inputs = make_inputs(2, 12, 41, 4, torch.float32, "channel_last", True, True, seed=11)
    x = inputs["x"].detach().requires_grad_(True)
    common = dict(weight=inputs["weight"], bias=inputs["bias"], activation="silu", return_final_states=True,
                  backend=backend)
    whole, whole_final = causal_conv1d_fn(x, initial_states=inputs["initial_states"], **common)
    out1, final1 = causal_conv1d_fn(x[..., :split], initial_states=inputs["initial_states"], **common)
    out2, final2 = causal_conv1d_fn(x[..., split:], initial_states=final1, **common)
    assert rel_err(torch.cat([out1, out2], dim=-1), whole) < 1e-6
    assert rel_err(final2, whole_final) < 1e-6
    g = torch.randn_like(whole)
    (grad_whole,) = torch.autograd.grad((whole * g).sum() + whole_final.sum(), x)
    (grad_split,) = torch.autograd.grad((out1 * g[..., :split]).sum() + (out2 * g[..., split:]).sum()
                                        + final2.sum(), x)
    assert rel_err(grad_split, grad_whole) < 1e-5


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("width,state_extra,state_dtype,tokens_per_call",
                         [(4, 0, torch.float32, 1), (4, 2, torch.float32, 3), (3, 0, torch.bfloat16, 5),
                          (2, 1, torch.float32, 1)])
def test_update_equals_full_conv(backend, width, state_extra, state_dtype, tokens_per_call):
    """Decoding N tokens (one at a time, or a few per call) gives the full conv's last N outputs and
    leaves conv_state equal to the last state_len inputs."""
    require(backend)
    batch, dim, prefix, n_new = 2, 13, 6, 7
    state_len = width - 1 + state_extra
    g = torch.Generator().manual_seed(width * 10 + tokens_per_call)
    seq = torch.randn(batch, dim, prefix + n_new, generator=g)
    weight, bias = torch.randn(dim, width, generator=g), torch.randn(dim, generator=g)
    # channel-last conv_state: (batch, state_len, dim) memory; the update writes it by strides
    conv_state = seq[..., prefix - state_len:prefix].transpose(1, 2).contiguous().transpose(1, 2).to(state_dtype)
    outs = []
    for start in range(prefix, prefix + n_new, tokens_per_call):
        chunk = seq[..., start:min(start + tokens_per_call, prefix + n_new)]
        step = chunk[..., 0] if tokens_per_call == 1 else chunk
        out = causal_conv1d_update(step, conv_state, weight, bias, activation="silu", backend=backend)
        assert out.shape == step.shape
        outs.append(out if out.dim() == 3 else out.unsqueeze(-1))
    expected = causal_conv1d_ref(seq.double(), weight.double(), bias.double(), activation="silu")[..., prefix:]
    assert rel_err(torch.cat(outs, dim=-1), expected) < (1e-5 if state_dtype == torch.float32 else 3e-2)
    expected_state = seq[..., -state_len:].to(state_dtype)
    if state_dtype == torch.float32:
        assert torch.equal(conv_state, expected_state)
    else:  # the Triton interpreter rounds float32 -> bfloat16 toward zero, the kernels to nearest
        assert rel_err(conv_state, expected_state) < 1e-2


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_update_more_tokens_than_state(backend):
    require(backend)
    g = torch.Generator().manual_seed(5)
    state = torch.randn(1, 6, 3, generator=g)
    x = torch.randn(1, 6, 5, generator=g)
    weight = torch.randn(6, 4, generator=g)
    expected = causal_conv1d_ref(torch.cat([state, x], -1).double(), weight.double())[..., 3:]
    out = causal_conv1d_update(x, state, weight, backend=backend)
    assert rel_err(out, expected) < 1e-5
    assert torch.equal(state, x[..., -3:])


# ---- API ---------------------------------------------------------------------------------------
def good(batch=2, dim=4, seqlen=9, width=4):
    return dict(x=torch.randn(batch, dim, seqlen), weight=torch.randn(dim, width))


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(4, 9)), r"x: expected \(batch, dim, seqlen\)"),
    (dict(x=torch.randn(2, 4, 9).int()), "x: expected float32, float16 or bfloat16"),
    (dict(x=[1.0]), "x: expected a torch.Tensor"),
    (dict(weight=torch.randn(5, 4)), r"weight: expected \(dim=4, width\)"),
    (dict(weight=torch.randn(4, 9)), "weight: width must be between 2 and 8, got 9"),
    (dict(weight=torch.randn(4, 1)), "weight: width must be between 2 and 8, got 1"),
    (dict(bias=torch.randn(5)), r"bias: expected shape \(4,\)"),
    (dict(initial_states=torch.randn(2, 4, 4)), r"initial_states: expected shape \(batch=2, dim=4, width-1=3\)"),
    (dict(activation="relu"), "activation: expected None, 'silu' or 'swish', got 'relu'"),
    (dict(activation=True), "activation: expected None"),
])
def test_bad_input_names_the_argument(change, match):
    args = good()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        causal_conv1d_fn(**args)


@pytest.mark.parametrize("change,match", [
    (dict(conv_state=torch.randn(2, 4, 2)), r"conv_state: expected \(batch=2, dim=4, state_len >= 3\)"),
    (dict(conv_state=torch.randn(2, 4, 3).double()), "conv_state: expected float32"),
    (dict(x=torch.randn(2, 4, 1, 1)), r"x: expected \(batch, dim\) or \(batch, dim, seqlen\)"),
    (dict(activation="gelu"), "activation: expected None, 'silu' or 'swish'"),
    (dict(weight=torch.randn(3, 4)), r"weight: expected \(dim=4, width\)"),
])
def test_update_bad_input_names_the_argument(change, match):
    args = dict(x=torch.randn(2, 4), conv_state=torch.randn(2, 4, 3), weight=torch.randn(4, 4))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        causal_conv1d_update(**args)


def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match="bias: expected device cpu"):
        causal_conv1d_fn(**good(), bias=torch.randn(4, device="meta"))


def _compiled_backends():
    return [b for b in ("cpu", "cuda_emu") if b in fastscan.available_backends()]


@pytest.mark.parametrize("backend", _compiled_backends())
def test_opcheck(backend):
    x = torch.randn(2, 6, 11).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    weight, bias = torch.randn(6, 4, requires_grad=True), torch.randn(6, requires_grad=True)
    h0 = torch.randn(2, 6, 3, requires_grad=True)
    op = torch.ops.fastscan.causal_conv1d_fwd.default
    torch.library.opcheck(op, (x, weight, bias, h0, True, None, backend))
    torch.library.opcheck(op, (x.detach().contiguous(), weight, None, None, False, None, backend))
    torch.library.opcheck(torch.ops.fastscan.causal_conv1d_update.default,
                          (torch.randn(2, 6, 2), torch.randn(2, 6, 5), torch.randn(6, 4), None, True, backend))


def test_torch_compile_fullgraph_matches_eager():
    require("cpu")
    torch._dynamo.reset()
    x, weight, bias = torch.randn(2, 8, 33), torch.randn(8, 4), torch.randn(8)

    def block(x, weight, bias):
        out, final = causal_conv1d_fn(x.sin(), weight, bias, activation="silu", return_final_states=True,
                                      backend="cpu")
        return out * 2 + 1, final

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out_c, final_c = compiled(x, weight, bias)
    out_e, final_e = block(x, weight, bias)
    assert rel_err(out_c, out_e) < 1e-6 and rel_err(final_c, final_e) < 1e-6
    xg = x.clone().requires_grad_(True)
    compiled(xg, weight, bias)[0].sum().backward()
    xr = x.clone().requires_grad_(True)
    (causal_conv1d_ref(xr.sin(), weight, bias, activation="silu").sum() * 2).backward()
    assert rel_err(xg.grad, xr.grad) < 1e-5


def test_torch_compile_update_mutates_state():
    require("cpu")
    torch._dynamo.reset()
    weight = torch.randn(8, 4)

    def decode(x, state):
        return causal_conv1d_update(x, state, weight, activation="silu", backend="cpu") + 1

    compiled = torch.compile(decode, fullgraph=True, backend="aot_eager")
    state_c, state_e, x = torch.randn(2, 8, 3), None, torch.randn(2, 8)
    state_e = state_c.clone()
    out_c, out_e = compiled(x, state_c), decode(x, state_e)
    assert rel_err(out_c, out_e) < 1e-6 and torch.equal(state_c, state_e)
    assert torch.equal(state_c[..., -1], x)


def test_default_backend_on_cpu_is_the_cpu_kernel():
    require("cpu")
    import os
    if os.environ.get("FASTSCAN_BACKEND"):
        pytest.skip("FASTSCAN_BACKEND is set")
    assert fastscan.backends.resolve(None, torch.device("cpu")) == "cpu"
