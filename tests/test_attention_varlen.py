"""flash_attn_varlen_func: packed sequences equal each sequence alone through flash_attn_func.

The proof: for random boundaries (length-1 and empty sequences, one sequence filling the pack,
seqlen_q != seqlen_k per sequence), GQA, causal on and off and self_only rows, the packed output and
dq/dk/dv equal flash_attn_func run on every sequence alone and concatenated (a sequence without keys
gives 0 rows, one without queries gives dk = dv = 0). Accuracy against the float64 reference uses
flash-attn's rule, as tests/test_attention.py. Outputs are NaN-poisoned (conftest), inputs fresh.
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastscan
from conftest import rel_err
from fastscan.attention import attention_varlen_ref, flash_attn_func, flash_attn_varlen_func
from fastscan.attention.reference import attention_sdpa, attention_varlen_padded

BACKENDS = [b for b in ("torch", "triton") if b in fastscan.available_backends()]
SLACK = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 1e-6}


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _packed(lengths_q, lengths_k, heads, kv_heads, head_dim, dtype=torch.float32, self_only_fraction=0.0):
    q = torch.randn(sum(lengths_q), heads, head_dim, dtype=dtype)
    k = torch.randn(sum(lengths_k), kv_heads, head_dim, dtype=dtype)
    v = torch.randn(sum(lengths_k), kv_heads, head_dim, dtype=dtype)
    self_only = torch.rand(q.shape[0]) < self_only_fraction if self_only_fraction else None
    return q, k, v, self_only


def _random_lengths(num_seqs, longest):
    """Random lengths with a length-1 and an empty sequence among them (fresh per call)."""
    lengths = torch.randint(2, longest + 1, (num_seqs,))
    slots = torch.randperm(num_seqs)[:2]
    lengths[slots[0]], lengths[slots[1]] = 1, 0
    return lengths.tolist()


def _each_alone(q, k, v, lengths_q, lengths_k, causal, self_only, backend):
    """flash_attn_func on every sequence alone, concatenated; a sequence without keys outputs 0."""
    pieces, q0, k0 = [], 0, 0
    for lq, lk in zip(lengths_q, lengths_k):
        if lq and lk:
            rows = None if self_only is None else self_only[None, q0:q0 + lq]
            pieces.append(flash_attn_func(q[None, q0:q0 + lq], k[None, k0:k0 + lk], v[None, k0:k0 + lk],
                                          causal=causal, self_only=rows, backend=backend)[0])
        elif lq:
            pieces.append(torch.zeros_like(q[q0:q0 + lq]))
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(pieces)


# (lengths_q or "random", lengths_k or "same", heads, kv_heads, headdim, causal, self_only fraction)
PACK_CASES = [
    ("random", "same", 4, 2, 16, True, 0.0),              # self-attention packing, GQA 2
    ("random", "random", 4, 1, 16, False, 0.3),           # independent q and k boundaries, GQA 4
    ([4, 0, 9, 1, 6], [7, 3, 6, 1, 0], 2, 1, 16, True, 0.3),  # q != k lengths (q longer: rows see nothing),
                                                          # keys without queries, queries without keys
    ([6, 11, 2], [13, 1, 5], 2, 2, 24, False, 0.0),       # non-causal, headdim 24 padded to 32
    ([23], [23], 2, 1, 16, True, 0.2),                    # one sequence filling the pack
]


@pytest.mark.parametrize("case", PACK_CASES, ids=lambda c: "q{}_k{}_h{}_kv{}_d{}_c{}_so{}".format(
    *(("x".join(map(str, x)) if isinstance(x, list) else x) for x in c)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_each_sequence_alone(backend, case):
    lengths_q, lengths_k, heads, kv_heads, head_dim, causal, fraction = case
    if lengths_q == "random":
        lengths_q = _random_lengths(6, 19)
    if lengths_k == "same":
        lengths_k = lengths_q
    elif lengths_k == "random":
        lengths_k = _random_lengths(len(lengths_q), 19)
    q, k, v, self_only = _packed(lengths_q, lengths_k, heads, kv_heads, head_dim, self_only_fraction=fraction)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = flash_attn_varlen_func(*leaves, _cu(lengths_q), _cu(lengths_k), max(lengths_q), max(lengths_k),
                                 causal=causal, self_only=self_only, backend=backend)
    alone_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    expected = _each_alone(*alone_leaves, lengths_q, lengths_k, causal, self_only, backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, expected) < 1e-5
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    expected_grads = torch.autograd.grad(expected, alone_leaves, dout, allow_unused=True)
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        e = torch.zeros_like(g) if e is None else e
        assert rel_err(g, e) < 1e-5, name
    # Rows without keys (an empty key sequence, or causal rows before the diagonal) are exactly 0.
    expected64 = attention_varlen_ref(*(t.double() for t in (q, k, v)), _cu(lengths_q), _cu(lengths_k), causal,
                                      None, self_only)
    empty_rows = expected64.abs().amax(dim=(1, 2)) == 0
    if empty_rows.any():
        assert out[empty_rows].abs().max().item() == 0
    assert rel_err(out, expected64) < 1e-5


# (lengths_q, lengths_k, heads, kv_heads, headdim, causal, self_only fraction)
ACCURACY_CASES = [
    ([9, 1, 0, 20], [14, 1, 5, 20], 4, 1, 32, True, 0.3),
    ([17, 3], [8, 3], 2, 2, 64, False, 0.0),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", ACCURACY_CASES, ids=["causal_gqa_self_only", "noncausal_d64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_accuracy_against_float64(backend, case, dtype):
    """flash-attn's rule: error vs float64 <= 2 x that of torch's same-dtype SDPA (math) + slack."""
    lengths_q, lengths_k, heads, kv_heads, head_dim, causal, fraction = case
    if head_dim >= 64 and dtype != torch.bfloat16:
        pytest.skip("headdim 64 runs in bf16 only, to keep the suite short")
    q, k, v, self_only = _packed(lengths_q, lengths_k, heads, kv_heads, head_dim, dtype, fraction)
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    leaves64 = [t.double().requires_grad_(True) for t in (q, k, v)]
    base_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=causal,
                                 self_only=self_only, backend=backend)
    expected = attention_varlen_ref(*leaves64, cu_q, cu_k, causal, None, self_only)
    with sdpa_kernel(SDPBackend.MATH):
        baseline = attention_varlen_ref(*base_leaves, cu_q, cu_k, causal, None, self_only, attention=attention_sdpa)
    dout = torch.randn_like(out)
    results = [("out", out, expected, baseline)]
    results += zip(("dq", "dk", "dv"), torch.autograd.grad(out, leaves, dout),
                   torch.autograd.grad(expected, leaves64, dout.double()),
                   torch.autograd.grad(baseline, base_leaves, dout))
    for name, actual, exact, base in results:
        err, base_err = rel_err(actual, exact), rel_err(base, exact)
        assert err <= 2 * base_err + SLACK[dtype], f"{name}: error {err:.3g} > 2 x SDPA's {base_err:.3g}"


@pytest.mark.parametrize("causal", [False, True])
def test_padded_torch_path_equals_loop(causal):
    """The no-sync torch path (GPU boundaries, torch.compile) equals the per-sequence loop, with grads."""
    lengths_q, lengths_k = [5, 0, 1, 12, 3], [7, 4, 1, 12, 0]
    q, k, v, self_only = _packed(lengths_q, lengths_k, 4, 2, 16, torch.float64, 0.3)
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    leaves_ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attention_varlen_padded(*leaves, cu_q, cu_k, 13, 15, causal, None, self_only)  # max_seqlen > longest
    expected = attention_varlen_ref(*leaves_ref, cu_q, cu_k, causal, None, self_only)
    assert rel_err(out, expected) < 1e-12
    dout = torch.randn_like(out)
    for g, e in zip(torch.autograd.grad(out, leaves, dout), torch.autograd.grad(expected, leaves_ref, dout)):
        assert rel_err(g, e) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_packed_qkv_and_expanded_grad(backend):
    """q/k/v as views of a packed (total, 3, heads, headdim) tensor (no copies) and out.sum()."""
    lengths = [9, 1, 14]
    qkv = torch.randn(sum(lengths), 3, 2, 16, requires_grad=True)
    # max_seqlen_* may exceed the longest sequence (a larger grid, nothing else).
    out = flash_attn_varlen_func(*qkv.unbind(1), _cu(lengths), _cu(lengths), 20, 17, causal=True, backend=backend)
    out.sum().backward()
    qkv64 = qkv.detach().double().requires_grad_(True)
    attention_varlen_ref(*qkv64.unbind(1), _cu(lengths), _cu(lengths), True).sum().backward()
    assert rel_err(qkv.grad, qkv64.grad) < 1e-5


# ---------------------------------------------------------------------------------------------
# API: validation, the torch.library ops, torch.compile
# ---------------------------------------------------------------------------------------------
def _good():
    return dict(q=torch.randn(8, 4, 16), k=torch.randn(10, 2, 16), v=torch.randn(10, 2, 16),
                cu_seqlens_q=_cu([3, 0, 5]), cu_seqlens_k=_cu([4, 2, 4]), max_seqlen_q=5, max_seqlen_k=4)


@pytest.mark.parametrize("change,match", [
    (dict(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32)), "cu_seqlens_q: expected to start at 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), "cu_seqlens_q: expected non-decreasing"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 6, 9], dtype=torch.int32)), "cu_seqlens_k: expected to end at the packed "
                                                                        "length 10, got 9"),
    (dict(cu_seqlens_q=_cu([3, 0, 5]).long()), "cu_seqlens_q: expected int32"),
    (dict(cu_seqlens_k=_cu([4, 6])), r"cu_seqlens_k: expected num_seqs \+ 1 = 4 entries"),
    (dict(cu_seqlens_q=torch.zeros(1, dtype=torch.int32)), r"cu_seqlens_q: expected shape \(num_seqs \+ 1,\)"),
    (dict(cu_seqlens_q=[0, 3, 3, 8]), "cu_seqlens_q: expected a torch.Tensor"),
    (dict(max_seqlen_q=4), "max_seqlen_q: expected >= the longest sequence, 5, got 4"),
    (dict(max_seqlen_k=4.0), "max_seqlen_k: expected an int >= 1"),
    (dict(q=torch.randn(1, 8, 4, 16)), r"q: expected \(total, heads, headdim\) packed sequences"),
    (dict(k=torch.randn(10, 3, 16), v=torch.randn(10, 3, 16)), "heads=4 must be a multiple of kv_heads=3"),
    (dict(v=torch.randn(10, 2, 8)), r"v: expected k's shape \(10, 2, 16\)"),
    (dict(self_only=torch.ones(1, 8, dtype=torch.bool)), r"self_only: expected shape \(8,\) \(total_q,\)"),
    (dict(self_only=torch.ones(8)), "self_only: expected torch.bool"),
])
def test_bad_input_names_the_argument(change, match):
    args = _good()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        flash_attn_varlen_func(**args)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available")
def test_opcheck():
    q, k, v, self_only = _packed([3, 0, 9], [5, 2, 9], 4, 2, 16, self_only_fraction=0.3)
    for t in (q, k, v):
        t.requires_grad_(True)
    cu_q, cu_k = _cu([3, 0, 9]), _cu([5, 2, 9])
    op = torch.ops.fastscan.flash_attn_varlen_fwd.default
    torch.library.opcheck(op, (q, k, v, cu_q, cu_k, 9, 9, self_only, True, 0.25, "triton"))
    torch.library.opcheck(op, (q, k, v, cu_q, cu_k, 9, 9, None, False, 0.25, "triton"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    lengths_q, lengths_k = [7, 1, 0, 11], [7, 3, 2, 11]
    q, k, v, self_only = _packed(lengths_q, lengths_k, 4, 2, 16, self_only_fraction=0.3)
    cu_q, cu_k = _cu(lengths_q), _cu(lengths_k)

    def block(q, k, v, self_only):
        return flash_attn_varlen_func(q.sin(), k, v, cu_q, cu_k, 11, 11, causal=True, self_only=self_only,
                                      backend=backend) * 2 + 1

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(q, k, v, self_only), block(q, k, v, self_only)) < 1e-6
    leaf = q.clone().requires_grad_(True)
    compiled(leaf, k, v, self_only).sum().backward()
    leaf64 = q.double().requires_grad_(True)
    (attention_varlen_ref(leaf64.sin(), k.double(), v.double(), cu_q, cu_k, True, None, self_only).sum() * 2).backward()
    assert rel_err(leaf.grad, leaf64.grad) < 1e-5
