"""pool2d_tokens on every backend against the float64 reference: pooled values, gradients, the fused
scatter into a packed buffer, validation errors, the torch.library contract and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import fastscan
from fastscan.pool2d import pool2d_tokens, pool2d_tokens_ref
from conftest import rel_err

KERNEL_BACKENDS = ["torch", "cpu", "cuda_emu", "triton"]
TOLERANCE = {torch.float32: 6e-4, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def require(backend):
    if backend not in fastscan.available_backends():
        pytest.skip(f"backend {backend} not available here")


def make_x(num_images, H, W, C, dtype, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        return torch.randn(num_images, H * W, C, generator=g).to(dtype)
    if layout == "channel_stride":  # every other channel of a wider tensor
        return torch.randn(num_images, H * W, 2 * C, generator=g).to(dtype)[:, :, ::2]
    # "token_major": channels-first memory (num_images, C, H * W) viewed as (num_images, H * W, C)
    return torch.randn(num_images, C, H * W, generator=g).to(dtype).transpose(1, 2)


def pool_and_grad(fn, x, grad_out):
    leaf = x.detach().clone().requires_grad_(True)
    y = fn(leaf)
    (y.double() * grad_out).sum().backward()
    return y.detach(), leaf.grad


# (num_images, H, W, C, kernel): LongLLaVA's 24 x 24 / 2 and / 4, odd non-square grids with partial
# windows, rectangular kernels, a kernel larger than the grid, C neither a power of two nor a
# multiple of the vector width (37).
CASES = [
    (2, 24, 24, 40, 2),
    (2, 24, 24, 24, 4),
    (3, 5, 7, 37, 2),
    (2, 7, 5, 48, (3, 2)),
    (2, 3, 2, 20, 4),
    (1, 1, 9, 37, (1, 4)),
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}_{}x{}_c{}_k{}".format(*c))
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(backend, case, mode, dtype):
    require(backend)
    num_images, H, W, C, kernel = case
    seed = hash((case, mode, str(dtype))) % 1000
    x = make_x(num_images, H, W, C, dtype, seed=seed)
    expected_y, expected_dx = pool_and_grad(lambda t: pool2d_tokens_ref(t, (H, W), kernel, mode),
                                            x.double(), _grad_like(x, H, W, kernel, seed))
    y, dx = pool_and_grad(lambda t: pool2d_tokens(t, (H, W), kernel, mode, backend=backend), x,
                          _grad_like(x, H, W, kernel, seed))
    assert y.dtype == dtype and dx.dtype == dtype and y.is_contiguous()
    tol = TOLERANCE[dtype]
    assert rel_err(y, expected_y) < tol, rel_err(y, expected_y)
    assert rel_err(dx, expected_dx) < tol, rel_err(dx, expected_dx)


def _grad_like(x, H, W, kernel, seed):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    tokens = -(-H // kh) * -(-W // kw)
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(x.shape[0], tokens, x.shape[2], generator=g, dtype=torch.float64)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_float16(backend, mode):
    require(backend)
    x = make_x(2, 24, 24, 64, torch.float16, seed=11)
    grad = _grad_like(x, 24, 24, 2, 11)
    expected_y, expected_dx = pool_and_grad(lambda t: pool2d_tokens_ref(t, (24, 24), 2, mode), x.double(), grad)
    y, dx = pool_and_grad(lambda t: pool2d_tokens(t, (24, 24), 2, mode, backend=backend), x, grad)
    assert y.dtype == torch.float16 and dx.dtype == torch.float16
    assert rel_err(y, expected_y) < 3e-2 and rel_err(dx, expected_dx) < 3e-2


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["channel_stride", "token_major"])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_non_contiguous_x(backend, layout, mode):
    require(backend)
    x = make_x(2, 6, 5, 24, torch.float32, layout, seed=3)
    assert not x.is_contiguous()
    grad = _grad_like(x, 6, 5, 2, 3)
    expected_y, expected_dx = pool_and_grad(lambda t: pool2d_tokens_ref(t, (6, 5), 2, mode), x.double(), grad)
    y, dx = pool_and_grad(lambda t: pool2d_tokens(t, (6, 5), 2, mode, backend=backend), x, grad)
    assert rel_err(y, expected_y) < 6e-4 and rel_err(dx, expected_dx) < 6e-4


@pytest.mark.parametrize("H,W,kernel", [(24, 24, 2), (24, 24, 4), (5, 7, 2), (7, 5, (3, 2)), (2, 3, 4), (9, 4, (4, 3))])
def test_oracle_equals_torch_ceil_mode_pooling(H, W, kernel):
    """The documented semantics are torch's ceil_mode pooling without padding: partial windows divide
    by their valid count (count_include_pad makes no difference when padding is 0)."""
    x = torch.randn(2, H * W, 5, dtype=torch.float64)
    grid = x.reshape(2, H, W, 5).permute(0, 3, 1, 2)
    back = lambda t: t.permute(0, 2, 3, 1).reshape(2, -1, 5)  # noqa: E731
    for count_include_pad in (True, False):
        avg = F.avg_pool2d(grid, kernel, ceil_mode=True, count_include_pad=count_include_pad)
        assert torch.allclose(back(avg), pool2d_tokens_ref(x, (H, W), kernel, "avg"), rtol=0, atol=1e-12)
    assert torch.equal(back(F.max_pool2d(grid, kernel, ceil_mode=True)), pool2d_tokens_ref(x, (H, W), kernel, "max"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_max_ties_route_gradient_to_first_like_torch(backend):
    require(backend)
    H, W = 5, 7
    x = torch.randint(0, 3, (2, H * W, 19)).float()  # many equal maxima per window
    x[0, :, 0] = float("-inf")  # a channel whose windows are all -inf
    grad = torch.randn(2, 12, 19, dtype=torch.float64)
    leaf = x.double().clone().requires_grad_(True)
    F.max_pool2d(leaf.reshape(2, H, W, 19).permute(0, 3, 1, 2), 2, ceil_mode=True).permute(0, 2, 3, 1).reshape(
        2, 12, 19).mul(grad).sum().backward()
    _, dx = pool_and_grad(lambda t: pool2d_tokens(t, (H, W), 2, "max", backend=backend), x, grad)
    assert torch.equal(dx.double(), leaf.grad.to(torch.float32).double())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_max_propagates_nan(backend):
    require(backend)
    x = torch.randn(1, 16, 20)
    x[0, 5, 3] = float("nan")  # token (1, 1): window (0, 0) of a 4 x 4 grid pooled by 2
    y = pool2d_tokens(x, (4, 4), 2, "max", backend=backend)
    assert torch.isnan(y[0, 0, 3]) and torch.isnan(y).sum() == 1


def _scatter_setup(dtype, seed=0):
    num_images, H, W, C = 3, 5, 7, 24
    tokens = 12
    x = make_x(num_images, H, W, C, dtype, seed=seed)
    index = torch.tensor([40, 3, 20], dtype=torch.int64)  # unsorted, with gaps and a row 0..2 prefix
    return x, (H, W), index, tokens, 60


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scatter_writes_exactly_the_target_rows(backend, mode, dtype):
    require(backend)
    x, grid, index, tokens, rows = _scatter_setup(dtype, seed=5)
    sentinel = 12345.0
    wide = torch.full((rows, 40), sentinel, dtype=dtype)
    out = wide[:, 8:32]  # a strided view: rows 40 elements apart
    result = pool2d_tokens(x, grid, 2, mode, out=out, index=index, backend=backend)
    assert result is out
    expected = pool2d_tokens_ref(x.double(), grid, 2, mode)
    written = torch.zeros(rows, dtype=torch.bool)
    for i, start in enumerate(index.tolist()):
        assert rel_err(out[start:start + tokens], expected[i]) < TOLERANCE[dtype]
        written[start:start + tokens] = True
    assert torch.all(out[~written] == sentinel)
    assert torch.all(wide[:, :8] == sentinel) and torch.all(wide[:, 32:] == sentinel)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_scatter_gradients_reach_x_and_the_buffer(backend, mode):
    require(backend)
    x, grid, index, tokens, rows = _scatter_setup(torch.float32, seed=7)
    base = torch.randn(rows, 24)
    weight = torch.randn(rows, 24, dtype=torch.float64)

    def run(x, base, backend):
        leaf_x, leaf_base = x.clone().requires_grad_(True), base.clone().requires_grad_(True)
        out = leaf_base * 2  # a non-leaf buffer, like an embedding lookup's output
        if backend == "oracle":
            result = pool2d_tokens_ref(leaf_x, grid, 2, mode, out=out, index=index)
        else:
            result = pool2d_tokens(leaf_x, grid, 2, mode, out=out, index=index, backend=backend)
        (result.double() * weight).sum().backward()
        return result.detach(), leaf_x.grad, leaf_base.grad

    expected = run(x.double(), base.double(), "oracle")
    actual = run(x, base, backend)
    for a, e in zip(actual, expected):
        assert rel_err(a, e) < 6e-4


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("index,match", [
    ([40, 3, 49], r"index: image 2 writes rows \[49, 61\), outside out's 60 rows"),
    ([-1, 20, 40], r"index: image 0 writes rows \[-1, 11\)"),
    ([0, 11, 40], r"index: images 0 and 1 overlap"),
])
def test_scatter_rejects_bad_index_ranges(backend, index, match):
    require(backend)
    x, grid, _, _, rows = _scatter_setup(torch.float32)
    out = torch.zeros(rows, 24)
    with pytest.raises(ValueError, match=match):
        pool2d_tokens(x, grid, 2, out=out, index=torch.tensor(index), backend=backend)
    assert torch.all(out == 0)


def good():
    return dict(x=torch.randn(2, 35, 8), grid=(5, 7))


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(35, 8)), r"x: expected \(num_images, H \* W, C\)"),
    (dict(x=torch.randn(2, 35, 8).int()), "x: expected float32, float16 or bfloat16"),
    (dict(x=[1.0]), "x: expected a torch.Tensor"),
    (dict(grid=(5, 6)), r"grid: expected H \* W == x.shape\[1\] = 35, got \(5, 6\)"),
    (dict(grid=35), r"grid: expected \(H, W\)"),
    (dict(grid=(0, 35)), r"grid: expected \(H, W\)"),
    (dict(kernel=0), "kernel: expected an int >= 1"),
    (dict(kernel=(2, 2, 2)), "kernel: expected an int >= 1 or a pair"),
    (dict(kernel=2.0), "kernel: expected"),
    (dict(mode="sum"), r"mode: expected one of \('avg', 'max'\), got 'sum'"),
    (dict(out=torch.zeros(30, 8)), "index: required when out is given"),
    (dict(index=torch.tensor([0, 12])), "out: required when index is given"),
    (dict(out=torch.zeros(30, 7), index=torch.tensor([0, 12])), r"out: expected \(T, C=8\)"),
    (dict(out=torch.zeros(30, 8, dtype=torch.float64), index=torch.tensor([0, 12])), "out: expected x's dtype"),
    (dict(out=torch.zeros(30, 8), index=torch.tensor([0, 12], dtype=torch.int32)), "index: expected int64"),
    (dict(out=torch.zeros(30, 8), index=torch.tensor([0, 12, 24])), r"index: expected shape \(2,\)"),
    (dict(out=torch.zeros(30, 8, device="meta"), index=torch.tensor([0, 12])), "out: expected device cpu"),
])
def test_bad_input_names_the_argument(change, match):
    args = good()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        pool2d_tokens(**args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_zero_images(backend):
    require(backend)
    x = torch.randn(0, 16, 8, requires_grad=True)
    y = pool2d_tokens(x, (4, 4), 2, backend=backend)
    assert y.shape == (0, 4, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape


def _compiled_backends():
    return [b for b in ("cpu", "cuda_emu") if b in fastscan.available_backends()]


@pytest.mark.parametrize("backend", _compiled_backends())
def test_opcheck(backend):
    x = torch.randn(2, 35, 12, requires_grad=True)
    for mode in ("avg", "max"):
        torch.library.opcheck(torch.ops.fastscan.pool2d_tokens_fwd.default, (x, 5, 7, 2, 2, mode, backend))
        dy = torch.randn(2, 12, 12)
        torch.library.opcheck(torch.ops.fastscan.pool2d_tokens_bwd.default,
                              (dy, x.detach(), None, 5, 7, 2, 2, mode, backend))
        buffer_grad = torch.randn(40, 12)
        torch.library.opcheck(torch.ops.fastscan.pool2d_tokens_bwd.default,
                              (buffer_grad, x.detach(), torch.tensor([20, 3]), 5, 7, 2, 2, mode, backend))
        torch.library.opcheck(torch.ops.fastscan.pool2d_tokens_scatter.default,
                              (x.detach(), torch.zeros(40, 12), torch.tensor([20, 3]), 5, 7, 2, 2, mode, backend))


@pytest.mark.parametrize("backend", _compiled_backends())
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    x = torch.randn(2, 35, 12)
    index = torch.tensor([20, 3])

    def pooled(x):
        return pool2d_tokens(x.sin(), (5, 7), 2, "max", backend=backend) * 2

    def scattered(x, base):
        out = base * 1.0
        return pool2d_tokens(x.sin(), (5, 7), 2, out=out, index=index, backend=backend) + 1

    compile = lambda f: torch.compile(f, fullgraph=True, backend="aot_eager")  # noqa: E731
    leaf = x.clone().requires_grad_(True)
    compile(pooled)(leaf).sum().backward()
    ref_leaf = x.double().requires_grad_(True)
    (pool2d_tokens_ref(ref_leaf.sin(), (5, 7), 2, "max") * 2).sum().backward()
    assert rel_err(compile(pooled)(x), pooled(x)) < 1e-6 and rel_err(leaf.grad, ref_leaf.grad) < 6e-4

    base = torch.randn(40, 12)
    with torch.no_grad():
        assert torch.equal(compile(scattered)(x, base), scattered(x, base))
    leaf, leaf_base = x.clone().requires_grad_(True), base.clone().requires_grad_(True)
    compile(scattered)(leaf, leaf_base).pow(2).sum().backward()
    ref_leaf, ref_base = x.double().requires_grad_(True), base.double().requires_grad_(True)
    (pool2d_tokens_ref(ref_leaf.sin(), (5, 7), 2, out=ref_base * 1.0, index=index) + 1).pow(2).sum().backward()
    assert rel_err(leaf.grad, ref_leaf.grad) < 6e-4 and rel_err(leaf_base.grad, ref_base.grad) < 6e-4


@pytest.mark.parametrize("backend", _compiled_backends())
def test_torch_compile_inductor_scatter(backend):
    """The default inductor backend functionalizes the in-place scatter and re-applies it."""
    torch._dynamo.reset()
    x, base, index = torch.randn(2, 35, 12), torch.randn(40, 12), torch.tensor([20, 3])

    def scattered(x, base):
        out = base * 1.0
        return pool2d_tokens(x.sin(), (5, 7), 2, out=out, index=index, backend=backend) + 1

    try:
        with torch.no_grad():
            result = torch.compile(scattered, fullgraph=True)(x, base)
    except Exception as exc:  # inductor needs a working C++ toolchain; report it as a skip, not a pass
        if "CppCompileError" in type(exc).__name__ or "InvalidCxxCompiler" in type(exc).__name__:
            pytest.skip(f"inductor cannot compile C++ here: {exc}")
        raise
    expected = pool2d_tokens_ref(x.double().sin(), (5, 7), 2, out=base.double(), index=index) + 1
    assert rel_err(result, expected) < 1e-6
