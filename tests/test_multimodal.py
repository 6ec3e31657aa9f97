"""The multimodal LongLLaVA on CPU: token counts, placeholder rows, chunked prefill, checkpoints, composite attention.

Tiny random models: a CLIP tower at 56 px / patch 14 (a 4x4 grid, so kernel 2 gives 4 rows per image, as
24x24 -> 144 at full size) and a 4-layer Jamba (Mamba + attention + MoE).
"""
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llmodel import formats, pixels
from llmodel.multimodal import (LongLLaVA, MultimodalConfig, load_longllava, named_multimodal_config,
                                save_longllava)


def char_tokenizer(text):  # ids 3..127 from characters: no tokenizer files needed
    return [3 + ord(ch) % 120 for ch in text]


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = LongLLaVA(named_multimodal_config("tiny-longllava", **overrides)).eval()
    with torch.no_grad():  # A_log/D/norms keep their init; spread the rest so outputs are not degenerate
        for name, p in model.named_parameters():
            if "A_log" not in name and not name.endswith("D"):
                p.add_(torch.randn_like(p) * 0.05)
    return model


def random_image(seed, size=(80, 64)):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(data, "RGB")


PIX = pixels.pixel_config("clip", image_size=56, pad_to_square=True)


def build_prompt(model):
    """Two images, a 3-frame video and a 2x2-tiled high-res image: 1 + 1 + 3 + (1 + 4) = 10 images."""
    images = [random_image(1), random_image(2, (40, 90))]
    frames = pixels.load_video_frames([random_image(10 + i) for i in range(7)], num_frames=3)
    tiled = pixels.longllava_tiles(random_image(3, (100, 70)), tile_size=56)
    assert (tiled.rows, tiled.cols) == (2, 2)
    text = (f"{formats.LONGLLAVA_IMAGE}{formats.LONGLLAVA_IMAGE} compare; video {formats.longllava_video(3)} "
            f"and {formats.longllava_tiled_image(tiled.rows, tiled.cols)} describe")
    prompt = formats.format_prompt(text, "longllava")
    groups = [pixels.preprocess_many(images, PIX), pixels.preprocess_many(frames, PIX),
              pixels.preprocess_many(tiled.images, PIX)]
    counts = [model.tokens_per_image()] * sum(g.shape[0] for g in groups)
    tok = formats.tokenize_prompt(prompt, char_tokenizer, counts, model.config.image_token_id)
    return tok, groups


def test_token_counts_by_formula():
    c = named_multimodal_config("longllava-9b")
    assert c.tokens_per_image() == 144 and c.vision.grid == 24
    assert named_multimodal_config("longllava-9b", pool_kernel=4).tokens_per_image() == 36
    assert named_multimodal_config("longllava-9b", pooling="none").tokens_per_image() == 576
    assert named_multimodal_config("longllava-9b", pooling="1d").tokens_per_image() == 144
    assert named_multimodal_config("longllava-a13b").lm.moe.num_experts == 16
    tiny = named_multimodal_config("tiny-longllava")
    g = tiny.vision.grid
    assert tiny.tokens_per_image() == math.ceil(g / 2) ** 2 == 4
    assert tiny.tokens_per_image(70, 42) == math.ceil(5 / 2) * math.ceil(3 / 2)
    with pytest.raises(ValueError, match="projector"):
        MultimodalConfig(vision=tiny.vision, lm=tiny.lm, projector="linear")
    with pytest.raises(ValueError, match="two towers"):
        MultimodalConfig(vision=tiny.vision, lm=tiny.lm, projector="fused_mlp3x_gelu")


def test_placeholder_rows_and_text_rows():
    model = make_model()
    tok, groups = build_prompt(model)
    assert len(tok.image_spans) == 10 and all(n == 4 for _, n in tok.image_spans)
    with torch.no_grad():
        embeds = model.embed_multimodal(tok.input_ids, groups, tok.image_spans)[0]
        features = torch.cat([model.encode_images(g) for g in groups])  # (10, 4, hidden)
        # LongLLaVA order: pool (2x2 average == its bilinear 24->12) then project.
        x = model.vision_tower(groups[0])
        g = model.config.vision.grid
        grid = x.transpose(1, 2).reshape(x.shape[0], -1, g, g)
        bilinear = F.interpolate(grid, size=(g // 2, g // 2), mode="bilinear", align_corners=False)
        expected0 = model.mm_projector(bilinear.flatten(2).transpose(1, 2))
        text = model.lm.embed_tokens(tok.input_ids)
    torch.testing.assert_close(features[:2], expected0, rtol=1e-5, atol=1e-5)
    image_rows = torch.zeros(len(tok.input_ids), dtype=torch.bool)
    for i, (start, n) in enumerate(tok.image_spans):
        torch.testing.assert_close(embeds[start:start + n], features[i], rtol=0, atol=0)
        image_rows[start:start + n] = True
    assert torch.equal(embeds[~image_rows], text[~image_rows])
    # Spans recovered from the placeholder ids alone give the same buffer.
    with torch.no_grad():
        assert torch.equal(model.embed_multimodal(tok.input_ids, groups)[0], embeds)


def test_chunked_prefill_matches_one_shot_and_generate():
    model = make_model()
    tok, groups = build_prompt(model)
    with torch.no_grad():
        full = model(tok.input_ids[None], groups, tok.image_spans)[0, -1]
        embeds = model.embed_multimodal(tok.input_ids, groups, tok.image_spans)
        for chunk in (7, 16):
            cache = model.lm.new_cache(1, embeds.shape[1])
            for s in range(0, embeds.shape[1], chunk):
                logits = model.lm(inputs_embeds=embeds[:, s:s + chunk], cache=cache, last_only=True)
            torch.testing.assert_close(logits[0, -1], full, rtol=1e-5, atol=1e-5)
    new = model.generate(tok.input_ids, groups, tok.image_spans, max_new_tokens=3, eos_token_id=[], chunk_size=37)
    assert new.shape == (1, 3) and int(new[0, 0]) == int(full.argmax())
    assert torch.equal(new, model.generate(tok.input_ids, groups, tok.image_spans, max_new_tokens=3, eos_token_id=[]))
    with torch.no_grad():  # the decoded tokens continue the prompt exactly as a one-shot forward of it all
        ids = torch.cat([tok.input_ids, new[0, :2]])[None]
        assert int(model(ids, groups, tok.image_spans)[0, -1].argmax()) == int(new[0, 2])


def test_count_mismatch_says_both_counts():
    model = make_model()
    tok, groups = build_prompt(model)
    with pytest.raises(ValueError, match=r"10 image placeholders.*9 images"):
        model.embed_multimodal(tok.input_ids, [groups[0], groups[1], groups[2][:-1]], tok.image_spans)
    with pytest.raises(ValueError, match=r"3 <image> placeholders but 2 images"):
        formats.tokenize_prompt("<image><image><image>", char_tokenizer, [4, 4])


def test_save_load_round_trip(tmp_path):
    model = make_model(pooling="1d")
    tok, groups = build_prompt(model)
    save_longllava(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["resamplePooling"] == "1d" and cfg["mm_vision_select_layer"] == -2
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias", "lm_head.weight",
            "model.vision_tower.vision_tower.vision_model.embeddings.class_embedding"} <= keys
    loaded = load_longllava(tmp_path)
    assert loaded.config.pooling == "1d"
    with torch.no_grad():
        expected = model(tok.input_ids, groups, tok.image_spans)
        assert torch.equal(loaded(tok.input_ids, groups, tok.image_spans), expected)
    # Absent resamplePooling: warn and take 2d.
    del cfg["resamplePooling"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="resamplePooling"):
        assert load_longllava(tmp_path).config.pooling == "2d"
    cfg["resamplePooling"] = "1d"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # Strict: an extra tensor is named.
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.mm_projector.4.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected.*mm_projector.4.weight"):
        load_longllava(tmp_path)


def test_pool_after_projection_uses_fused_scatter():
    model = make_model(pool_after_projection=True)
    tok, groups = build_prompt(model)
    with torch.no_grad():
        embeds = model.embed_multimodal(tok.input_ids, groups, tok.image_spans)[0]
        x = model.mm_projector(model.vision_tower(groups[0]))
        g = model.config.vision.grid
        pooled = F.avg_pool2d(x.transpose(1, 2).reshape(2, -1, g, g), 2).flatten(2).transpose(1, 2)
    start, n = tok.image_spans[1]
    torch.testing.assert_close(embeds[start:start + n], pooled[1], rtol=1e-5, atol=1e-5)


def test_cobra_fused_towers_and_pure_mamba():
    torch.manual_seed(0)
    model = LongLLaVA(named_multimodal_config("tiny-cobra")).eval()
    assert model.config.lm.layer_mixers == ["mamba", "mamba"] and model.tokens_per_image() == 16
    assert model.mm_projector[0].in_features == 32 + 24 and len(model.mm_projector) == 5
    pix = torch.randn(2, 3, 56, 56)
    ids = torch.tensor([[5] + [0] * 32 + [7, 8]])
    with torch.no_grad():
        embeds = model.embed_multimodal(ids, pix, [(1, 16), (17, 16)])
        fused = torch.cat([model.vision_tower(pix), model.vision_tower_2(pix)], dim=-1)
        torch.testing.assert_close(embeds[0, 1:17], model.mm_projector(fused[0]), rtol=1e-5, atol=1e-5)
        assert model(ids, pix, [(1, 16), (17, 16)]).shape == (1, 35, 128)


def dense_composite_layer(mixer, hidden, visual):
    """Reference: the attention layer with an explicit boolean mask through torch SDPA."""
    b, l, _ = hidden.shape
    q = mixer.q_proj(hidden).view(b, l, mixer.num_heads, mixer.head_dim).transpose(1, 2)
    k = mixer.k_proj(hidden).view(b, l, mixer.num_kv_heads, mixer.head_dim).transpose(1, 2)
    v = mixer.v_proj(hidden).view(b, l, mixer.num_kv_heads, mixer.head_dim).transpose(1, 2)
    rep = mixer.num_heads // mixer.num_kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    i, j = torch.arange(l)[:, None], torch.arange(l)[None]
    allowed = torch.where(visual[:, :, None], i == j, j <= i)  # (b, l, l)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
    return mixer.o_proj(out.transpose(1, 2).reshape(b, l, -1))


def test_composite_attention_equals_dense_mask():
    model = make_model(composite_attention=True)
    tok, groups = build_prompt(model)
    visual = model.visual_mask(tok.input_ids, tok.image_spans)
    layer = model.lm.layers[1]
    assert layer.mixer_kind == "attention"
    hidden = torch.randn(1, len(tok.input_ids), model.config.lm.hidden_size)
    with torch.no_grad():
        layer.mixer.visual = visual
        ours = layer.mixer(hidden)
        layer.mixer.visual = None
        torch.testing.assert_close(ours, dense_composite_layer(layer.mixer, hidden, visual), rtol=1e-5, atol=1e-5)
        # The whole model, one shot vs chunked through the cache (chunk 4 puts whole-visual chunks on the fast path).
        full = model(tok.input_ids, groups, tok.image_spans)[0, -1]
        plain = make_model()(tok.input_ids, groups, tok.image_spans)[0, -1]
        assert not torch.allclose(full, plain, atol=1e-4)
    for chunk in (4, 11):
        with torch.no_grad():
            first = model.generate(tok.input_ids, groups, tok.image_spans, max_new_tokens=1, chunk_size=chunk,
                                   eos_token_id=[])
        assert int(first[0, 0]) == int(full.argmax())


def test_composite_attention_cached_chunks_and_visual_only_fast_path():
    """Through the KV cache, chunks cut at the image boundaries (whole-visual chunks take the fast path that
    skips attention) and odd chunks both equal the dense masked layer."""
    model = make_model(composite_attention=True)
    tok, _ = build_prompt(model)
    visual = model.visual_mask(tok.input_ids, tok.image_spans)
    mixer = model.lm.layers[1].mixer
    hidden = torch.randn(1, len(tok.input_ids), model.config.lm.hidden_size)
    with torch.no_grad():
        expected = dense_composite_layer(mixer, hidden, visual)
        length = hidden.shape[1]
        cuts = sorted({0, length} | {s for s, _ in tok.image_spans} | {s + n for s, n in tok.image_spans})
        for bounds in (list(zip(cuts, cuts[1:])), [(s, min(s + 13, length)) for s in range(0, length, 13)]):
            cache = model.lm.new_cache(1, hidden.shape[1])
            mixer.visual, pieces = visual, []
            for start, end in bounds:
                pieces.append(mixer(hidden[:, start:end], cache, 1))
                cache.advance(end - start)
            mixer.visual = None
            torch.testing.assert_close(torch.cat(pieces, dim=1), expected, rtol=1e-5, atol=1e-5)


class CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return char_tokenizer(text)

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_chat_python_and_cli(tmp_path, capsys):
    from llmodel import chat as chat_module
    model = make_model()
    images = [random_image(1), random_image(2, (120, 60))]
    frames = [random_image(20 + i) for i in range(5)]
    pieces = []
    answer = chat_module.chat(model, CharTokenizer(), "what?", images=images, video=frames, num_frames=3, tiles=True,
                              max_new_tokens=4, stream=pieces.append)
    assert answer == "".join(pieces) and len(answer) == 4
    ids, groups, spans, images_2, sizes = chat_module.build_inputs(model, "what?", images, frames, 3, tiles=True,
                                                  tokenizer=CharTokenizer())
    assert [g.shape[0] for g in groups] == [1 + 2 * 2, 1 + 2 * 3, 3] and len(spans) == 15
    assert images_2 is None and sizes is None  # one tower, no AnyRes
    # CLI, no tokenizer.json: token-id prompt after the images.
    model_dir = tmp_path / "model"
    save_longllava(model, model_dir)
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    (tmp_path / "frames").mkdir()
    for i, frame in enumerate(frames):
        frame.save(tmp_path / "frames" / f"frame{i}.png")
    argv = ["--model", str(model_dir), "--image", str(tmp_path / "0.png"), "--image", str(tmp_path / "1.png"),
            "--video", str(tmp_path / "frames"), "--frames", "2", "--prompt", "5 6 7", "--max-new-tokens", "3"]
    assert chat_module.main(argv) == 0
    out = capsys.readouterr().out.split()
    ids, groups, spans, _, _ = chat_module.build_inputs(model, "5 6 7", [tmp_path / "0.png", tmp_path / "1.png"],
                                                  str(tmp_path / "frames"), 2)
    expected = model.generate(ids, groups, spans, max_new_tokens=3, eos_token_id=model.config.lm.eos_token_ids)
    assert [int(t) for t in out] == expected[0, :len(out)].tolist()
    assert chat_module.main(argv[:2] + ["--prompt", "hello"]) == 2


@pytest.mark.parametrize("pool_after_projection", [False, True])
def test_gradients_reach_projector_tower_and_text_embeddings(pool_after_projection):
    model = make_model(pool_after_projection=pool_after_projection).train()
    tok, groups = build_prompt(model)
    logits = model(tok.input_ids[None], groups, tok.image_spans)
    F.cross_entropy(logits[0, :-1], tok.input_ids[1:]).backward()
    for p in (model.mm_projector[0].weight, model.vision_tower.layers[0].mlp.fc1.weight, model.lm.embed_tokens.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # The placeholder id's embedding row is overwritten everywhere, so no gradient reaches it.
    assert model.lm.embed_tokens.weight.grad[model.config.image_token_id].abs().sum() == 0


ANYRES_PINPOINTS = [(56, 112), (112, 56), (112, 112)]  # tile 56: 1x2, 2x1, 2x2 grids


def test_anyres_token_counts():
    c = named_multimodal_config("tiny-longllava", image_aspect_ratio="anyres", image_grid_pinpoints=ANYRES_PINPOINTS)
    # 100x70 -> best fit 112x112 (2x2 tiles); pooled 2x2 per tile -> a 4x4 grid; the image covers
    # int(70 * 4 / 100) = 2 rows of it (1 row cut from each end); 2 rows x (4 + newline) + 4 base = 14.
    assert c.anyres_layout((100, 70)) == (2, 2)
    assert c.tokens_for_anyres((100, 70)) == 4 + 2 * (4 + 1)
    # 56x112 (tall) -> 1 col x 2 rows, exact fit: no unpadding: 4 rows x (2 + 1) + 4.
    assert c.anyres_layout((56, 112)) == (2, 1) and c.tokens_for_anyres((56, 112)) == 4 + 4 * 3
    # anyres_max_1: 2x4 is sqrt(8 / 4) = 1.41 > 1.1 tiles' worth -> bilinear to 1x2, + newline, + base.
    capped = replace(c, image_aspect_ratio="anyres_max_1")
    assert capped.anyres_max == 1 and capped.tokens_for_anyres((100, 70)) == 4 + 1 * (2 + 1)
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        named_multimodal_config("tiny-longllava", image_aspect_ratio="anyres")
    # The full-size OneVision-like case: 24x24 per tile, no pooling, 2x2 tiles of a square image.
    big = named_multimodal_config("longllava-9b", pooling="none", image_aspect_ratio="anyres",
                                  image_grid_pinpoints="(1x1),...,(2x2)")
    assert big.tokens_for_anyres((672, 672)) == 576 + 48 * 49


@pytest.mark.parametrize("aspect", ["anyres", "anyres_max_1"])
def test_anyres_rows_land_in_place(aspect, tmp_path):
    model = make_model(image_aspect_ratio=aspect, image_grid_pinpoints=ANYRES_PINPOINTS)
    assert model.image_newline.shape == (model.config.lm.hidden_size,)
    image, plain = random_image(5, (100, 70)), random_image(6)
    tiled = pixels.anyres_tiles(image, ANYRES_PINPOINTS, tile_size=56)
    assert (tiled.rows, tiled.cols) == (2, 2) and len(tiled.images) == 5
    n_any = model.tokens_for_anyres(image.size)
    ids = torch.tensor([5, 6] + [0] * n_any + [7] + [0] * 4 + [8, 9])
    groups = [pixels.preprocess_many(tiled.images, PIX), pixels.preprocess_many([plain], PIX)]
    spans = [(2, n_any), (3 + n_any, 4)]
    with torch.no_grad():
        embeds = model.embed_multimodal(ids, groups, spans, image_sizes=[image.size, None])[0]
        feats = model.encode_images(groups[0])  # (5, 4, hidden): base, then 4 tiles, each pooled to 2x2
        # The 4x4 grid by hand: row R, column C is tile (R // 2, C // 2)'s token (R % 2, C % 2).
        grid = torch.stack([torch.stack([feats[1 + (r // 2) * 2 + c // 2][(r % 2) * 2 + c % 2] for c in range(4)])
                            for r in range(4)])
        grid = grid[1:3]  # unpad: the 100x70 image covers rows 1..2
        if aspect == "anyres_max_1":
            grid = F.interpolate(grid.permute(2, 0, 1)[None], size=[1, 2], mode="bilinear")[0].permute(1, 2, 0)
        newline = model.image_newline.expand(grid.shape[0], 1, -1)
        expected = torch.cat([feats[0], torch.cat([grid, newline], dim=1).reshape(-1, feats.shape[-1])])
        text = model.lm.embed_tokens(ids)
    assert expected.shape[0] == n_any == (14 if aspect == "anyres" else 7)
    torch.testing.assert_close(embeds[2:2 + n_any], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(embeds[3 + n_any:7 + n_any], model.encode_images(groups[1])[0].detach(), rtol=0, atol=0)
    keep = torch.ones(len(ids), dtype=torch.bool)
    keep[2:2 + n_any] = keep[3 + n_any:7 + n_any] = False
    assert torch.equal(embeds[keep], text[keep])
    with torch.no_grad():  # spans from the ids alone; forward; save/load keeps image_newline as model.image_newline
        assert torch.equal(model.embed_multimodal(ids, groups, image_sizes=[image.size, None])[0], embeds)
        logits = model(ids, groups, spans, image_sizes=[image.size, None])
    save_longllava(model, tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.image_newline" in set(f.keys())
    loaded = load_longllava(tmp_path)
    assert loaded.config.image_aspect_ratio == aspect and loaded.tokens_for_anyres(image.size) == n_any
    with torch.no_grad():
        assert torch.equal(loaded(ids, groups, spans, image_sizes=[image.size, None]), logits)
    first = model.generate(ids, groups, spans, image_sizes=[image.size, None], max_new_tokens=1, chunk_size=5,
                           eos_token_id=[])
    assert int(first[0, 0]) == int(logits[0, -1].argmax())
    with pytest.raises(ValueError, match="base image and 2x2 tiles"):
        model.embed_multimodal(ids, [groups[0][:4], groups[1]], spans, image_sizes=[image.size, None])


@pytest.mark.parametrize("pool_after_projection", [False, True])
@pytest.mark.parametrize("pool_grid", [None, 3, (2, 3)])
def test_bilinear_frame_pooling_equals_interpolate(pool_grid, pool_after_projection):
    model = make_model(pooling="bilinear", pool_grid=pool_grid, pool_after_projection=pool_after_projection)
    size = (2, 2) if pool_grid is None else (pool_grid, pool_grid) if isinstance(pool_grid, int) else pool_grid
    assert model.tokens_per_image() == size[0] * size[1]
    frames = pixels.preprocess_many([random_image(30 + i) for i in range(3)], PIX)
    n = model.tokens_per_image()
    ids = torch.tensor([5] + [0] * (3 * n) + [6])
    with torch.no_grad():
        embeds = model.embed_multimodal(ids, frames, [(1 + i * n, n) for i in range(3)])[0]
        x = model.vision_tower(frames)
        if pool_after_projection:
            x = model.mm_projector(x)
        g = model.config.vision.grid
        maps = F.interpolate(x.transpose(1, 2).reshape(3, -1, g, g), size=size, mode="bilinear", align_corners=False)
        pooled = maps.flatten(2).transpose(1, 2)
        expected = pooled if pool_after_projection else model.mm_projector(pooled)
    torch.testing.assert_close(embeds[1:1 + 3 * n], expected.reshape(-1, expected.shape[-1]), rtol=1e-5, atol=1e-5)
    if pool_grid is None:  # at an exact factor of 2, bilinear is the 2x2 average (LongLLaVA's "2d")
        with torch.no_grad():
            avg = make_model(pool_after_projection=pool_after_projection).embed_multimodal(
                ids, frames, [(1 + i * n, n) for i in range(3)])[0]
        torch.testing.assert_close(embeds, avg, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pool_grid"):
        named_multimodal_config("tiny-longllava", pool_grid=3)
