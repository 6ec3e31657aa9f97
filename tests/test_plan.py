"""The planner: parameter counts against real models, memory formulas from their inputs, the CLI."""
import os
import subprocess
import sys

import pytest

from llmodel.config import LMConfig, MambaConfig, MoEConfig
from llmodel.plan import (DEFAULT_CHUNK, PAPER_MEMORY_GIB, activation_peak, main, parameter_count, plan,
                          resolve_config)

transformers = pytest.importorskip("transformers")


def _tiny_jamba_hf(**overrides) -> dict:
    hf = dict(model_type="jamba", vocab_size=97, hidden_size=32, intermediate_size=56, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2, attn_layer_period=3, attn_layer_offset=1,
              expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
              mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=5, tie_word_embeddings=False)
    hf.update(overrides)
    return hf


def _hf_param_count(model_cls, config_cls, hf: dict) -> int:
    kwargs = {k: v for k, v in hf.items() if k != "model_type"}
    model = model_cls(config_cls(**kwargs))
    return sum(p.numel() for p in model.parameters())  # parameters() counts a tied tensor once


@pytest.mark.parametrize("overrides", [
    {},                                                        # MoE + MLP, 2 attention layers
    {"num_experts": 1, "num_experts_per_tok": 1},              # LongLLaVA-9B-like: every FFN dense
    {"tie_word_embeddings": True, "attn_layer_offset": 0, "expert_layer_offset": 0, "num_experts": 3},
])
def test_jamba_parameter_count_matches_transformers(overrides):
    hf = _tiny_jamba_hf(**overrides)
    expected = _hf_param_count(transformers.JambaForCausalLM, transformers.JambaConfig, hf)
    assert parameter_count(LMConfig.from_hf(hf)) == expected


@pytest.mark.parametrize("hf, cls", [
    (dict(model_type="mamba", vocab_size=101, hidden_size=24, num_hidden_layers=3, state_size=8, expand=2,
          conv_kernel=4, time_step_rank=3), "Mamba"),
    (dict(model_type="llama", vocab_size=101, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, attention_bias=True), "Llama"),
    (dict(model_type="qwen2", vocab_size=101, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True), "Qwen2"),
])
def test_other_families_parameter_count_matches_transformers(hf, cls):
    expected = _hf_param_count(getattr(transformers, f"{cls}ForCausalLM"), getattr(transformers, f"{cls}Config"), hf)
    assert parameter_count(LMConfig.from_hf(hf)) == expected


def test_parameter_count_matches_llmodel_lm():
    lm = pytest.importorskip("llmodel.lm")
    cfg = LMConfig.from_hf(_tiny_jamba_hf())
    model = lm.HybridLM(cfg)
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())


def _small_config() -> LMConfig:
    # 8 layers, attention at 2 and 6 -> 2 attention layers, 6 Mamba layers; MoE on odd layers.
    return LMConfig(model_type="jamba", vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=8,
                    num_heads=8, num_kv_heads=2, attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2,
                    expert_layer_offset=1, mamba=MambaConfig(d_state=16, d_conv=4, expand=2, dt_rank=16),
                    moe=MoEConfig(num_experts=4, top_k=2))


def test_kv_cache_and_state_bytes_from_the_formula():
    cfg = _small_config()
    tokens, batch = 12_345, 3
    # By hand: 2 attention layers (i % 4 == 2 for i < 8: 2, 6); head_dim = 256 // 8 = 32; bf16 -> 2 bytes.
    attention_layers, head_dim = 2, 32
    kv = attention_layers * 2 * cfg.num_kv_heads * head_dim * tokens * batch * 2
    p = plan(cfg, tokens, weights="bf16", batch=batch)
    assert p["kv_cache_bytes"] == kv
    # Mamba state: 6 layers * batch * d_inner (512) * ((d_conv-1) * 2 bytes + d_state * 4 bytes float32).
    assert p["mamba_state_bytes"] == 6 * batch * 512 * (3 * 2 + 16 * 4)
    # Constant in tokens; KV linear in tokens; fp32 doubles the KV bytes.
    assert plan(cfg, 10 * tokens, batch=batch)["mamba_state_bytes"] == p["mamba_state_bytes"]
    assert plan(cfg, 10 * tokens, batch=batch)["kv_cache_bytes"] == 10 * kv
    assert plan(cfg, tokens, weights="fp32", batch=batch)["kv_cache_bytes"] == 2 * kv


def test_weight_bytes_by_dtype_and_moe_active_params():
    cfg = _small_config()
    total = parameter_count(cfg)
    assert plan(cfg, 10, weights="bf16")["weight_bytes"] == 2 * total
    assert plan(cfg, 10, weights="fp32")["weight_bytes"] == 4 * total
    int8 = plan(cfg, 10, weights="int8")
    assert total < int8["weight_bytes"] < 2 * total
    # All experts are resident, but only top_k of E are active per token: 4 MoE layers, 2 of 4 experts idle.
    idle_experts = 4 * (4 - 2) * 3 * 256 * 512
    assert int8["params_active"] == total - idle_experts


def test_chunked_peak_is_below_one_shot_and_independent_of_tokens():
    cfg = resolve_config("longllava-9b")
    chunk = 2048
    peaks = []
    for tokens in (8192, 50_000, 1_000_000):
        p = plan(cfg, tokens, weights="int8", chunk=chunk)
        assert p["activation_chunked_bytes"] < p["activation_one_shot_bytes"]
        assert p["total_bytes"] == p["total_chunked_bytes"] < p["total_one_shot_bytes"]
        peaks.append(p["activation_chunked_bytes"])
    assert peaks[0] == peaks[1] == peaks[2]
    # One-shot grows with the prompt; eager attention makes the chunk's peak depend on the KV length again.
    assert plan(cfg, 20_000)["activation_one_shot_bytes"] > plan(cfg, 10_000)["activation_one_shot_bytes"]
    eager = [activation_peak(cfg, chunk, kv_len, 2, attention="eager")[0] for kv_len in (10_000, 20_000)]
    assert eager[1] > eager[0]


def test_cli_prints_plan_and_paper_figures(capsys):
    for name in ("longllava-9b", "longllava-a13b"):
        assert main(["--config", name, "--tokens", "100000", "--weights", "int8"]) == 0
        out = capsys.readouterr().out
        assert "KV cache" in out and "TOTAL chunked prefill" in out and "prefill FLOPs" in out
        assert f"{PAPER_MEMORY_GIB[name]:.1f} GB" in out and "why:" in out
    assert main(["--config", "longllava-9b", "--images", "1000", "--chunk", "4096", "--gpu-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "tokens=144,000" in out and "inputs_embeds" in out and "chunk=4,096 " in out
    with pytest.raises(SystemExit):  # argparse refuses an unknown weight format
        main(["--config", "longllava-9b", "--tokens", "10", "--weights", "int4"])
    assert main(["--config", "no-such-model", "--tokens", "10"]) == 2


def test_cli_as_module():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "llmodel.plan", "--config", "longllava-a13b", "--tokens", "100000",
                          "--weights", "int8"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "79.1" in run.stdout and f"chunk={DEFAULT_CHUNK:,} (default)" in run.stdout


@pytest.mark.parametrize("name", ["longllava-9b", "tiny-longllava", "tiny-cobra"])
def test_vision_parameter_count_matches_llmodel_modules(name):
    import torch
    from llmodel.multimodal import build_projector, named_multimodal_config
    from llmodel.plan import vision_parameter_count
    from llmodel.vision import VisionTower
    mm = named_multimodal_config(name)
    with torch.device("meta"):
        mods = [VisionTower(mm.vision), build_projector(mm)]
        if mm.second_vision is not None:
            mods.append(VisionTower(mm.second_vision))
    expected = sum(p.numel() for m in mods for p in m.parameters())
    assert vision_parameter_count(mm) == expected
    p = plan(mm, 1000, weights="bf16", images=3)
    assert p["vision_params"] == expected and p["vision_weight_bytes"] == 2 * expected
    assert p["vision_flops"] == 3 * p["vision_flops_per_image"] > 0
    if name == "longllava-9b":
        assert p["vision_params"] == vision_parameter_count("longllava-9b")
        # CLIP ViT-L/14-336 ~ 0.304 B; projector 1024*4096 + 4096 + 4096*4096 + 4096.
        assert 0.30e9 < expected - (1024 * 4096 + 4096 * 4096 + 2 * 4096) < 0.31e9
        assert p["vision_flops_per_image"] > 2 * 577 * 0.28e9   # ~2 x params x 577 tokens + attention
        int8 = plan(mm, 1000, weights="int8")
        assert expected < int8["vision_weight_bytes"] < 2 * expected
        # activation peak linear in the image batch; total counts vision weights, LM-only config none
        assert plan(mm, 10, image_batch=8)["vision_activation_bytes"] == 8 * p["vision_activation_bytes"]
        lm_only = plan(mm.lm, 1000)
        assert lm_only["vision_params"] == 0 and lm_only["multimodal"] is None
        assert p["total_bytes"] == lm_only["total_bytes"] + p["vision_weight_bytes"]


def test_cli_prints_vision_lines(capsys, tmp_path):
    assert main(["--config", "longllava-9b", "--images", "1000", "--image-batch", "4", "--weights", "int8"]) == 0
    out = capsys.readouterr().out
    assert "vision tower + projector weights" in out and "vision activation peak (4 image(s)" in out
    assert "for 1,000 images" in out and "tokens=144,000" in out and "weights: projector" in out
    hf = _tiny_jamba_hf()
    import json
    path = str(tmp_path / "config.json")
    with open(path, "w") as f:
        json.dump(hf, f)
    assert main(["--config", path, "--tokens", "1000"]) == 0
    out = capsys.readouterr().out
    assert "vision" not in out
