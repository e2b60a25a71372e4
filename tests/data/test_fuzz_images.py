"""Fuzz: images that are not images, truncated ones, decompression bombs (by pixel count and by aspect ratio),
and files that are not regular files. Every one is decoded to RGB or refused with an UnusableImage naming it (the
loader skips and counts it; the evaluation stops naming the item), within the time bound."""
import io
import os
import struct
import zlib

import pytest
import torch
from hypothesis import strategies as st
from PIL import Image

import fuzz_support as fz
import seed_fixtures
from compclip.data.dataset import SampleBuilder, Skip
from compclip.data.inputs import MAX_ASPECT_RATIO, UnusableImage, open_image
from compclip.evaluation import EvalDataError
from compclip.evaluation.embed import ImageRef, _ImageDataset


def png_bytes(width: int, height: int) -> bytes:
    """A valid black 1-bit PNG of any size, written row block by row block (a 10,000 x 10,000 image is 12 kB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes((width + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row * min(1000, height - start)) for start in range(0, height, 1000))
    body += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _encoded(image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 18), (200, 40, 40)).save(buffer, format=image_format)
    return buffer.getvalue()


SPECIAL = {"bomb_header": png_bytes(40000, 40000)[:100], "aspect_strip": png_bytes(1, 2 * MAX_ASPECT_RATIO + 1),
           "text": b"caption,image\n", "empty": b"", "html": b"<html><body>404</body></html>"}


@st.composite
def mutated_image(draw):
    source = draw(st.sampled_from(["png", "jpeg", "gif", "webp", "special"]))
    if source == "special":
        name = draw(st.sampled_from(sorted(SPECIAL)))
        return [name], SPECIAL[name]
    kind, data = draw(fz.byte_mutation(_encoded(source.upper()), kinds=("truncate", "flip", "insert_random",
                                                                         "delete_span", "repeat_span", "empty")))
    return [f"{source}-{kind}"], data


def test_open_image_decodes_or_refuses_naming_the_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    path = str(folder / "case.img")
    builder = SampleBuilder(None, num_negatives=2, seed=0)

    def check(image, mutation):
        assert image.mode == "RGB" and image.width * image.height <= Image.MAX_IMAGE_PIXELS
        assert max(image.size) <= MAX_ASPECT_RATIO * min(image.size)

    def read():
        try:
            return open_image(path)
        except UnusableImage:
            with open(path, "rb") as handle:
                data = handle.read()
            with pytest.raises(Skip, match="unusable image"):  # the loader's side of the same refusal
                builder.build(0, 0, data, "a caption", None, None, None, "shard.tar:case")
            raise

    fz.fuzz_reader("images", mutated_image(), path, read, check, refusal="skipped")  # what the loader does


def test_a_decompression_bomb_below_pil_s_error_threshold_is_refused_before_decoding(tmp_path):
    """10,000 x 10,000 pixels: over PIL's limit but under twice it, where PIL only warns and decodes (300 MB of
    RGB here, gigabytes after a resize); the old reader decoded it."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(10_000, 10_000))
    with fz.time_bound(5), pytest.raises(UnusableImage, match=r"bomb.png: 10000x10000 = 100000000 pixels, more "
                                                              r"than the decompression-bomb limit"):
        open_image(str(path))
    builder = SampleBuilder(lambda image: torch.zeros(1), num_negatives=1, seed=0)
    with pytest.raises(Skip, match="decompression-bomb limit"):
        builder.build(0, 0, str(path), "a caption", None, None, None, "train.jsonl:7")


def test_an_image_of_extreme_aspect_ratio_is_refused(tmp_path):
    """1 x 60,000 pixels is a few hundred bytes, but scaled to a 224-pixel short side it is 13.4M x 224 x 3."""
    path = tmp_path / "strip.png"
    path.write_bytes(png_bytes(60_000, 1))
    with pytest.raises(UnusableImage, match=f"60000x1, an aspect ratio beyond 1:{MAX_ASPECT_RATIO}"):
        open_image(str(path))


def test_files_that_are_not_regular_files_are_refused_without_blocking(tmp_path):
    seed_fixtures.write_image(str(tmp_path / "outside" / "real.png"), 1)
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "fifo.png")  # opening a FIFO for reading blocks until a writer comes: the old reader hung
    os.symlink("/dev/zero", root / "zero.png")
    os.symlink(tmp_path / "outside" / "real.png", root / "linked.png")
    (root / "folder.png").mkdir()
    for name in ("fifo.png", "zero.png", "folder.png"):
        with fz.time_bound(5), pytest.raises(UnusableImage, match=f"{name}: not a regular file"):
            open_image(str(root / name))
    # a symbolic link to a regular file is followed (docs/reliability.md: image folders are often links)
    assert open_image(str(root / "linked.png")).size == (16, 12)


def test_evaluation_images_name_the_item(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(10_000, 10_000))
    dataset = _ImageDataset([ImageRef(str(path), None, "swap_att.json", "17")], lambda image: image)
    with pytest.raises(EvalDataError, match=r"swap_att.json: item 17: cannot read image .*bomb.png: 10000x10000"):
        dataset[0]
    seed_fixtures.write_image(str(tmp_path / "small.png"), 0, size=(32, 24))
    boxed = _ImageDataset([ImageRef(str(tmp_path / "small.png"), (40.0, 0.0, 60.0, 10.0), "vgr.json", "3"),
                           ImageRef(str(tmp_path / "small.png"), (0.0, 0.0, 1e9, 1e9), "vgr.json", "4")],
                          lambda image: image)
    with pytest.raises(EvalDataError, match=r"vgr.json: item 3: box .* lies outside the 32x24 image"):
        boxed[0]
    with pytest.raises(EvalDataError, match=r"vgr.json: item 4: box .* larger than the decompression-bomb limit"):
        boxed[1]
