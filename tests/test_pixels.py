"""Pixels in: tower preprocessing against hand computations on tiny images, tiles, AnyRes, video frames.

Images are built from tensors whose every pixel is known, so each expected value is written down from
the definition (crop offsets, pad colours, tile boxes, LLaVA-NeXT's formulas) rather than copied from a run.
"""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from llmodel import pixels
from llmodel.pixels import PixelConfig


def pattern(width, height):
    """uint8 (H, W, 3) with pixel (x, y) = (x * 40 + 7, y * 30 + 11, (x * 13 + y * 17) % 256): all distinct."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([(x * 40 + 7) % 256, (y * 30 + 11) % 256, (x * 13 + y * 17) % 256], -1).to(torch.uint8)


def to_pil(array):
    return Image.fromarray(array.numpy(), "RGB")


def normalize(array, mean, std):
    """The hand formula: (x / 255 - mean) / std, channels first."""
    x = array.permute(2, 0, 1).double() / 255
    mean, std = (torch.tensor(v, dtype=torch.float64).view(3, 1, 1) for v in (mean, std))
    return (x - mean) / std


MEAN, STD = (0.25, 0.5, 0.75), (0.5, 0.25, 0.125)


@pytest.mark.parametrize("width,height", [(3, 5), (5, 3)])
def test_shortest_edge_then_center_crop(width, height):
    # Short side already 3: the resize is the identity; the crop keeps the middle 3 of the long side.
    array = pattern(width, height)
    got = pixels.preprocess(to_pil(array), PixelConfig(3, MEAN, STD))
    offset = (max(width, height) - 3) // 2
    crop = array[offset:offset + 3] if height > width else array[:, offset:offset + 3]
    assert got.shape == (3, 3, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), normalize(crop, MEAN, STD), rtol=0, atol=1e-6)


def test_shortest_edge_resize_size_then_crop():
    # 6x10 -> short side 4, long int(4 * 10 / 6) = 6 (bicubic), then rows (6 - 4) // 2 = 1 .. 4.
    image = to_pil(pattern(6, 10))
    resized = torch.from_numpy(np.asarray(image.resize((4, 6), Image.Resampling.BICUBIC)).copy())
    got = pixels.preprocess(image, PixelConfig(4, MEAN, STD))
    torch.testing.assert_close(got.double(), normalize(resized[1:5], MEAN, STD), rtol=0, atol=1e-6)


def test_siglip_resizes_to_square_without_crop():
    constant = Image.new("RGB", (3, 5), (51, 102, 204))
    got = pixels.preprocess(constant, pixels.pixel_config("siglip", 4))
    assert got.shape == (3, 4, 4)
    expected = torch.tensor([51, 102, 204], dtype=torch.float64).view(3, 1, 1) / 255 * 2 - 1
    torch.testing.assert_close(got.double(), expected.expand(3, 4, 4), rtol=0, atol=1e-6)
    # Not cropped: a 3x6 image whose top half is black and bottom half white keeps both halves.
    halves = torch.zeros(6, 3, 3, dtype=torch.uint8)
    halves[3:] = 255
    got = pixels.preprocess(to_pil(halves), pixels.pixel_config("siglip", 4))
    assert got[:, 0].max() < -0.9 and got[:, 3].min() > 0.9


def test_pad_to_square_with_the_mean_colour():
    # 3x5 -> a 5x5 square; the image pasted at x = (5 - 3) // 2 = 1; pad colour int(mean * 255).
    array = pattern(3, 5)
    got = pixels.preprocess(to_pil(array), PixelConfig(5, MEAN, STD, pad_to_square=True))
    fill = torch.tensor([int(m * 255) for m in MEAN], dtype=torch.uint8)
    assert pixels.mean_colour(MEAN) == (63, 127, 191)
    square = fill.expand(5, 5, 3).clone()
    square[:, 1:4] = array
    torch.testing.assert_close(got.double(), normalize(square, MEAN, STD), rtol=0, atol=1e-6)


def test_named_tower_conventions():
    clip, dino = pixels.pixel_config("clip"), pixels.pixel_config("dinov2", 448)
    assert (clip.image_size, clip.resize, clip.mean) == (336, "shortest_edge", pixels.CLIP_MEAN)
    assert (dino.image_size, dino.shortest_edge) == (448, 512)
    assert pixels.preprocess(Image.new("RGB", (40, 30)), "dinov2").shape == (3, 224, 224)
    assert pixels.preprocess_many([Image.new("L", (9, 7))] * 2, PixelConfig(4, MEAN, STD)).shape == (2, 3, 4, 4)


@pytest.mark.parametrize("width,height", [(50, 30), (51, 31), (40, 20)])
def test_longllava_tiles_pad_white_raster_order(width, height):
    tile = 20
    array = pattern(width, height)
    tiled = pixels.longllava_tiles(to_pil(array), tile)
    rows, cols = -(-height // tile), -(-width // tile)
    assert (tiled.rows, tiled.cols) == (rows, cols) and len(tiled.images) == 1 + rows * cols
    assert torch.equal(torch.from_numpy(np.asarray(tiled.images[0]).copy()), array)  # global image first
    canvas = torch.full((rows * tile, cols * tile, 3), 255, dtype=torch.uint8)
    top, left = (rows * tile - height) // 2, (cols * tile - width) // 2
    canvas[top:top + height, left:left + width] = array
    for index, image in enumerate(tiled.images[1:]):
        r, c = divmod(index, cols)
        assert image.size == (tile, tile)
        assert torch.equal(torch.from_numpy(np.asarray(image).copy()),
                           canvas[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile])


# --- AnyRes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("original,candidates,best", [
    # 800x600: (672,672) keeps 672*504; (1344,672) and (1008,672) both keep all 480000 px (scale 1.12);
    # the tie goes to the smaller waste, 1008*672 - 480000 < 1344*672 - 480000.
    ((800, 600), [(672, 672), (1344, 672), (1008, 672), (672, 1344)], (1008, 672)),
    # 1000x500: (672,336) keeps 672*336; (1344,672) keeps everything -> effective resolution wins.
    ((1000, 500), [(672, 336), (1344, 672)], (1344, 672)),
    # 100x50 is fully kept by both; (336,336) wastes 112896 - 5000 < 225792 - 5000.
    ((100, 50), [(672, 336), (336, 336)], (336, 336)),
    # Equal effective and equal waste: the first listed stays.
    ((300, 300), [(336, 672), (672, 336)], (336, 672)),
])
def test_select_best_resolution(original, candidates, best):
    assert pixels.select_best_resolution(original, candidates) == best


def test_grid_pinpoints_forms():
    assert pixels.parse_grid_pinpoints("(1x1),...,(2x3)", 10) == [(10, 10), (10, 20), (10, 30),
                                                                   (20, 10), (20, 20), (20, 30)]
    assert pixels.parse_grid_pinpoints("[(336, 672), (672, 336)]", 336) == [(336, 672), (672, 336)]
    assert pixels.anyres_max_from_name("anyres_max_9") == 9 and pixels.anyres_max_from_name("anyres") is None


def test_resize_and_pad_centres_on_black():
    # 100x50 -> (336, 336): scale_w 3.36 < scale_h 6.72, so 336 x ceil(50 * 3.36) = 168, pasted at y = 84.
    got = torch.from_numpy(np.asarray(pixels.resize_and_pad(Image.new("RGB", (100, 50), (255, 255, 255)),
                                                            (336, 336))).copy())
    assert (got[:84] == 0).all() and (got[84 + 168:] == 0).all() and (got[84:84 + 168] == 255).all()


def test_anyres_tiles_base_first_then_raster():
    # A 20x10 image that is exactly the pinpoint (20, 10): no resize; tiles are its left and right halves.
    array = pattern(20, 10)
    tiled = pixels.anyres_tiles(to_pil(array), [(10, 10), (20, 10)], tile_size=10)
    assert (tiled.rows, tiled.cols) == (1, 2) and len(tiled.images) == 3
    assert tiled.images[0].size == (10, 10)  # the base image, stretched to one tile
    assert torch.equal(torch.from_numpy(np.asarray(tiled.images[1]).copy()), array[:, :10])
    assert torch.equal(torch.from_numpy(np.asarray(tiled.images[2]).copy()), array[:, 10:])


@pytest.mark.parametrize("original,rows,cols", [
    ((800, 400), slice(3, 9), slice(0, 12)),    # wider: new_height int(400 * 12 / 800) = 6, padding 3
    ((300, 900), slice(0, 12), slice(4, 8)),    # taller: new_width int(300 * 12 / 900) = 4, padding 4
    ((1000, 300), slice(4, 8), slice(0, 12)),   # new_height int(3.6) = 3, padding (12 - 3) // 2 = 4: 4 rows kept
    ((500, 500), slice(0, 12), slice(0, 12)),   # same aspect ratio: nothing removed
])
def test_unpad_features(original, rows, cols):
    features = torch.randn(12, 12, 5)
    got = pixels.unpad_features(features, original)
    assert torch.equal(got, features[rows, cols])


def test_anyres_max_cap():
    # 54x54 tokens with 27x27-token tiles and N = 1: times = sqrt(2916 / 729) = 2 > 1.1 -> 27x27.
    ramp = torch.arange(54, dtype=torch.float32).view(1, 54, 1).expand(54, 54, 2)
    got = pixels.cap_feature_grid(ramp, 1, 27)
    assert got.shape == (27, 27, 2)
    # Bilinear by exactly 2 (half-pixel centres): output j samples 2j + 0.5, the mean of columns 2j, 2j + 1.
    expected = (torch.arange(0, 54, 2) + 0.5).float().view(1, 27, 1).expand(27, 27, 2)
    torch.testing.assert_close(got, expected)
    small = torch.randn(28, 28, 2)  # sqrt(784 / 729) = 1.04 <= 1.1: unchanged
    assert torch.equal(pixels.cap_feature_grid(small, 1, 27), small)


def test_anyres_feature_grid_layout_and_newline():
    rows, cols, side, channels = 2, 3, 4, 3
    tiles = torch.arange(rows * cols, dtype=torch.float32).view(-1, 1, 1).expand(-1, side * side, channels)
    newline = torch.full((channels,), -1.0)
    got = pixels.anyres_feature_grid(tiles, rows, cols, (cols * 100, rows * 100), newline=newline)
    grid = got.view(rows * side, cols * side + 1, channels)
    assert (grid[:, -1] == -1).all()
    for r in range(rows):
        for c in range(cols):  # tile r * cols + c sits at block (r, c)
            block = grid[r * side:(r + 1) * side, c * side:(c + 1) * side]
            assert (block == r * cols + c).all()
    with pytest.raises(ValueError, match="rows \\* cols"):
        pixels.anyres_feature_grid(tiles, 3, 3, (300, 300))


# --- Video -------------------------------------------------------------------------------------------

def test_uniform_frame_indices_match_numpy_linspace():
    assert pixels.uniform_frame_indices(10, 4) == [0, 3, 6, 9]
    assert pixels.uniform_frame_indices(3, 8) == [0, 1, 2]
    for total in range(1, 200, 7):
        for n in (1, 2, 3, 8, 16, 64):
            if total > n:
                assert pixels.uniform_frame_indices(total, n) == np.linspace(0, total - 1, n, dtype=int).tolist()


def test_frames_from_a_folder_in_natural_order(tmp_path):
    for i in range(12):  # frame_1 ... frame_12, each filled with its own index
        Image.new("RGB", (4, 3), (i, 2 * i, 3 * i)).save(tmp_path / f"frame_{i + 1}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    frames = pixels.load_video_frames(tmp_path, num_frames=4)
    # linspace(0, 11, 4) = 0, 3.67, 7.33, 11 -> frames 0, 3, 7, 11 (frame_1, frame_4, frame_8, frame_12).
    assert [f.getpixel((0, 0))[0] for f in frames] == [0, 3, 7, 11]
    # fps sampling: 30 fps video at 10 fps -> every 3rd frame: 0, 3, 6, 9.
    frames = pixels.load_video_frames(tmp_path, fps=10, video_fps=30)
    assert [f.getpixel((0, 0))[0] for f in frames] == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="video_fps"):
        pixels.load_video_frames(tmp_path, fps=10)


def test_frames_from_a_list():
    images = [Image.new("RGB", (2, 2), (i, 0, 0)) for i in range(5)]
    assert [f.getpixel((0, 0))[0] for f in pixels.load_video_frames(images, num_frames=3)] == [0, 2, 4]


def test_video_file_without_pyav_says_how_to_install(tmp_path, monkeypatch):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(ImportError, match="pip install av"):
        pixels.load_video_frames(clip, num_frames=4)


def _write_clip(path, count, rate, width=32, height=24):
    """A `count`-frame clip at `rate` fps whose frame i is a solid grey of level 8 + 12·i."""
    av = pytest.importorskip("av")
    codec = next((c for c in ("mpeg4", "libx264", "h264") if c in av.codecs_available), None)
    if codec is None:
        pytest.skip("this PyAV build has no mpeg4 or h264 encoder")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(count):
            array = np.full((height, width, 3), 8 + 12 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)


def _frame_levels(frames):
    """Each frame's index, read back from its mean grey level (lossy codec: rounded to the nearest step)."""
    levels = [float(np.asarray(f, dtype=np.float64).mean()) for f in frames]
    for level in levels:  # every frame stays close to one of the written levels
        assert abs(level - (8 + 12 * round((level - 8) / 12))) < 4, levels
    return [round((level - 8) / 12) for level in levels]


def test_frames_from_a_video_file(tmp_path):
    clip = tmp_path / "clip.mp4"
    _write_clip(clip, count=20, rate=10)
    frames = pixels.load_video_frames(clip)
    assert _frame_levels(frames) == list(range(20))
    assert all(f.mode == "RGB" and f.size == (32, 24) for f in frames)
    # uniform: linspace(0, 19, 4) = 0, 6.33, 12.67, 19 -> frames 0, 6, 12, 19.
    frames = pixels.load_video_frames(clip, num_frames=4)
    assert len(frames) == 4 and _frame_levels(frames) == [0, 6, 12, 19]
    assert all(f.mode == "RGB" and f.size == (32, 24) for f in frames)
    # fps: the file's own 10 fps sampled at 5 fps -> every 2nd frame, no video_fps needed.
    frames = pixels.load_video_frames(clip, fps=5)
    assert _frame_levels(frames) == list(range(0, 20, 2))
    # both: every 2nd frame (10 of them), then linspace(0, 9, 3) = 0, 4, 9 of those -> frames 0, 8, 18.
    frames = pixels.load_video_frames(clip, fps=5, num_frames=3)
    assert _frame_levels(frames) == [0, 8, 18]


def test_tiles_match_the_prompt_markers():
    from llmodel import formats
    tiled = pixels.longllava_tiles(Image.new("RGB", (50, 30)), 20)
    prompt = formats.format_prompt(formats.longllava_tiled_image(tiled.rows, tiled.cols) + "\nRead it.", "longllava")
    ids = formats.tokenize_prompt(prompt, lambda text: [ord(c) for c in text], [4] * len(tiled.images))
    assert len(ids.image_spans) == 1 + tiled.rows * tiled.cols
