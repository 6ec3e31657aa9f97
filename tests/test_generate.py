"""Hybrid cache, chunked prefill and generation: against our own one-shot forward and against HF generate."""
import pytest
import torch

import llmodel
from llmodel import LMConfig
from llmodel.generate import decode_one_token, prefill, sample


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_config(**over):
    """Jamba-shaped: Mamba + attention mixers, MLP + MoE FFNs; optional RoPE to exercise positions."""
    cfg = dict(model_type="jamba", vocab_size=97, hidden_size=32, intermediate_size=40, num_layers=6, num_heads=4,
               num_kv_heads=2, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
               moe=dict(num_experts=4, top_k=2), mamba=dict(d_state=8, d_conv=4, expand=2, dt_rank=6),
               eos_token_id=2)
    cfg.update(over)
    return LMConfig(**cfg)


def random_model(config, seed=0):
    torch.manual_seed(seed)
    model = llmodel.HybridLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("A_log"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def greedy_without_cache(model, ids, steps):
    """The oracle: rerun the whole sequence every step and take the argmax."""
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(input_ids=ids)[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids


@pytest.mark.parametrize("rope", [None, 10000.0], ids=["jamba", "jamba+rope"])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, None])
def test_chunked_prefill_equals_one_shot(chunk_size, rope):
    model = random_model(tiny_config(rope_theta=rope))
    ids = torch.randint(3, 97, (2, 29))
    with torch.no_grad():
        expected = model(input_ids=ids)[:, -1]
    cache = model.new_cache(2, 40)
    got = prefill(model, cache, input_ids=ids, chunk_size=chunk_size)
    assert rel_err(got, expected) <= 1e-5
    assert cache.cache_seqlens.tolist() == [29, 29]
    # ... and the next token decoded from that cache equals the one-shot forward over 30 tokens.
    nxt = expected.argmax(-1)
    with torch.no_grad():
        expected_next = model(input_ids=torch.cat([ids, nxt[:, None]], 1))[:, -1]
    assert rel_err(decode_one_token(model, cache, nxt), expected_next) <= 1e-5


@pytest.mark.parametrize("chunk_size", [1, 2, 7])
def test_chunked_prefill_with_wide_conv(chunk_size):
    """d_conv 6 (the demo's): a chunk shorter than the conv window (5 past inputs) must take part of its
    window from the chunks before the previous one, through the cache's conv state."""
    model = random_model(tiny_config(mamba=dict(d_state=8, d_conv=6, expand=2, dt_rank=6)))
    ids = torch.randint(3, 97, (2, 23))
    with torch.no_grad():
        expected = model(input_ids=ids)[:, -1]
    cache = model.new_cache(2, 30)
    assert cache.conv_state[0].shape[-1] == 5
    assert rel_err(prefill(model, cache, input_ids=ids, chunk_size=chunk_size), expected) <= 1e-5
    nxt = expected.argmax(-1)
    with torch.no_grad():
        expected_next = model(input_ids=torch.cat([ids, nxt[:, None]], 1))[:, -1]
    assert rel_err(decode_one_token(model, cache, nxt), expected_next) <= 1e-5


def test_prefill_with_inputs_embeds_equals_ids():
    model = random_model(tiny_config())
    ids = torch.randint(3, 97, (1, 13))
    a = prefill(model, model.new_cache(1, 13), input_ids=ids, chunk_size=4)
    b = prefill(model, model.new_cache(1, 13), inputs_embeds=model.embed_tokens(ids).detach(), chunk_size=5)
    assert rel_err(a, b) <= 1e-6


def test_greedy_equals_no_cache_loop_with_ragged_batch():
    model = random_model(tiny_config(rope_theta=500.0))
    rows = [torch.randint(3, 97, (n,)) for n in (5, 17, 11)]
    out = llmodel.generate(model, input_ids=rows, max_new_tokens=32, eos_token_id=[], chunk_size=4)
    for row, got in zip(rows, out):
        assert torch.equal(got, greedy_without_cache(model, row[None], 32)[0])


def test_greedy_equals_hf_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.JambaForCausalLM(transformers.JambaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=6))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if not name.endswith("A_log"):
                p.add_(0.1 * torch.randn_like(p))
    hf.eval().save_pretrained(tmp_path)
    ours = llmodel.load_lm(tmp_path)
    ids = torch.randint(3, 97, (2, 19))
    hf.generation_config.eos_token_id = None
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                           pad_token_id=0)
    got = llmodel.generate(ours, input_ids=ids, max_new_tokens=32, eos_token_id=[], chunk_size=8)
    assert got.shape == (2, 19 + 32)
    assert torch.equal(got, expected)


def test_sampling_reproducible_with_seed():
    model = random_model(tiny_config())
    ids = torch.randint(3, 97, (2, 7))
    kw = dict(max_new_tokens=20, temperature=1.3, top_k=20, top_p=0.9, eos_token_id=[])
    a = llmodel.generate(model, input_ids=ids, seed=123, **kw)
    b = llmodel.generate(model, input_ids=ids, seed=123, **kw)
    c = llmodel.generate(model, input_ids=ids, seed=7, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(500, 1)
    assert set(sample(logits, 1.0, top_k=2).tolist()) <= {2, 3}
    # softmax([0,1,2,3]) = [.03, .09, .24, .64]: top_p=0.7 keeps {3, 2}; top_p=0.5 keeps only 3.
    assert set(sample(logits, 1.0, top_p=0.7).tolist()) == {2, 3}
    assert set(sample(logits, 1.0, top_p=0.5).tolist()) == {3}
    assert sample(logits, 0.0).tolist() == [3] * 500


def test_eos_stops_rows_and_streams():
    model = random_model(tiny_config())
    ids = torch.randint(3, 97, (2, 9))
    free = llmodel.generate(model, input_ids=ids, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, 9 + 3])  # row 0's 4th new token becomes the stop token
    streamed = []
    out = llmodel.generate(model, input_ids=ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0,
                           stream=streamed.append)
    first = [int(t) for t in (free[0, 9:] == eos).nonzero()[0]][0]
    assert torch.equal(out[0, :9 + first + 1], free[0, :9 + first + 1])
    assert (out[0, 9 + first + 1:] == 0).all()
    hits = (free[1, 9:] == eos).nonzero()
    if len(hits) == 0:  # row 1 never emits eos: it runs to max_new_tokens unchanged
        assert torch.equal(out[1], free[1])
    assert len(streamed) == out.shape[1] - 9
    assert torch.equal(torch.stack(streamed, 1), out[:, 9:])


def test_all_rows_eos_stops_early():
    model = random_model(tiny_config())
    ids = torch.randint(3, 97, (1, 6))
    first = llmodel.generate(model, input_ids=ids, max_new_tokens=1, eos_token_id=[])[0, -1]
    out = llmodel.generate(model, input_ids=ids, max_new_tokens=50, eos_token_id=int(first))
    assert out.shape == (1, 7)


def test_cache_overflow_names_the_problem():
    model = random_model(tiny_config())
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="max_len"):
        prefill(model, cache, input_ids=torch.randint(3, 97, (1, 9)))


def test_cli_generate_streams_ids_and_text(tmp_path, capsys):
    from llmodel.__main__ import main
    model = random_model(tiny_config())
    llmodel.save_lm(model, tmp_path)
    ids = torch.randint(3, 97, (1, 6))
    expected = llmodel.generate(model, input_ids=ids, max_new_tokens=5)[0, 6:]
    assert main(["generate", "--model", str(tmp_path), "--prompt", " ".join(map(str, ids[0].tolist())),
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in expected.tolist()]

    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(97)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert main(["generate", "--model", str(tmp_path), "--prompt", "w5 w9 w33", "--max-new-tokens", "4"]) == 0
    expected = llmodel.generate(model, input_ids=torch.tensor([[5, 9, 33]]), max_new_tokens=4)[0, 3:]
    # Streaming prints each new suffix of the decoded text, so together they are the full decode.
    assert capsys.readouterr().out.strip() == tok.decode(expected.tolist())
