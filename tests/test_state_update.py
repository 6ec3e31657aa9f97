"""selective_state_update (the Mamba decode step) on every backend against the float64 reference;
N decode steps against one selective_scan_fn call; validation, opcheck and torch.compile."""
import math

import pytest
import torch

import fastscan
from fastscan.state_update import selective_state_update, selective_state_update_ref
from conftest import rel_err

BACKENDS = ["torch", "cpu", "cuda_emu", "triton"]
TOLERANCE = {torch.float32: 6e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}
OPTIONS = ("D", "z", "dt_bias", "softplus")
ALL_ON = dict.fromkeys(OPTIONS, True)


def require(backend):
    if backend not in fastscan.available_backends():
        pytest.skip(f"backend {backend} not available here")


def make_inputs(batch, dim, dstate, groups, dtype, state_dtype, options, layout="contiguous", seed=0):
    """Fresh random inputs (dt > 0 after softplus, A < 0) and the cache the state lives in.

    layout: "contiguous"; "cache_slice": state is cache[1:, :, ::2] of a larger cache and x, dt, z, B,
    C are strided views; "transposed": state is a (batch, dstate, dim) tensor viewed as (batch, dim, dstate).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    if layout == "cache_slice":
        cache = randn(batch + 1, dim, 2 * dstate).to(state_dtype)
        state = cache[1:, :, ::2]
        x, z = (randn(dim, batch).to(dtype).t() for _ in range(2))  # (batch, dim) with strides (1, batch)
        dt = (randn(dim, batch, scale=0.5) - 1.0).to(dtype).t()
        B, C = (randn(batch, dstate, groups).to(dtype).transpose(1, 2) for _ in range(2))
    else:
        if layout == "transposed":
            cache = randn(batch, dstate, dim).to(state_dtype)
            state = cache.transpose(1, 2)
        else:
            cache = randn(batch, dim, dstate).to(state_dtype)
            state = cache
        x, z = randn(batch, dim).to(dtype), randn(batch, dim).to(dtype)
        dt = (randn(batch, dim, scale=0.5) - 1.0).to(dtype)
        B, C = randn(batch, groups, dstate).to(dtype), randn(batch, groups, dstate).to(dtype)
    if not options.get("softplus"):
        dt = torch.nn.functional.softplus(dt.float()).to(dtype)  # keep dt positive
    inputs = dict(state=state, x=x, dt=dt, A=-torch.exp(randn(dim, dstate, scale=0.5)),
                  B=B if groups > 1 else B[:, 0], C=C if groups > 1 else C[:, 0])
    inputs["D"] = randn(dim) if options.get("D") else None
    inputs["z"] = z if options.get("z") else None
    inputs["dt_bias"] = randn(dim, scale=0.5) if options.get("dt_bias") else None
    return inputs, cache


def check(backend, batch, dim, dstate, groups, dtype, state_dtype, options, layout="contiguous", seed=0):
    require(backend)
    inputs, cache = make_inputs(batch, dim, dstate, groups, dtype, state_dtype, options, layout, seed)
    softplus = bool(options.get("softplus"))
    oracle = {k: (v.double().clone() if v is not None else None) for k, v in inputs.items()}
    expected_y = selective_state_update_ref(**oracle, dt_softplus=softplus)
    cache_before = cache.clone()
    y = selective_state_update(**inputs, dt_softplus=softplus, backend=backend)
    assert y.shape == (batch, dim) and y.dtype == dtype and y.is_contiguous()
    errors = {"y": rel_err(y, expected_y), "state": rel_err(inputs["state"], oracle["state"])}
    tol = TOLERANCE[dtype]
    assert all(e <= tol for e in errors.values()), f"{backend} {dtype}/{state_dtype}: errors {errors} above {tol}"
    # The cache around a sliced state is untouched: zero the state's elements in both and compare.
    touched = torch.zeros(cache.shape, dtype=torch.bool)
    touched.as_strided(inputs["state"].shape, inputs["state"].stride(),
                       inputs["state"].storage_offset()).fill_(True)
    assert torch.equal(cache[~touched], cache_before[~touched])


SIZE_CASES = [(3, 5, 1, 1), (2, 6, 4, 2), (3, 50, 16, 2), (2, 21, 64, 1), (1, 7, 200, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,dim,dstate,groups", SIZE_CASES)
def test_sizes(backend, batch, dim, dstate, groups):
    check(backend, batch, dim, dstate, groups, torch.float32, torch.float32, ALL_ON, seed=dim * 7 + dstate)


OPTION_CASES = [{k: k != off for k in OPTIONS} for off in OPTIONS] + [dict.fromkeys(OPTIONS, False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", OPTION_CASES, ids=lambda o: "off:" + ",".join(k for k, v in o.items() if not v))
def test_options(backend, options):
    check(backend, 2, 12, 16, 2, torch.float32, torch.float32, options, seed=len(str(options)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,state_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32), (torch.float16, torch.float16)])
def test_low_precision(backend, dtype, state_dtype):
    check(backend, 2, 37, 16, 1, dtype, state_dtype, ALL_ON, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["cache_slice", "transposed"])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_strided_state(backend, layout, dtype, state_dtype):
    check(backend, 3, 10, 8, 2, dtype, state_dtype, ALL_ON, layout=layout, seed=9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softplus_threshold(backend):
    """dt' around softplus's threshold 20 and far below 0, where log1p(exp(x)) loses precision."""
    require(backend)
    inputs, _ = make_inputs(1, 8, 4, 1, torch.float32, torch.float32, dict(ALL_ON, dt_bias=False), seed=2)
    inputs["dt"] = torch.tensor([[-30.0, -16.0, -1.0, 0.0, 19.9, 20.0, 20.1, 50.0]])
    inputs["A"] = -torch.rand(8, 4, generator=torch.Generator().manual_seed(1)) * 0.05
    oracle = {k: (v.double().clone() if v is not None else None) for k, v in inputs.items()}
    expected = selective_state_update_ref(**oracle, dt_softplus=True)
    y = selective_state_update(**inputs, dt_softplus=True, backend=backend)
    # per channel, not as one norm: the small dt' channels would hide under the large ones
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(inputs["state"].double(), oracle["state"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [1, 2])
def test_decode_steps_equal_one_scan(backend, groups):
    """N decode steps from state s give the outputs and final state of one scan from initial_state s."""
    require(backend)
    g = torch.Generator().manual_seed(groups)
    batch, dim, dstate, seqlen = 2, 6, 16, 9
    u, z = torch.randn(batch, dim, seqlen, generator=g), torch.randn(batch, dim, seqlen, generator=g)
    delta = torch.randn(batch, dim, seqlen, generator=g) * 0.5 - 1.0
    B, C = (torch.randn(batch, groups, dstate, seqlen, generator=g) for _ in range(2))
    if groups == 1:
        B, C = B[:, 0], C[:, 0]
    A = -torch.exp(torch.randn(dim, dstate, generator=g) * 0.5)
    D, bias = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    h0 = torch.randn(batch, dim, dstate, generator=g)
    y_scan, last = fastscan.selective_scan_fn(u, delta, A, B, C, D, z, bias, delta_softplus=True,
                                              return_last_state=True, initial_state=h0, backend=backend)
    state = h0.clone()
    ys = [selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t], bias,
                                 dt_softplus=True, backend=backend) for t in range(seqlen)]
    assert rel_err(torch.stack(ys, dim=-1), y_scan) < 1e-5
    assert rel_err(state, last) < 1e-5


def test_reference_matches_explicit_loop():
    """The oracle itself, against a per-element recurrence written independently."""
    inputs, _ = make_inputs(2, 4, 3, 2, torch.float64, torch.float64, ALL_ON, seed=4)
    s0 = inputs["state"].clone()
    y = selective_state_update_ref(**inputs, dt_softplus=True)
    x, dt, A, B, C = (inputs[k] for k in ("x", "dt", "A", "B", "C"))
    for b in range(2):
        for d in range(4):
            g = d // 2
            v = dt[b, d].item() + inputs["dt_bias"][d].item()
            v = v if v > 20 else math.log1p(math.exp(v))
            h = [math.exp(v * A[d, n].item()) * s0[b, d, n].item() + v * B[b, g, n].item() * x[b, d].item()
                 for n in range(3)]
            out = sum(h[n] * C[b, g, n].item() for n in range(3)) + inputs["D"][d].item() * x[b, d].item()
            zz = inputs["z"][b, d].item()
            out *= zz / (1 + math.exp(-zz))
            assert abs(out - y[b, d].item()) < 1e-9 * max(1.0, abs(out))
            assert max(abs(h[n] - inputs["state"][b, d, n].item()) for n in range(3)) < 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    require(backend)
    inputs, _ = make_inputs(0, 4, 3, 1, torch.float32, torch.float32, ALL_ON)
    assert selective_state_update(**inputs, backend=backend).shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# API: validation, gradients, the torch.library op, torch.compile
# ---------------------------------------------------------------------------------------------

def good(batch=2, dim=4, dstate=3, groups=None):
    shape_bc = (batch, dstate) if groups is None else (batch, groups, dstate)
    return dict(state=torch.randn(batch, dim, dstate), x=torch.randn(batch, dim), dt=torch.rand(batch, dim),
                A=-torch.rand(dim, dstate), B=torch.randn(*shape_bc), C=torch.randn(*shape_bc))


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(2, 4, 1)), r"x: expected \(batch, dim\)"),
    (dict(x=torch.randn(2, 4).int()), "x: expected float32, float16 or bfloat16"),
    (dict(x=[1.0]), "x: expected a torch.Tensor"),
    (dict(state=torch.randn(2, 4, 4)), r"state: expected shape \(2, 4, 3\)"),
    (dict(state=torch.randn(2, 4, 3, dtype=torch.float64)), "state: expected float32 or x's dtype"),
    (dict(state=torch.randn(2, 4, 3).to(torch.bfloat16)), "state: expected float32 or x's dtype"),
    (dict(state=torch.randn(1, 4, 3).expand(2, 4, 3)), "state: is updated in place"),
    (dict(dt=torch.rand(2, 5)), r"dt: expected shape \(2, 4\)"),
    (dict(dt=torch.rand(2, 4, dtype=torch.float64)), "dt: expected x's dtype"),
    (dict(A=-torch.rand(4, 3, dtype=torch.float64)), "A: expected float32"),
    (dict(A=-torch.rand(5, 3)), r"A: expected \(dim=4, dstate\)"),
    (dict(B=torch.randn(2, 2)), "C: expected B's shape"),
    (dict(B=torch.randn(2, 3, 3), C=torch.randn(2, 3, 3)), "divisible by groups=3"),
    (dict(B=torch.randn(2, 4), C=torch.randn(2, 4)), r"B: expected \(batch=2, \[groups,\] dstate=3\)"),
    (dict(B=torch.randn(3), C=torch.randn(3)), "B: expected"),
    (dict(D=torch.randn(5)), r"D: expected shape \(4,\)"),
    (dict(z=torch.randn(2, 4, 1)), "z: expected shape"),
    (dict(dt_bias=torch.randn(4, 1)), "dt_bias: expected shape"),
])
def test_bad_input_names_the_argument(change, match):
    args = good()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        selective_state_update(**args)


def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match="D: expected device cpu"):
        selective_state_update(**good(), D=torch.randn(4, device="meta"))


@pytest.mark.parametrize("name", ["x", "A", "state"])
def test_requires_grad_is_rejected_outside_no_grad(name):
    """No backward: a tensor requiring grad raises while grad mode is on, and works under no_grad."""
    args = good()
    args[name].requires_grad_(True)
    with pytest.raises(ValueError, match=f"{name}: requires grad.*no_grad"):
        selective_state_update(**args)
    with torch.no_grad():
        y = selective_state_update(**args, backend="cpu" if "cpu" in fastscan.available_backends() else "torch")
    assert not y.requires_grad


def test_inference_mode():
    args = good(groups=2)
    with torch.inference_mode():
        args = {k: v.clone() for k, v in args.items()}
        expected_state = args["state"].double()
        expected = selective_state_update_ref(expected_state, args["x"].double(), args["dt"], args["A"], args["B"],
                                              args["C"])
        assert rel_err(selective_state_update(**args), expected) < 1e-5
        assert rel_err(args["state"], expected_state) < 1e-5


def _compiled_backends():
    return [b for b in ("cpu", "cuda_emu") if b in fastscan.available_backends()]


@pytest.mark.parametrize("backend", _compiled_backends())
def test_opcheck(backend):
    args = good(groups=2)
    D, z, bias = torch.randn(4), torch.randn(2, 4), torch.randn(4)
    op = torch.ops.fastscan.selective_state_update.default
    torch.library.opcheck(op, (*args.values(), D, z, bias, True, backend))
    torch.library.opcheck(op, (*good(groups=1).values(), None, None, None, False, backend))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(compiler):
    """A decode step on a slice of a stacked per-layer cache, compiled with fullgraph, matches eager."""
    require("cpu")
    torch._dynamo.reset()
    layers, batch, dim, dstate = 3, 2, 8, 4
    args = good(batch, dim, dstate)
    del args["state"]
    D = torch.randn(dim)

    def step(cache, layer, x, dt, A, B, C, D):
        y = selective_state_update(cache[layer], x.sin(), dt, A, B, C, D=D, dt_softplus=True, backend="cpu")
        return y * 2 + 1

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    cache_c = torch.randn(layers, batch, dim, dstate)
    cache_e = cache_c.clone()
    with torch.no_grad():
        for _ in range(2):  # the state advances between calls
            try:
                y_c = compiled(cache_c, 1, *args.values(), D)
            except Exception as exc:  # inductor needs a working C++ toolchain: a skip, not a pass
                if "CppCompileError" in type(exc).__name__ or "InvalidCxxCompiler" in type(exc).__name__:
                    pytest.skip(f"inductor cannot compile C++ here: {exc}")
                raise
            y_e = step(cache_e, 1, *args.values(), D)
            assert rel_err(y_c, y_e) < 1e-6
            assert torch.allclose(cache_c, cache_e, rtol=1e-6, atol=1e-6)
