"""llmodel's decoder against Hugging Face's own modules: tiny random HF models, saved with save_pretrained,
loaded with llmodel.load_lm, must give the same logits (fp32, relative error norm <= 1e-4)."""
import dataclasses
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import llmodel  # noqa: E402
from llmodel import LMConfig, named_config  # noqa: E402
from llmodel.checkpoint import load_lm, save_lm  # noqa: E402

TOL = 1e-4


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_jamba(**over):
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2,
               expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_d_conv=4,
               mamba_expand=2, mamba_dt_rank=6, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(over)
    return transformers.JambaForCausalLM(transformers.JambaConfig(**cfg))


def tiny_mamba():
    return transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=97, hidden_size=32, state_size=8,
                                                                  num_hidden_layers=3, time_step_rank=5))


def tiny_qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))


def tiny_llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, attention_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}))


def randomize(hf_model, seed=0):
    """HF initializes norms to 1, D to 1, biases to 0: randomize everything so each weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("A_log"):
                continue
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return hf_model.eval()


def save_hf(hf_model, path):
    hf_model.save_pretrained(path)
    return path


@pytest.mark.parametrize("make", [tiny_jamba, tiny_mamba, tiny_qwen2, tiny_llama],
                         ids=["jamba", "mamba", "qwen2", "llama"])
def test_logits_match_hf(make, tmp_path):
    torch.manual_seed(0)
    hf = randomize(make())
    save_hf(hf, tmp_path)
    ours = load_lm(tmp_path, dtype=torch.float32)
    ids = torch.randint(3, 97, (2, 23))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(input_ids=ids)
        got_embeds = ours(inputs_embeds=ours.embed_tokens(ids))
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= TOL, rel_err(got, expected)
    assert torch.equal(got, got_embeds)


def test_jamba_layer_pattern_matches_hf():
    hf_cfg = transformers.JambaConfig(num_hidden_layers=16, num_experts=4)
    ours = LMConfig.from_hf(hf_cfg.to_dict())
    assert ours.layer_mixers == hf_cfg.layers_block_type
    assert ours.layer_ffns == ["moe" if n > 1 else "mlp" for n in hf_cfg.layers_num_experts]
    # LongLLaVA-9B: one expert means Jamba builds plain MLPs everywhere.
    assert set(named_config("longllava-9b").layer_ffns) == {"mlp"}
    a13b = named_config("longllava-a13b")
    assert a13b.layer_ffns[1] == "moe" and a13b.layer_mixers[4] == "attention" and a13b.layer_mixers.count("attention") == 4


def test_config_round_trip_through_hf_dict():
    for name in ("longllava-9b", "longllava-a13b"):
        cfg = named_config(name)
        assert LMConfig.from_hf(cfg.to_hf()) == cfg
    # a head width other than hidden_size // num_heads survives too (the saved attention weights need it)
    wide = dataclasses.replace(named_config("longllava-a13b"), num_heads=64, num_kv_heads=16, head_dim=128)
    assert LMConfig.from_hf(wide.to_hf()) == wide


def test_moe_routes_only_chosen_tokens():
    """Each expert sees exactly the tokens that picked it (never all tokens)."""
    cfg = LMConfig.from_hf(tiny_jamba().config.to_dict())
    model = llmodel.HybridLM(cfg)
    moe = model.layers[1].feed_forward
    seen = []
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, args, out, e=e: seen.append((e, args[0].shape[0])))
    x = torch.randn(1, 10, cfg.hidden_size)
    moe(x)
    chosen = torch.topk(torch.softmax(moe.router(x.view(10, -1)), -1), 2).indices
    assert sum(n for _, n in seen) == 10 * 2
    for e, n in seen:
        assert n == int((chosen == e).sum())


def test_save_load_round_trip_and_hf_reads_it(tmp_path):
    torch.manual_seed(1)
    hf = randomize(tiny_jamba())
    save_hf(hf, tmp_path / "hf")
    ours = load_lm(tmp_path / "hf")
    save_lm(ours, tmp_path / "ours")
    again = load_lm(tmp_path / "ours")
    ids = torch.randint(3, 97, (1, 11))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids), again(input_ids=ids))
        hf_again = transformers.JambaForCausalLM.from_pretrained(tmp_path / "ours").eval()
        assert rel_err(ours(input_ids=ids), hf_again(input_ids=ids).logits) <= TOL
    assert not [f for f in os.listdir(tmp_path / "ours") if f.startswith(".tmp-")]


def _rewrite(path, edit):
    from safetensors.torch import load_file, save_file
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_load_refuses_missing_unexpected_misshaped(tmp_path):
    save_hf(tiny_jamba(), tmp_path)
    _rewrite(tmp_path, lambda t: (t.pop("model.layers.0.mamba.D"), t.__setitem__("model.extra.weight", torch.ones(2)),
                                  t.__setitem__("model.final_layernorm.weight", torch.ones(33))))
    with pytest.raises(ValueError) as info:
        load_lm(tmp_path)
    msg = str(info.value)
    assert "missing (1): model.layers.0.mamba.D" in msg
    assert "unexpected (1): model.extra.weight" in msg
    assert "mis-shaped (1): model.final_layernorm.weight [33] (expected [32])" in msg


def test_sharded_checkpoint_and_dtype(tmp_path):
    hf = randomize(tiny_qwen2())
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours = load_lm(tmp_path, dtype=torch.bfloat16)
    assert ours.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(3, 97, (1, 9))
    with torch.no_grad():
        assert rel_err(ours.float()(input_ids=ids), hf(input_ids=ids).logits) < 2e-2


def test_gradient_checkpointing_same_grads():
    cfg = LMConfig.from_hf(tiny_jamba().config.to_dict())
    torch.manual_seed(0)
    model = llmodel.HybridLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model.train()
        model(input_ids=ids).logsumexp(-1).sum().backward()
        grads.append(model.layers[0].mamba.in_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("renormalize", [False, True])
def test_moe_equals_dense_reference(renormalize):
    """Grouped dispatch == every expert on every token weighted by the (optionally renormalized) top-k."""
    cfg = LMConfig.from_hf(tiny_jamba().config.to_dict())
    cfg.moe.renormalize = renormalize
    torch.manual_seed(0)
    moe = llmodel.HybridLM(cfg).layers[1].feed_forward
    x = torch.randn(3, 7, cfg.hidden_size)
    probs = torch.softmax(moe.router(x), -1)
    top_w, top_i = torch.topk(probs, cfg.moe.top_k, -1)
    if renormalize:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    dense = torch.stack([expert(x) for expert in moe.experts], -2)  # (3, 7, E, hidden)
    weights = torch.zeros_like(probs).scatter(-1, top_i, top_w)
    expected = (dense * weights[..., None]).sum(-2)
    assert rel_err(moe(x), expected) <= 1e-6


def test_mamba_ssm_original_layout(tmp_path):
    """Cobra / state-spaces: mamba_ssm's own keys (backbone.embedding, .layers.N.mixer/.norm, .norm_f) and its
    MambaConfig (d_model, n_layer, ssm_cfg, padded vocab) load through load_lm and equal HF's logits."""
    from safetensors.torch import save_file
    from llmodel.checkpoint import is_mamba_ssm_config
    torch.manual_seed(0)
    hf = randomize(transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=104, hidden_size=32, state_size=8, num_hidden_layers=3, time_step_rank=5, expand=2, conv_kernel=4)))
    tensors = {}
    for key, value in hf.state_dict().items():
        if key == "lm_head.weight":
            continue
        tensors[key.replace("backbone.embeddings.", "backbone.embedding.")] = value.clone().contiguous()
    tensors["lm_head.weight"] = tensors["backbone.embedding.weight"].clone()  # mamba_ssm stores the tied head too
    assert {"backbone.embedding.weight", "backbone.layers.2.mixer.A_log", "backbone.layers.0.mixer.dt_proj.bias",
            "backbone.layers.1.norm.weight", "backbone.norm_f.weight"} <= set(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = {"d_model": 32, "d_intermediate": 0, "n_layer": 3, "vocab_size": 97,  # padded to 104 in the file
              "ssm_cfg": {"d_state": 8, "dt_rank": 5}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
              "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert is_mamba_ssm_config(config)
    ours = load_lm(tmp_path, dtype=torch.float32)
    assert ours.config.model_type == "mamba" and ours.config.vocab_size == 104
    ids = torch.randint(3, 97, (2, 17))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(input_ids=ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Strict as ever: a missing mixer tensor is named in mamba_ssm's spelling.
    del tensors["backbone.layers.1.mixer.D"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \(1\): backbone.layers.1.mixer.D"):
        load_lm(tmp_path)
    config["ssm_cfg"]["layer"] = "Mamba2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Mamba2"):
        load_lm(tmp_path)


def test_jamba_config_keeps_rope_theta_through_hf_round_trip():
    """Jamba has no RoPE; a variant that adds it must not lose it on save/reload (HF ignores the key)."""
    from llmodel.config import LMConfig, MambaConfig, MoEConfig

    config = LMConfig(model_type="jamba", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                      num_heads=2, num_kv_heads=1, attn_layer_period=2, attn_layer_offset=1, rope_theta=5000.0,
                      mamba=MambaConfig(d_state=4, d_conv=4, expand=2, dt_rank=2), moe=MoEConfig(num_experts=2, top_k=1))
    assert LMConfig.from_hf(config.to_hf()).rope_theta == 5000.0
    assert LMConfig.from_hf({**config.to_hf(), "rope_theta": None}).rope_theta is None


@pytest.mark.parametrize("model_type", ["jamba", "mamba"])
def test_mamba_init_gives_long_memory_and_its_range_survives_save(model_type):
    """Training from scratch needs Mamba's dt initialisation: softplus(dt bias) log-uniform in [dt_min,
    dt_max] (nn.Linear's default bias would put every dt near 0.7: a state that forgets within two tokens).
    The range is part of the config, so a saved config rebuilds the same initialisation."""
    import math

    import torch.nn.functional as F

    from llmodel.config import LMConfig, MambaConfig
    from llmodel.lm import MambaMixer

    config = LMConfig(model_type=model_type, vocab_size=32, hidden_size=32, intermediate_size=32, num_layers=2,
                      num_heads=2, num_kv_heads=1, attn_layer_period=2 if model_type == "jamba" else None,
                      attn_layer_offset=1 if model_type == "jamba" else 0,
                      mamba=MambaConfig(d_state=4, d_conv=4, expand=4, dt_rank=2, dt_min=0.002, dt_max=0.05,
                                        inner_layernorms=model_type == "jamba"))
    assert LMConfig.from_hf(config.to_hf()).mamba == config.mamba
    torch.manual_seed(0)
    mixer = MambaMixer(config)
    dt = F.softplus(mixer.dt_proj.bias.detach())
    assert dt.min() >= 0.002 * (1 - 1e-4) and dt.max() <= 0.05 * (1 + 1e-4)
    # log-uniform: the median step sits near the geometric mean of the range, not at either end
    assert 0.5 < dt.median() / math.sqrt(0.002 * 0.05) < 2
    assert torch.equal(mixer.A_log[0].exp(), torch.arange(1, 5, dtype=torch.float32))
    assert torch.equal(mixer.D.detach(), torch.ones(128))
    with pytest.raises(ValueError, match="dt_min, dt_max"):
        mixer.reset_ssm_parameters(0.1, 0.01, 1e-4)
