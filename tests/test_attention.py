"""flash_attn_func / flash_attn_with_kvcache against the float64 explicit-softmax reference.

Tolerance (flash-attn's rule): a backend's relative error against float64 is at most 2x the error of
torch's own same-dtype SDPA (math backend, same mask) against float64, plus a small slack; for the
output and for every gradient. Outputs are NaN-poisoned (conftest), inputs fresh per case.
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastscan
from conftest import rel_err
from fastscan.attention import attention_ref, flash_attn_func, flash_attn_with_kvcache, kvcache_ref
from fastscan.attention.reference import attention_sdpa

BACKENDS = [b for b in ("torch", "triton") if b in fastscan.available_backends()]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SLACK = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 1e-6}


def _check(name, actual, expected64, baseline, dtype):
    err, base = rel_err(actual, expected64), rel_err(baseline, expected64)
    assert err <= 2 * base + SLACK[dtype], f"{name}: error {err:.3g} > 2 x SDPA's {base:.3g} + {SLACK[dtype]}"


def _inputs(batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype, self_only_fraction=0.0):
    q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype)
    k = torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=dtype)
    v = torch.randn(batch, seqlen_k, kv_heads, head_dim, dtype=dtype)
    self_only = torch.rand(batch, seqlen_q) < self_only_fraction if self_only_fraction else None
    return q, k, v, self_only


# (batch, seqlen_q, seqlen_k, heads, kv_heads, headdim, causal, self_only fraction)
CASES = [
    (2, 37, 37, 2, 2, 32, True, 0.0),     # odd length, MHA
    (1, 23, 50, 4, 1, 16, True, 0.0),     # prefill-like seqlen_q < seqlen_k (bottom-right), GQA 4
    (1, 30, 19, 8, 1, 16, True, 0.0),     # seqlen_q > seqlen_k: leading rows see nothing -> 0
    (2, 41, 29, 2, 1, 24, False, 0.0),    # non-causal, headdim padded 24 -> 32
    (1, 1, 33, 8, 1, 16, True, 0.0),      # seqlen 1 (decode kernel), GQA 8
    (1, 40, 40, 2, 1, 16, True, 0.5),     # self_only rows mixed with causal rows
    (1, 35, 35, 2, 2, 16, False, 1.0),    # all rows self_only: only diagonal tiles visited
    (1, 33, 33, 2, 1, 64, True, 0.3),     # headdim 64
    (1, 18, 18, 2, 1, 128, True, 0.0),    # headdim 128
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_q{}_k{}_h{}_kv{}_d{}_c{}_so{}".format(*c))
@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_func_forward_backward(backend, case, dtype):
    batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, fraction = case
    if head_dim >= 64 and dtype != torch.bfloat16:  # large head dims once, to keep the suite short
        pytest.skip("headdim 64/128 run in bf16 only")
    q, k, v, self_only = _inputs(batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, dtype, fraction)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    leaves64 = [t.double().requires_grad_(True) for t in (q, k, v)]
    out = flash_attn_func(*leaves, causal=causal, self_only=self_only, backend=backend)
    expected = attention_ref(*leaves64, causal=causal, self_only=self_only)
    with sdpa_kernel(SDPBackend.MATH):
        baseline_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        baseline = attention_sdpa(*baseline_leaves, causal=causal, self_only=self_only)
    assert out.dtype == dtype and out.shape == q.shape
    _check("out", out, expected, baseline, dtype)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    grads64 = torch.autograd.grad(expected, leaves64, dout.double())
    grads_base = torch.autograd.grad(baseline, baseline_leaves, dout)
    for name, g, g64, gb in zip(("dq", "dk", "dv"), grads, grads64, grads_base):
        if g64.norm() == 0:  # e.g. dq of rows that see one key: only rounding noise allowed
            assert g.abs().max() <= 1e-3, name
            continue
        _check(name, g, g64, gb, dtype)
    if causal and seqlen_q > seqlen_k:  # rows that see no key: 0, as flash-attn
        assert out[:, : seqlen_q - seqlen_k].abs().max() == 0
        assert grads[0][:, : seqlen_q - seqlen_k].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_expanded_grad(backend):
    """q/k/v as views of a packed qkv tensor (no copies) and out.sum() (stride-0 dout)."""
    qkv = torch.randn(2, 21, 3, 2, 16, requires_grad=True)
    q, k, v = qkv.unbind(2)
    out = flash_attn_func(q, k, v, causal=True, backend=backend)
    out.sum().backward()
    qkv64 = qkv.detach().double().requires_grad_(True)
    expected = attention_ref(*qkv64.unbind(2), causal=True)
    expected.sum().backward()
    assert rel_err(out, expected) < 1e-5 and rel_err(qkv.grad, qkv64.grad) < 1e-5


# ---------------------------------------------------------------------------------------------
# KV cache: prefill chunks, decode, ragged rows, self_only; chunked-prefill identity
# ---------------------------------------------------------------------------------------------
# (batch, seqlen_q, cache_len, heads, kv_heads, headdim, cache_seqlens, self_only fraction)
KV_CASES = [
    (3, 1, 70, 8, 1, 16, [0, 17, 69], 0.0),        # decode, ragged, GQA 8, split-KV + combine
    (2, 1, 50, 4, 4, 32, 20, 0.0),                 # decode with an int cache_seqlens, MHA
    (3, 5, 61, 8, 2, 16, [0, 31, 56], 0.4),         # short chunk (decode kernel), self_only
    (2, 19, 90, 2, 1, 16, [0, 45], 0.0),           # prefill chunks at two cache offsets
    (2, 24, 80, 4, 1, 16, [7, 56], 0.5),           # prefill chunk with self_only rows
    (1, 9, 40, 4, 1, 128, [13], 0.0),              # headdim 128, Jamba-like GQA 4
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", KV_CASES, ids=lambda c: "b{}_q{}_cache{}_h{}_kv{}_d{}".format(*c[:6]))
@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_with_kvcache(backend, case, dtype):
    batch, seqlen_q, cache_len, heads, kv_heads, head_dim, seqlens, fraction = case
    if head_dim >= 64 and dtype != torch.bfloat16:
        pytest.skip("headdim 128 runs in bf16 only")
    q, k_cache, v_cache, self_only = _inputs(batch, seqlen_q, cache_len, heads, kv_heads, head_dim, dtype, fraction)
    k_new, v_new = (torch.randn(batch, seqlen_q, kv_heads, head_dim, dtype=dtype) for _ in range(2))
    cache_seqlens = seqlens if isinstance(seqlens, int) else torch.tensor(seqlens, dtype=torch.int32)
    seqlens_t = torch.full((batch,), seqlens, dtype=torch.int32) if isinstance(seqlens, int) else cache_seqlens
    k64, v64 = k_cache.double(), v_cache.double()
    expected = kvcache_ref(q.double(), k64, v64, k_new.double(), v_new.double(), seqlens_t, True, None, self_only)
    k_base, v_base = k_cache.clone(), v_cache.clone()
    with sdpa_kernel(SDPBackend.MATH):
        baseline = kvcache_ref(q, k_base, v_base, k_new, v_new, seqlens_t, True, None, self_only,
                               attention=attention_sdpa)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens, causal=True,
                                  self_only=self_only, backend=backend)
    _check("out", out, expected, baseline, dtype)
    assert torch.equal(k_cache, k_base) and torch.equal(v_cache, v_base), "cache not written in place"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_chunked_prefill_equals_one_causal_call(backend, kv_heads):
    """A sequence attended in chunks through the cache (prefill chunks, then decode steps) equals
    one causal flash_attn_func over the whole sequence; self_only rows included."""
    batch, seqlen, heads, head_dim = 2, 45, 4, 16
    q, k, v, self_only = _inputs(batch, seqlen, seqlen, heads, kv_heads, head_dim, torch.float32, 0.3)
    full = flash_attn_func(q, k, v, causal=True, self_only=self_only, backend=backend)
    k_cache = torch.zeros(batch, 64, kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    pieces, start = [], 0
    for size in (17, 20, 1, 6, 1):
        end = start + size
        pieces.append(flash_attn_with_kvcache(q[:, start:end], k_cache, v_cache, k[:, start:end], v[:, start:end],
                                              cache_seqlens=start, causal=True, self_only=self_only[:, start:end],
                                              backend=backend))
        start = end
    assert start == seqlen
    assert rel_err(torch.cat(pieces, dim=1), full) < 1e-5
    assert torch.equal(k_cache[:, :seqlen], k) and torch.equal(v_cache[:, :seqlen], v)


def test_kvcache_without_new_tokens_attends_to_whole_cache():
    q, k_cache, v_cache, _ = _inputs(2, 3, 20, 2, 1, 16, torch.float32)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, causal=False, backend=BACKENDS[-1])
    assert rel_err(out, attention_ref(q.double(), k_cache.double(), v_cache.double())) < 1e-5


# ---------------------------------------------------------------------------------------------
# API: validation, backends, the torch.library ops, torch.compile
# ---------------------------------------------------------------------------------------------
def _good():
    return dict(q=torch.randn(2, 5, 4, 16), k=torch.randn(2, 7, 2, 16), v=torch.randn(2, 7, 2, 16))


@pytest.mark.parametrize("change,match", [
    (dict(q=torch.randn(2, 5, 16)), r"q: expected \(batch, seqlen, heads, headdim\)"),
    (dict(k=torch.randn(2, 7, 3, 16), v=torch.randn(2, 7, 3, 16)), "heads=4 must be a multiple of kv_heads=3"),
    (dict(v=torch.randn(2, 6, 2, 16)), r"v: expected k's shape \(2, 7, 2, 16\)"),
    (dict(k=torch.randn(2, 7, 2, 8), v=torch.randn(2, 7, 2, 8)), "k: expected .*headdim=16"),
    (dict(k=torch.randn(2, 7, 2, 16).half()), "k: expected q's dtype"),
    (dict(q=torch.randn(2, 5, 4, 16).int()), "q: expected float16, bfloat16 or float32"),
    (dict(q=torch.randn(2, 5, 4, 300)), "q: headdim must be in 1..256"),
    (dict(self_only=torch.ones(2, 4, dtype=torch.bool)), r"self_only: expected shape \(2, 5\)"),
    (dict(self_only=torch.ones(2, 5)), "self_only: expected torch.bool"),
    (dict(softmax_scale=-1.0), "softmax_scale: expected a positive float"),
    (dict(k=[1.0]), "k: expected a torch.Tensor"),
])
def test_bad_input_names_the_argument(change, match):
    args = _good()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        flash_attn_func(**args)


@pytest.mark.parametrize("change,match", [
    (dict(cache_seqlens=torch.tensor([3, 9], dtype=torch.int32)), r"cache_seqlens: values in 3..9 .* cache_len=10"),
    (dict(cache_seqlens=8), "cache_seqlens: 8 \\+ seqlen_new 3 must be in 0..cache_len=10"),
    (dict(cache_seqlens=torch.tensor([1.0, 2.0])), "cache_seqlens: expected int32 or int64"),
    (dict(cache_seqlens=None), "cache_seqlens: required when k, v are given"),
    (dict(v=None), "k, v: give both or neither"),
    (dict(k=torch.randn(2, 3, 1, 16), v=torch.randn(2, 3, 1, 16)), r"k: expected \(batch=2, seqlen_new, kv_heads=2"),
    (dict(k_cache=torch.randn(1, 10, 2, 16).expand(2, 10, 2, 16)), "k_cache: is written in place"),
])
def test_kvcache_bad_input(change, match):
    args = dict(q=torch.randn(2, 3, 4, 16), k_cache=torch.randn(2, 10, 2, 16), v_cache=torch.randn(2, 10, 2, 16),
                k=torch.randn(2, 3, 2, 16), v=torch.randn(2, 3, 2, 16), cache_seqlens=2)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        flash_attn_with_kvcache(**args)


def test_kvcache_rejects_grad():
    q = torch.randn(1, 1, 2, 16, requires_grad=True)
    with pytest.raises(ValueError, match="q: requires grad, but flash_attn_with_kvcache is an inference op"):
        flash_attn_with_kvcache(q, torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16), cache_seqlens=4)


@pytest.mark.parametrize("backend", ["cpu", "cuda", "cuda_emu"])
def test_compiled_library_backends_are_not_implemented(backend):
    with pytest.raises(ValueError, match="not implemented for this op"):
        flash_attn_func(**_good(), backend=backend)


def test_default_backend_on_cpu_is_torch(monkeypatch):
    from fastscan import backends
    monkeypatch.delenv("FASTSCAN_BACKEND", raising=False)
    assert backends.resolve(None, torch.device("cpu"), supported=("torch", "triton")) == "torch"


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available")
def test_opcheck():
    q, k, v, self_only = _inputs(1, 20, 20, 4, 2, 16, torch.float32, 0.3)
    for t in (q, k, v):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.fastscan.flash_attn_fwd.default, (q, k, v, self_only, True, 0.25, "triton"))
    torch.library.opcheck(torch.ops.fastscan.flash_attn_fwd.default, (q, k, v, None, False, 0.25, "triton"))
    q1 = torch.randn(2, 2, 4, 16)
    k_cache, v_cache = torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 16)
    k_new, v_new = torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16)
    torch.library.opcheck(torch.ops.fastscan.flash_attn_with_kvcache.default,
                          (q1, k_cache, v_cache, k_new, v_new, torch.tensor([3, 10], dtype=torch.int32), None, True,
                           0.25, "triton"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    q, k, v, self_only = _inputs(2, 19, 19, 4, 2, 16, torch.float32, 0.3)

    def block(q, k, v, self_only):
        return flash_attn_func(q.sin(), k, v, causal=True, self_only=self_only, backend=backend) * 2 + 1

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(q, k, v, self_only), block(q, k, v, self_only)) < 1e-6
    leaf = q.clone().requires_grad_(True)
    compiled(leaf, k, v, self_only).sum().backward()
    leaf64 = q.double().requires_grad_(True)
    (attention_ref(leaf64.sin(), k.double(), v.double(), True, None, self_only).sum() * 2).backward()
    assert rel_err(leaf.grad, leaf64.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_kvcache_decode_step(backend):
    """A decode step writing a slice of a stacked per-layer cache, compiled with fullgraph."""
    torch._dynamo.reset()
    caches = torch.randn(2, 2, 2, 16, 1, 16)  # (k/v, layer, batch, cache_len, kv_heads, headdim)
    q, k_new, v_new = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 1, 16), torch.randn(2, 1, 1, 16)
    lens = torch.tensor([5, 9], dtype=torch.int32)

    def step(caches, q, k_new, v_new, lens):
        return flash_attn_with_kvcache(q, caches[0, 1], caches[1, 1], k_new, v_new, lens, backend=backend)

    eager_caches = caches.clone()
    with torch.no_grad():
        expected = step(eager_caches, q, k_new, v_new, lens)
        out = torch.compile(step, fullgraph=True, backend="aot_eager")(caches, q, k_new, v_new, lens)
    assert rel_err(out, expected) < 1e-6 and torch.equal(caches, eager_caches)
