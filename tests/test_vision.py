"""llmodel's vision towers against Hugging Face's own modules: tiny random CLIP / SigLIP / DINOv2 /
DINOv2-with-registers models saved with save_pretrained, loaded with llmodel.vision.load_vision, must give
the same hidden states at every selected layer (fp32, relative error norm <= 1e-4), at the checkpoint's
image size and at another one (position embeddings interpolated)."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from llmodel.vision import VisionConfig, load_vision, named_vision_config  # noqa: E402

from conftest import rel_err  # noqa: E402

TOL = 1e-4
SIZE, PATCH = 28, 7  # a 4×4 patch grid at the checkpoint's size
COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=SIZE, patch_size=PATCH)


def tiny(kind, **over):
    T = transformers
    if kind == "clip":
        return T.CLIPVisionModel(T.CLIPVisionConfig(**COMMON, intermediate_size=40, **over))
    if kind == "siglip":
        return T.SiglipVisionModel(T.SiglipVisionConfig(**COMMON, intermediate_size=40, **over))
    if kind == "dinov2":
        return T.Dinov2Model(T.Dinov2Config(**COMMON, mlp_ratio=2, **over))
    if kind == "dinov2_swiglu":
        return T.Dinov2Model(T.Dinov2Config(**COMMON, mlp_ratio=2, use_swiglu_ffn=True, qkv_bias=False, **over))
    if kind == "dinov2_registers":
        return T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**COMMON, mlp_ratio=2,
                                                                      num_register_tokens=2, **over))
    raise ValueError(kind)


PREFIX_TOKENS = {"clip": 1, "siglip": 0, "dinov2": 1, "dinov2_swiglu": 1, "dinov2_registers": 3}
KINDS = list(PREFIX_TOKENS)


def randomize(hf_model, seed=0):
    """HF initializes norms to 1, biases, registers and the mask token to 0: perturb everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return hf_model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (hf model, directory it was saved to); built once for the module."""
    out = {}
    for i, kind in enumerate(KINDS):
        torch.manual_seed(i)
        hf = randomize(tiny(kind), seed=i)
        path = tmp_path_factory.mktemp(kind)
        hf.save_pretrained(path)
        out[kind] = (hf, path)
    return out


def hf_states(hf, kind, pixels):
    interpolate = {"interpolate_pos_encoding": True} if kind in ("clip", "siglip") else {}
    with torch.no_grad():
        return hf(pixel_values=pixels, output_hidden_states=True, **interpolate)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("height,width", [(SIZE, SIZE), (35, 42)], ids=["native", "interpolated"])
def test_hidden_states_match_hf(kind, height, width, saved):
    hf, path = saved[kind]
    ours = load_vision(path, dtype=torch.float32)
    pixels = torch.randn(2, 3, height, width)
    out = hf_states(hf, kind, pixels)
    prefix = PREFIX_TOKENS[kind]
    errors = {}
    with torch.no_grad():
        for layer in (0, 1, -2, -1):
            expected = out.hidden_states[layer]
            full = ours(pixels, layer=layer, patch_only=False)
            patches = ours(pixels, layer=layer)
            assert full.shape == expected.shape
            assert patches.shape == (2, (height // PATCH) * (width // PATCH), 32)
            errors[layer] = max(rel_err(full, expected), rel_err(patches, expected[:, prefix:]))
        assert torch.equal(ours(pixels), ours(pixels, layer=-2))  # LLaVA's default: penultimate, patches
        if kind != "clip":  # SigLIP / DINOv2 last_hidden_state is the final norm of the last layer
            errors["last"] = rel_err(ours(pixels, layer=-1, patch_only=False, post_norm=True), out.last_hidden_state)
    assert max(errors.values()) <= TOL, errors


def test_dtype_and_device_arguments(saved):
    _, path = saved["dinov2_registers"]
    pixels = torch.randn(2, 3, 35, 42)
    with torch.no_grad():
        full = load_vision(path)(pixels)
        half = load_vision(path, dtype=torch.bfloat16)(pixels)  # pixels are cast to the weights' dtype
    assert half.dtype == torch.bfloat16 and rel_err(half, full) < 3e-2


def test_only_needed_layers_run(saved):
    ours = load_vision(saved["clip"][1])
    ran = []
    for i, block in enumerate(ours.layers):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    with torch.no_grad():
        ours(torch.randn(1, 3, SIZE, SIZE))  # layer -2 of 3: two layers
        assert ran == [0, 1]
        ran.clear()
        ours(torch.randn(1, 3, SIZE, SIZE), layer=0)
        assert ran == []
    with pytest.raises(ValueError, match="layer: got -5"):
        ours(torch.randn(1, 3, SIZE, SIZE), layer=-5)


def test_full_clip_and_legacy_prefix_layouts(saved, tmp_path):
    """A full CLIPModel checkpoint (what LLaVA loads its tower from) and the older `vision_model.` layout."""
    torch.manual_seed(0)
    clip = randomize(transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=dict(COMMON, intermediate_size=40),
        text_config=dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=1))))
    clip.save_pretrained(tmp_path / "full")
    ours = load_vision(tmp_path / "full")
    assert ours.config.model_type == "clip_vision_model" and ours.config.pre_norm
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = clip.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        assert rel_err(ours(pixels, patch_only=False), expected) <= TOL

    # The same CLIPVisionModel with every key under `vision_model.` (transformers < 5 wrote that).
    hf, path = saved["clip"]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        save_file({"vision_model." + k: f.get_tensor(k) for k in f.keys()}, str(legacy / "model.safetensors"))
    (legacy / "config.json").write_text((path / "config.json").read_text())
    with torch.no_grad():
        assert torch.equal(load_vision(legacy)(pixels), load_vision(path)(pixels))
    # Inside a larger checkpoint, an explicit prefix selects the tower and leaves the rest alone.
    nested = tmp_path / "nested"
    nested.mkdir()
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        tensors = {"model.vision_tower.vision_tower.vision_model." + k: f.get_tensor(k) for k in f.keys()}
    tensors["model.embed_tokens.weight"] = torch.zeros(3, 4)
    save_file(tensors, str(nested / "model.safetensors"))
    tower = load_vision(nested, config=VisionConfig.from_hf(path),
                        prefix="model.vision_tower.vision_tower.vision_model.")
    with torch.no_grad():
        assert torch.equal(tower(pixels), load_vision(path)(pixels))


def _rewrite(src, dst, edit):
    dst.mkdir()
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


@pytest.mark.parametrize("kind", ["clip", "dinov2_registers"])
def test_load_errors_name_every_bad_key(kind, saved, tmp_path):
    _, path = saved[kind]
    attn = ("encoder.layers.1.self_attn.k_proj.weight" if kind == "clip"
            else "encoder.layer.1.attention.attention.key.weight")
    pos = "embeddings.position_embedding.weight" if kind == "clip" else "embeddings.position_embeddings"

    def edit(t):
        del t[attn]
        t["encoder.extra.weight"] = torch.zeros(2)
        t[pos] = t[pos][..., :-1].clone()

    bad = _rewrite(path, tmp_path / "bad", edit)
    with pytest.raises(ValueError) as info:
        load_vision(bad)
    msg = str(info.value)
    assert f"missing (1): {attn}" in msg
    assert "unexpected (1): encoder.extra.weight" in msg
    assert f"mis-shaped (1): {pos}" in msg and "(expected" in msg


def test_unused_heads_are_accepted_but_not_required(saved, tmp_path):
    """SigLIP's pooling head and DINOv2's mask token serve no feature extraction: optional both ways."""
    _, path = saved["siglip"]
    bare = _rewrite(path, tmp_path / "no_head", lambda t: [t.pop(k) for k in list(t) if k.startswith("head.")])
    pixels = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(load_vision(bare)(pixels), load_vision(path)(pixels))


def test_config_from_hf_dicts():
    clip = VisionConfig.from_hf(transformers.CLIPConfig().to_dict())  # full config: its vision_config
    assert (clip.model_type, clip.hidden_act, clip.class_token, clip.pre_norm, clip.patch_bias) == \
        ("clip_vision_model", "quick_gelu", True, True, False)
    siglip = VisionConfig.from_hf({"model_type": "siglip", "vision_config": {}})  # sparse: HF defaults
    assert siglip == VisionConfig.from_hf(transformers.SiglipVisionConfig().to_dict())
    assert (siglip.class_token, siglip.hidden_act, siglip.post_norm, siglip.patch_size) == \
        (False, "gelu_pytorch_tanh", True, 16)
    reg = VisionConfig.from_hf({"model_type": "dinov2_with_registers"})
    assert reg == VisionConfig.from_hf(transformers.Dinov2WithRegistersConfig().to_dict())
    assert reg.num_prefix_tokens == 5 and reg.layer_scale and reg.pos_antialias
    big = named_vision_config("clip-vit-large-patch14-336")
    assert big.grid == 24 and big.num_patches() == 576 and big.feature_layer == -2
    assert VisionConfig.from_dict(json.loads(json.dumps(big.to_dict()))) == big
    with pytest.raises(ValueError, match="model_type"):
        VisionConfig.from_hf({"model_type": "vit"})

