"""selective_scan_fn on every backend against the float64 reference: outputs, last_state, all gradients."""
import functools
import itertools
import math
import os

import pytest
import torch

import fastscan
from fastscan.selective_scan import selective_scan_ref
from conftest import rel_err

KERNEL_BACKENDS = ["torch", "cpu", "cuda_emu", "triton"]
TOLERANCE = {torch.float32: 6e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}
OPTIONS = ("D", "z", "delta_bias", "softplus", "initial_state", "last_state")


def require(backend):
    if backend not in fastscan.available_backends():
        pytest.skip(f"backend {backend} not available here")


def make_inputs(batch, dim, seqlen, dstate, groups, dtype, options, layout="contiguous", seed=0):
    """Fresh random inputs in the value ranges Mamba sees (delta > 0 after softplus, A < 0)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    if layout == "contiguous":
        u = randn(batch, dim, seqlen).to(dtype)
        delta = (randn(batch, dim, seqlen, scale=0.5) - 1.0).to(dtype)
        z = randn(batch, dim, seqlen).to(dtype)
        B = randn(batch, groups, dstate, seqlen).to(dtype)
        C = randn(batch, groups, dstate, seqlen).to(dtype)
    else:  # channel-last memory as a model produces it: (batch, seqlen, dim) viewed as (batch, dim, seqlen)
        u = randn(batch, seqlen, dim).to(dtype).transpose(1, 2)
        delta = (randn(batch, seqlen, dim, scale=0.5) - 1.0).to(dtype).transpose(1, 2)
        z = randn(batch, seqlen, dim).to(dtype).transpose(1, 2)
        B = randn(batch, seqlen, groups, dstate).to(dtype).permute(0, 2, 3, 1)
        C = randn(batch, seqlen, groups, dstate).to(dtype).permute(0, 2, 3, 1)
    if not options.get("softplus"):
        delta = torch.nn.functional.softplus(delta.float()).to(dtype)  # keep delta positive
    A = -torch.exp(randn(dim, dstate, scale=0.5))
    inputs = dict(u=u, delta=delta, A=A, B=B if groups > 1 else B[:, 0], C=C if groups > 1 else C[:, 0])
    inputs["D"] = randn(dim) if options.get("D") else None
    inputs["z"] = z if options.get("z") else None
    inputs["delta_bias"] = randn(dim, scale=0.5) if options.get("delta_bias") else None
    inputs["initial_state"] = randn(batch, dim, dstate) if options.get("initial_state") else None
    return inputs


def run(inputs, backend, options, grad_out, grad_last):
    """Forward + backward; returns {name: tensor} of outputs and gradients of every tensor input."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    scan = selective_scan_ref if backend == "oracle" else functools.partial(fastscan.selective_scan_fn,
                                                                            backend=backend)
    out = scan(**leaves, delta_softplus=bool(options.get("softplus")),
               return_last_state=bool(options.get("last_state")))
    y, last = out if options.get("last_state") else (out, None)
    loss = (y.double() * grad_out).sum()
    if last is not None:
        loss = loss + (last.double() * grad_last).sum()
    loss.backward()
    result = {"y": y.detach(), "last_state": last.detach() if last is not None else None}
    result.update({f"d{k}": v.grad for k, v in leaves.items() if v is not None})
    return result


def check(backend, batch, dim, seqlen, dstate, groups, dtype, options, layout="contiguous", seed=0):
    require(backend)
    inputs = make_inputs(batch, dim, seqlen, dstate, groups, dtype, options, layout, seed)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(batch, dim, seqlen, generator=g, dtype=torch.float64)
    grad_last = torch.randn(batch, dim, dstate, generator=g, dtype=torch.float64)
    expected = run({k: (v.double() if v is not None else None) for k, v in inputs.items()},
                   "oracle", options, grad_out, grad_last)
    actual = run(inputs, backend, options, grad_out, grad_last)
    tol = TOLERANCE[dtype]
    errors = {}
    for name, exp in expected.items():
        if exp is None:
            assert actual[name] is None, name
            continue
        assert actual[name] is not None, f"{name}: missing"
        assert actual[name].shape == exp.shape, f"{name}: shape {actual[name].shape} != {exp.shape}"
        errors[name] = rel_err(actual[name], exp)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"{backend} {dtype}: relative error above {tol}: {bad} (all: {errors})"


ALL_ON = dict.fromkeys(OPTIONS, True)
# Every seqlen of the issue, each with a different dstate / groups so all values are covered.
SIZE_CASES = list(zip([1, 2, 7, 64, 129, 1000, 2049], itertools.cycle([1, 4, 16, 64]), itertools.cycle([1, 2])))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("seqlen,dstate,groups", SIZE_CASES)
def test_sizes(backend, seqlen, dstate, groups):
    check(backend, 2, 4, seqlen, dstate, groups, torch.float32, ALL_ON, seed=seqlen * 7 + dstate)


# Each option off on its own, and everything off.
OPTION_CASES = [{k: k != off for k in OPTIONS} for off in OPTIONS] + [dict.fromkeys(OPTIONS, False)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("options", OPTION_CASES, ids=lambda o: "off:" + ",".join(k for k, v in o.items() if not v))
def test_options(backend, options):
    check(backend, 2, 6, 67, 16, 2, torch.float32, options, seed=len(str(options)))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype,seqlen,dstate", [(torch.bfloat16, 7, 16), (torch.bfloat16, 300, 4),
                                                 (torch.float16, 129, 16)])
def test_low_precision(backend, dtype, seqlen, dstate):
    check(backend, 2, 4, seqlen, dstate, 1, dtype, ALL_ON, seed=seqlen)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_last_views(backend, dtype):
    check(backend, 2, 8, 133, 16, 2, dtype, ALL_ON, layout="channel_last", seed=5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_split_sequence_through_state(backend):
    """Scanning [0, t) then [t, L) from its last_state equals one call over [0, L)."""
    require(backend)
    options = dict(ALL_ON)
    inputs = make_inputs(1, 4, 150, 16, 1, torch.float32, options, seed=11)
    common = dict(A=inputs["A"], D=inputs["D"], delta_bias=inputs["delta_bias"], delta_softplus=True,
                  return_last_state=True, backend=backend)
    whole, whole_last = fastscan.selective_scan_fn(
        inputs["u"], inputs["delta"], B=inputs["B"], C=inputs["C"], z=inputs["z"],
        initial_state=inputs["initial_state"], **common)
    t = 61
    part = lambda x, s: x[..., s]  # noqa: E731
    y1, s1 = fastscan.selective_scan_fn(
        part(inputs["u"], slice(0, t)), part(inputs["delta"], slice(0, t)), B=part(inputs["B"], slice(0, t)),
        C=part(inputs["C"], slice(0, t)), z=part(inputs["z"], slice(0, t)),
        initial_state=inputs["initial_state"], **common)
    y2, s2 = fastscan.selective_scan_fn(
        part(inputs["u"], slice(t, None)), part(inputs["delta"], slice(t, None)),
        B=part(inputs["B"], slice(t, None)), C=part(inputs["C"], slice(t, None)),
        z=part(inputs["z"], slice(t, None)), initial_state=s1, **common)
    assert rel_err(torch.cat([y1, y2], dim=-1), whole) < 1e-5
    assert rel_err(s2, whole_last) < 1e-5


def test_reference_matches_explicit_recurrence():
    """The oracle itself, against a direct per-element recurrence written independently."""
    inputs = make_inputs(1, 3, 9, 2, 1, torch.float64, ALL_ON, seed=3)
    u, delta, A, B, C = (inputs[k] for k in ("u", "delta", "A", "B", "C"))
    D, z, bias, h0 = inputs["D"], inputs["z"], inputs["delta_bias"], inputs["initial_state"]
    y, last = selective_scan_ref(u, delta, A, B, C, D, z, bias, True, True, h0)
    for d in range(3):
        h = [h0[0, d, n].item() for n in range(2)]
        for t in range(9):
            x = delta[0, d, t].item() + bias[d].item()
            dt = x if x > 20 else math.log1p(math.exp(x))
            h = [math.exp(dt * A[d, n].item()) * h[n] + dt * B[0, n, t].item() * u[0, d, t].item()
                 for n in range(2)]
            out = sum(h[n] * C[0, n, t].item() for n in range(2)) + D[d].item() * u[0, d, t].item()
            zz = z[0, d, t].item()
            out *= zz / (1 + math.exp(-zz))
            assert abs(out - y[0, d, t].item()) < 1e-9 * max(1.0, abs(out))
        assert max(abs(h[n] - last[0, d, n].item()) for n in range(2)) < 1e-9


def test_backend_env_override(monkeypatch):
    require("cpu")
    inputs = make_inputs(1, 2, 5, 4, 1, torch.float32, {}, seed=1)
    monkeypatch.setenv("FASTSCAN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTSCAN_BACKEND"):
        fastscan.selective_scan_fn(**inputs)
    monkeypatch.setenv("FASTSCAN_BACKEND", "torch")
    torch.testing.assert_close(fastscan.selective_scan_fn(**inputs), selective_scan_ref(**inputs))


def test_unavailable_backend_says_how_to_get_it():
    inputs = make_inputs(1, 2, 5, 4, 1, torch.float32, {}, seed=1)
    with pytest.raises(ValueError, match="backend: got 'cudnn'"):
        fastscan.selective_scan_fn(**inputs, backend="cudnn")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="FASTSCAN_BUILD_CUDA=1"):
            fastscan.selective_scan_fn(**inputs, backend="cuda")


def test_default_backend_on_cpu_is_the_cpu_kernel():
    if os.environ.get("FASTSCAN_BACKEND"):
        pytest.skip("FASTSCAN_BACKEND is set")
    require("cpu")
    assert fastscan.backends.resolve(None, torch.device("cpu")) == "cpu"
