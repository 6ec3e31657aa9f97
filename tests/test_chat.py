"""`llmodel.chat` end to end on tiny random models: a real tokenizer.json through the CLI, AnyRes tiling, and
Cobra's second tower."""
from dataclasses import replace

import pytest
import torch
from PIL import Image

from llmodel import chat as chat_module
from llmodel import formats, pixels
from llmodel.multimodal import LongLLaVA, load_longllava, named_multimodal_config, save_longllava

PINPOINTS = [(56, 112), (112, 56), (112, 112)]  # tile 56: 1x2, 2x1, 2x2 grids


def spread(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():  # A_log/D/norms keep their init; spread the rest so outputs are not degenerate
        for name, p in model.named_parameters():
            if "A_log" not in name and not name.endswith("D"):
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def make(name, seed=0, **overrides):
    torch.manual_seed(seed)
    return spread(LongLLaVA(named_multimodal_config(name, **overrides)), seed)


def random_image(seed, size=(80, 64)):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(data, "RGB")


class CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [3 + ord(ch) % 120 for ch in text]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def word_level_tokenizer(template="longllava"):
    """A tiny WordLevel tokenizers.Tokenizer trained in memory, with the template's markers as special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    t = formats.get_template(template)
    specials = ["[UNK]", formats.IMAGE_PLACEHOLDER, "<img>", "</img>", "<vid>", "</vid>", "<t>"]
    for text in (t.user_prefix, t.assistant_prefix, t.end_of_answer):
        specials += [piece for piece in text.replace(">", ">\n").split() if piece.startswith("<")]
    specials = list(dict.fromkeys(specials))
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["what is in the picture ?", "a red cat sits on a blue mat .", "the dog runs in the park",
              "describe the image in one word", "two birds fly over green hills", "yes no maybe"]
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer.add_special_tokens(specials)  # matched whole, before the whitespace split
    return tokenizer


def test_cli_with_tokenizer_json_streams_the_decoded_answer(tmp_path, capsys):
    tokenizer = word_level_tokenizer()
    vocab = tokenizer.get_vocab_size()
    base = named_multimodal_config("tiny-longllava")
    model = make("tiny-longllava", seed=3, lm=replace(base.lm, vocab_size=vocab),
                 image_token_id=tokenizer.token_to_id(formats.IMAGE_PLACEHOLDER))
    model_dir = tmp_path / "model"
    save_longllava(model, model_dir)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    random_image(1, (90, 60)).save(tmp_path / "a.png")
    prompt = "what is in the picture ?"
    argv = ["--model", str(model_dir), "--image", str(tmp_path / "a.png"), "--prompt", prompt,
            "--max-new-tokens", "8"]
    assert chat_module.main(argv) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    streamed = out[:-1]

    from tokenizers import Tokenizer
    loaded_tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    loaded = load_longllava(model_dir)
    inputs = chat_module.build_inputs(loaded, prompt, [tmp_path / "a.png"], tokenizer=loaded_tok)
    ids = inputs.input_ids.tolist()
    # The template's markers are single special tokens, the question's words are known words, and the
    # image is one span of tokens_per_image placeholder rows.
    for marker in ("<|startoftext|>", "<|User|>", "<|Assistant|>", "<img>", "</img>"):
        assert loaded_tok.token_to_id(marker) in ids
    assert loaded_tok.token_to_id("[UNK]") not in ids
    assert inputs.image_spans == [(ids.index(loaded.config.image_token_id), loaded.tokens_per_image())]
    assert inputs.images_2 is None and inputs.image_sizes is None
    end_id = loaded_tok.token_to_id("<|endoftext|>")
    eos = sorted(set(loaded.config.lm.eos_token_ids) | {end_id})
    new = loaded.generate(inputs.input_ids, inputs.images, inputs.image_spans, max_new_tokens=8, eos_token_id=eos)
    answer_ids = [t for t in new[0].tolist() if t not in eos]
    assert answer_ids, "the tiny model answered nothing; pick another seed"
    assert streamed == loaded_tok.decode(answer_ids)


@pytest.mark.parametrize("aspect,count", [("anyres", 14), ("anyres_max_1", 7)])
def test_anyres_chat_tiles_each_image(aspect, count):
    model = make("tiny-longllava", image_aspect_ratio=aspect, image_grid_pinpoints=PINPOINTS)
    image = random_image(5, (100, 70))  # best fit 112x112: base + 2x2 tiles
    frames = [random_image(20 + i) for i in range(4)]
    tok = CharTokenizer()
    inputs = chat_module.build_inputs(model, "what?", [image], frames, 2, tokenizer=tok)
    assert model.tokens_for_anyres(image.size) == count
    assert [g.shape for g in inputs.images] == [(5, 3, 56, 56), (2, 3, 56, 56)]
    assert inputs.image_sizes == [(100, 70), None] and inputs.images_2 is None
    assert [n for _, n in inputs.image_spans] == [count, 4, 4]
    tiled = pixels.anyres_tiles(image, PINPOINTS, tile_size=56)
    expected_pixels = pixels.preprocess_many(tiled.images, chat_module.pixel_config_for(model))
    assert torch.equal(inputs.images[0], expected_pixels)
    pieces = []
    answer = chat_module.chat(model, tok, "what?", images=[image], video=frames, num_frames=2, max_new_tokens=3,
                              stream=pieces.append)
    new = model.generate(inputs.input_ids, inputs.images, inputs.image_spans, image_sizes=inputs.image_sizes,
                         max_new_tokens=3)
    assert answer == "".join(pieces) == tok.decode(new[0].tolist())
    # Without a tokenizer: token ids after the AnyRes span.
    plain = chat_module.build_inputs(model, "5 6", [image])
    assert plain.input_ids.tolist() == [0] * count + [5, 6] and plain.image_spans == [(0, count)]
    with pytest.raises(ValueError, match="tiles"):
        chat_module.build_inputs(model, "what?", [image], tiles=True, tokenizer=tok)


def test_cobra_chat_feeds_the_second_tower_its_own_pixels():
    model = make("tiny-cobra")
    images = [random_image(1), random_image(2, (40, 90))]
    tok = CharTokenizer()
    inputs = chat_module.build_inputs(model, "what?", images, tokenizer=tok, template="zephyr")
    assert [n for _, n in inputs.image_spans] == [16, 16] and inputs.image_sizes is None
    assert inputs.image_spans[0][0] == 0  # zephyr: images first in the sequence
    siglip = pixels.pixel_config("siglip", image_size=56, pad_to_square=True)
    dino = pixels.pixel_config("dinov2", image_size=56, pad_to_square=True)
    assert len(inputs.images) == len(inputs.images_2) == 2  # one group per image, for each tower
    assert torch.equal(torch.cat(inputs.images), pixels.preprocess_many(images, dino))
    assert torch.equal(torch.cat(inputs.images_2), pixels.preprocess_many(images, siglip))
    assert not torch.equal(inputs.images[0], inputs.images_2[0])
    pieces = []
    answer = chat_module.chat(model, tok, "what?", images=images, template="zephyr", max_new_tokens=3,
                              stream=pieces.append)
    new = model.generate(inputs.input_ids, inputs.images, inputs.image_spans, images_2=inputs.images_2,
                         max_new_tokens=3)
    assert answer == "".join(pieces) == tok.decode(new[0].tolist()) and len(answer) == 3
    with torch.no_grad():  # the second tower's pixels reach the embeddings
        a = model.embed_multimodal(inputs.input_ids, inputs.images, inputs.image_spans, images_2=inputs.images_2)
        b = model.embed_multimodal(inputs.input_ids, inputs.images, inputs.image_spans)
    assert not torch.equal(a, b)
