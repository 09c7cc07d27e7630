"""Reliability (issue 8): bad images, prompts and checkpoint files give a correct result or a clear error, and a
checkpoint writer killed mid-way loses nothing.

The image processor's own bad-input tests are in test_image_processing.py; here the same kinds of input go
through the full processor, plus what that file does not cover (real files in odd formats, more kinds of damage).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from deepseek_vl_hf.modeling.modeling_deepseek_vl_hf import (
    CheckpointError,
    DeepseekVLHFForCausalLM,
    DeepseekVLHFModel,
)
from deepseek_vl_hf.processing.image_processing_deepseek_vl_hf import (
    DeepseekVLHFImageProcessor,
    ImageInputError,
)
from deepseek_vl_hf.processing.processing_deepseek_vl_hf import (
    IMAGE_TOKEN,
    DeepseekVLHFProcessor,
    ProcessorInputError,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jinja2.exceptions import TemplateError
from PIL import Image
from safetensors.torch import load_file, save_file

from deepseek_vl_hf.checkpoint import save_checkpoint
from deepseek_vl_hf.presets import preset_config
from tests.compat import compat_pythonpath
from tests.conftest import make_image

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
SIZE = 64  # image side of the small processor used here
TOKENS = 4  # image tokens per image of the small processor
CLIP_BG = (122, 116, 104)


@pytest.fixture(scope="module")
def small(tiny_pair) -> DeepseekVLHFProcessor:
    """The tiny tokenizer with a 64-pixel image processor and 4 tokens per image: fast enough to fuzz."""
    return DeepseekVLHFProcessor(
        image_processor=DeepseekVLHFImageProcessor(image_size=SIZE), tokenizer=tiny_pair[1].tokenizer,
        num_image_tokens=TOKENS,
    )


def prompt(n_images: int) -> str:
    return "Compare " + " and ".join([IMAGE_TOKEN] * n_images) + "."


# --- images through the processor ---------------------------------------------------------------------------


def saved_as(path: Path, fmt: str, image: Image.Image, **kwargs) -> Path:
    image.save(path, fmt, **kwargs)
    return path


def exif_rotated_jpeg(path: Path) -> Path:
    """A 60x40 JPEG whose EXIF says "rotate 90 clockwise to view": upright it is 40 wide, 60 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return saved_as(path, "JPEG", Image.new("RGB", (60, 40), (200, 30, 30)), exif=exif)


def palette_png_with_transparent_index(path: Path) -> Path:
    """A palette PNG (tRNS chunk) whose left half uses the transparent index 0 and right half opaque blue."""
    image = Image.new("P", (64, 64), 1)
    image.putpalette([0, 255, 0, 0, 0, 255])
    image.paste(0, (0, 0, 32, 64))
    return saved_as(path, "PNG", image, transparency=0)


def test_odd_but_valid_files_give_the_right_pixels(small, tmp_path):
    """Real files: CMYK JPEG, EXIF-rotated JPEG, transparent palette PNG, wrong extensions, first GIF frame."""
    cmyk = saved_as(tmp_path / "cmyk.jpg", "JPEG", Image.new("CMYK", (64, 64), (0, 255, 255, 0)))
    rotated = exif_rotated_jpeg(tmp_path / "rotated.jpg")
    palette = palette_png_with_transparent_index(tmp_path / "palette.png")
    jpeg_as_png = saved_as(tmp_path / "really_a_jpeg.png", "JPEG", Image.new("RGB", (64, 64), (0, 0, 250)))
    frames = [Image.new("RGB", (64, 64), color) for color in [(0, 250, 0), (250, 0, 0)]]
    gif_as_jpg = tmp_path / "really_a_gif.jpg"
    frames[0].save(gif_as_jpg, "GIF", save_all=True, append_images=frames[1:], duration=50)
    files = [cmyk, rotated, palette, jpeg_as_png, gif_as_jpg]
    out = small(text=prompt(len(files)), images=files)
    pv = (out["pixel_values"] * 255).round()
    assert pv.shape == (5, 3, SIZE, SIZE)
    assert int((out["input_ids"] == small.image_token_id).sum()) == 5 * TOKENS

    def close(region: torch.Tensor, color, tol: int = 4) -> bool:
        return bool(((region - torch.tensor(color).view(3, 1, 1)).abs() <= tol).all())

    assert close(pv[0], (255, 0, 0))  # CMYK (0, 255, 255, 0) is red
    left = (SIZE - int(40 / 60 * SIZE)) // 2  # upright: 40 wide, 60 high -> padded left and right
    assert close(pv[1, :, :, :left], CLIP_BG, 0) and close(pv[1, :, 4:-4, left + 4 : SIZE - left - 4], (200, 30, 30))
    # transparency dropped as the official convert("RGB") does: the transparent index shows its own colour
    assert close(pv[2, :, :, :32], (0, 255, 0), 0) and close(pv[2, :, :, 32:], (0, 0, 255), 0)
    assert close(pv[3], (0, 0, 250))
    assert close(pv[4], (0, 250, 0), 0)


def flipped_byte(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF
    return bytes(damaged)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


BROKEN_FILES = {
    "damaged.png": (lambda: flipped_byte(encoded(make_image(64, 48), "PNG")), "it cannot be decoded, the data is truncated or corrupt"),
    "cut.gif": (lambda: encoded(make_image(64, 48).convert("P"), "GIF")[:100], "it is not an image PIL can read"),
    "header_only.jpg": (lambda: encoded(make_image(64, 48), "JPEG")[:20], "it is not an image PIL can read"),
    "error_page.jpg": (lambda: b"<html><body>404 Not Found</body></html>", "it is not an image PIL can read"),
    "drawing.svg": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "it is not an image PIL can read"),
    "signature_only.png": (lambda: b"\x89PNG\r\n\x1a\n", "it is not an image PIL can read"),
    "empty.webp": (lambda: b"", "the file is empty"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_FILES))
def test_broken_files_are_named_by_flat_index_and_path(small, tmp_path, name):
    """Nested per text, the error counts images over the whole call: the broken one is image 2."""
    make, reason = BROKEN_FILES[name]
    path = tmp_path / name
    path.write_bytes(make())
    good = make_image(30, 20)
    with pytest.raises(ImageInputError, match=rf"^image 2 \({re.escape(str(path))}\): {reason}") as info:
        small(text=[prompt(1), prompt(2)], images=[[good], [good, path]])
    assert info.value.index == 2 and info.value.path == str(path)


def test_bitflipped_jpeg_still_decodes(small, tmp_path):
    """JPEG has no checksum: a flipped byte in the entropy-coded data gives a (damaged) picture, not an error."""
    path = tmp_path / "flipped.jpg"
    path.write_bytes(flipped_byte(encoded(make_image(64, 48), "JPEG")))
    pv = small(text=prompt(1), images=[path])["pixel_values"]
    assert pv.shape == (1, 3, SIZE, SIZE) and bool(torch.isfinite(pv).all())


# --- property test: prompts x images through the processor ----------------------------------------------------

PIECES = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["<image_", "placeholder>", "<", ">", BOS, EOS, "User:", "\n\n", " ", "图片"]),
)
MODES = ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1", "F"]


@st.composite
def texts_with_placeholders(draw) -> str:
    """Random text around 0-3 placeholders; pieces such as "<image_" + "placeholder>" may form more."""
    n = draw(st.integers(0, 3))
    return IMAGE_TOKEN.join("".join(draw(st.lists(PIECES, max_size=3))) for _ in range(n + 1))


@st.composite
def any_image(draw):
    """A small PIL image of a random mode, a uint8 array or tensor, or bytes that are not an image."""
    width, height = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    kind = draw(st.sampled_from([*MODES, "numpy", "tensor", "not an image"]))
    if kind == "numpy":
        return np.full((height, width, 3), draw(st.integers(0, 255)), np.uint8)
    if kind == "tensor":
        return torch.rand(3, height, width)
    if kind == "not an image":
        return b"GIF89a but not really"
    return Image.new(kind, (width, height))


def run_length_multiples(row: list[int], token: int) -> bool:
    """Every run of image tokens is a whole number of images."""
    runs = [len(m.group()) for m in re.finditer(r"1+", "".join("1" if t == token else "0" for t in row))]
    return all(run % TOKENS == 0 for run in runs)


@settings(
    max_examples=150, deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fuzz_prompts_and_images(small, data):
    """Either a correct batch or a ProcessorInputError/ImageInputError with a message; nothing else."""
    draw = data.draw
    texts = [draw(texts_with_placeholders()) for _ in range(draw(st.integers(1, 3)))]
    counts = [text.count(IMAGE_TOKEN) for text in texts]
    per_text = [[draw(any_image()) for _ in range(count)] for count in counts]
    change = draw(st.sampled_from([0, 0, 0, -1, 1]))  # mostly matching; sometimes one image too few or many
    row = draw(st.integers(0, len(texts) - 1))
    if change < 0 and per_text[row]:
        per_text[row].pop()
    elif change > 0:
        per_text[row].append(draw(any_image()))
    nested = draw(st.booleans())
    flat = [image for images in per_text for image in images]
    images = per_text if nested else (flat or draw(st.sampled_from([None, []])))
    text = texts[0] if len(texts) == 1 and draw(st.booleans()) else texts
    max_length, truncation = draw(st.sampled_from([(None, False), (None, True), (12, False), (12, True), (40, True)]))
    mismatch = [len(images) for images in per_text] != counts
    bad = [i for i, image in enumerate(flat) if isinstance(image, bytes)]
    try:
        out = small(text=text, images=images, max_length=max_length, truncation=truncation)
    except ProcessorInputError as err:
        event("rejected: placeholders and images do not match" if mismatch else "rejected: too long")
        if mismatch:
            assert re.search(r"placeholder\(s\)", str(err)), str(err)
        else:
            assert max_length and not truncation and re.search(r"tokens long .* over max_length=12", str(err))
            stand_ins = [[make_image(1, 1)] * len(images) for images in per_text]
            assert int(small(text=text, images=stand_ins)["attention_mask"].sum(1).max()) > max_length
        return
    except ImageInputError as err:
        event("rejected: not an image")
        assert not mismatch and bad and re.match(r"image \d+: it is not an image PIL can read", str(err))
        assert truncation or err.index == bad[0]  # truncation drops images, which renumbers the rest
        return
    assert not mismatch and (truncation or not bad)
    event(f"processed: {'nested' if nested else 'flat'} images, truncation {'on' if truncation else 'off'}")
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == len(texts)
    image_id = small.image_token_id
    n_image_tokens = 0
    for r in range(len(texts)):
        pad = int((mask[r] == 0).sum())
        assert mask[r, :pad].sum() == 0 and bool(mask[r, pad:].all())  # left padding, then one block of ones
        assert bool((ids[r, :pad] == small.pad_token_id).all()) and int(ids[r, pad]) == small.tokenizer.bos_token_id
        tokens = ids[r, pad:].tolist()
        assert max_length is None or len(tokens) <= max_length
        assert run_length_multiples(tokens, image_id)  # truncation never cuts through an image
        count = tokens.count(image_id)
        assert count == counts[r] * TOKENS if not truncation else count <= counts[r] * TOKENS
        n_image_tokens += count
    n_images = n_image_tokens // TOKENS
    if n_images:
        pv = out["pixel_values"]
        assert pv.shape == (n_images, 3, SIZE, SIZE) and bool(torch.isfinite(pv).all())
        assert float(pv.min()) >= 0 and float(pv.max()) <= 1
    else:
        assert "pixel_values" not in out


# --- prompts ------------------------------------------------------------------------------------------------


def test_placeholder_count_is_checked_per_text_for_flat_images(small):
    with pytest.raises(ProcessorInputError, match=r"has 3 <image_placeholder> placeholder\(s\) \(per text: \[1, 2\]\) but 2"):
        small(text=[prompt(1), prompt(2)], images=[make_image(8, 8)] * 2)
    with pytest.raises(ProcessorInputError, match="nested per text but has 1 lists for 2 texts"):
        small(text=[prompt(1), prompt(1)], images=[[make_image(8, 8)]])


@pytest.mark.parametrize(
    ("messages", "error", "message"),
    [
        ([], ProcessorInputError, "the conversation is empty"),
        ([{"role": "user", "content": 5}], TemplateError, "message 0 has content that is neither a string nor a list"),
        ([{"role": "user", "content": {"type": "text", "text": "hi"}}], TemplateError, "neither a string nor a list"),
        ([{"role": "user", "content": [{"type": "text"}]}], TemplateError, "message 0 has a text part without a text"),
        ([{"content": "hi"}], TemplateError, "message 0 has unknown role : use system, user or assistant"),
        ([{"role": "tool", "content": "42"}], TemplateError, "message 0 has unknown role tool"),
        ([{"role": "system", "content": f"Look: {IMAGE_TOKEN}"}, {"role": "user", "content": "hi"}],
         TemplateError, r"message 0 \(system\) contains <image_placeholder>: images go in user messages only"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "image"}]}],
         TemplateError, r"message 1 \(assistant\) holds an image"),
    ],
)
def test_malformed_chats_are_clear_errors(small, messages, error, message):
    with pytest.raises(error, match=message):
        small.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_empty_messages_render_as_in_deepseek_vl(small):
    """An empty user turn renders as "User:" (the official format's empty-message form), with no error."""
    rendered = small.apply_chat_template([{"role": "user", "content": ""}], tokenize=False)
    assert rendered.endswith("\n\nUser:")
    assert small(text="")["input_ids"].tolist() == [[small.tokenizer.bos_token_id]]


def test_model_max_length_is_the_default_limit(tiny_pair):
    """Without max_length, the tokenizer's model_max_length (the LLM context here) is the limit; truncation=True
    cuts at it, before an image that would not fit whole."""
    model, processor = tiny_pair
    limit = model.config.text_config.max_position_embeddings
    assert processor.tokenizer.model_max_length == limit == 1024
    long_text = "one two three " * 400 + IMAGE_TOKEN
    with pytest.raises(
        ProcessorInputError,
        match=r"text 0 is \d+ tokens long \(images expanded\), over the tokenizer's model_max_length=1024; "
        r"shorten it or pass truncation=True",
    ):
        processor(text=long_text, images=[make_image(8, 8)])
    cut = processor(text=long_text, images=[make_image(8, 8)], truncation=True)
    assert cut["input_ids"].shape[1] == limit and "pixel_values" not in cut  # the image would not fit whole
    assert processor(text=long_text, images=[make_image(8, 8)], max_length=5000)["input_ids"].shape[1] > limit


def test_no_limit_when_model_max_length_is_unset(small):
    """transformers marks "no limit" with a huge model_max_length; then only max_length limits."""
    tokenizer = small.tokenizer
    saved = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e30)
    try:
        assert small(text="a b " * 2000)["input_ids"].shape[1] > 1024
    finally:
        tokenizer.model_max_length = saved


def test_model_refuses_sequences_over_its_context(tiny_pair):
    model, _ = tiny_pair
    ids = torch.full((1, 1025), 5)
    with pytest.raises(
        ValueError, match=r"1025 tokens \(0 cached \+ 1025 new\), over the model's context length 1024 \(max_position_embeddings"
    ):
        model(input_ids=ids)
    prompt_ids = torch.full((1, 1020), 5)
    with pytest.raises(ValueError, match=r"1025 tokens \(1024 cached \+ 1 new\)"):
        model.generate(
            input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=8, min_new_tokens=8,
            do_sample=False,
        )
    exactly_full = model.generate(
        input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=4, min_new_tokens=4,
        do_sample=False,
    )
    assert exactly_full.shape[1] == 1024


# --- checkpoints --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_dir(tiny_pair, tmp_path_factory) -> Path:
    model, processor = tiny_pair
    return save_checkpoint(model, processor, tmp_path_factory.mktemp("sharded") / "tiny", max_shard_size="1MB")


def copy_of(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "ckpt"))


def rewrite(path: Path, edit) -> None:
    """Load a safetensors file, let `edit` change the dict, write it back."""
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00garbage"
    path.write_bytes(bytes(data))


def huge_header_length(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    path.write_bytes(bytes(data))


def narrow_adapter(tensors: dict) -> None:
    tensors["model.aligner.layers.1.weight"] = tensors["model.aligner.layers.1.weight"][:, :64].contiguous()


SINGLE_FILE_FAULTS = {
    "truncated": (cut_in_half, r"model\.safetensors: the file is truncated \(\d+ bytes, its header needs \d+\); "
                  r"tensors cut off: model\.language_model\..*; re-download or re-convert the checkpoint"),
    "corrupt header": (garble_header, r"model\.safetensors: the safetensors header is corrupt \(JSONDecodeError"),
    "corrupt header length": (huge_header_length, r"model\.safetensors: the file is truncated or corrupt"),
    "only 5 bytes": (lambda p: p.write_bytes(b"\x00" * 5), r"model\.safetensors: the file is truncated or corrupt"),
    "wrong shape": (
        lambda p: rewrite(p, narrow_adapter),
        r"1 tensor shape\(s\) do not match: model\.aligner\.layers\.1\.weight is \[128, 64\] in .*model\.safetensors, "
        r"config\.json implies \[128, 128\]; check that config\.json belongs to these weights",
    ),
}


@pytest.mark.parametrize("fault", sorted(SINGLE_FILE_FAULTS))
def test_damaged_single_file_checkpoint(tiny_dir, tmp_path, fault):
    damage, message = SINGLE_FILE_FAULTS[fault]
    folder = copy_of(tiny_dir, tmp_path)
    damage(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        DeepseekVLHFForCausalLM.from_pretrained(folder)


def drop_second_shard(folder: Path) -> None:
    (folder / "model-00002-of-00005.safetensors").unlink()


def move_a_key_to_another_shard(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = next(k for k, shard in index["weight_map"].items() if shard == "model-00001-of-00005.safetensors")
    index["weight_map"][key] = "model-00003-of-00005.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


SHARDED_FAULTS = {
    "missing shard": (
        drop_second_shard,
        r"ckpt: shard\(s\) model-00002-of-00005\.safetensors named in model\.safetensors\.index\.json are missing "
        r"\(they hold model\..*\); the download or conversion is incomplete",
    ),
    "index disagrees with shard": (
        move_a_key_to_another_shard,
        r"model-00003-of-00005\.safetensors: model\.safetensors\.index\.json places model\..* in this shard but it "
        r"does not hold them",
    ),
    "corrupt index": (
        lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": '),
        r"model\.safetensors\.index\.json: the index is corrupt \(JSONDecodeError",
    ),
    "truncated shard": (
        lambda f: cut_in_half(f / "model-00004-of-00005.safetensors"),
        r"model-00004-of-00005\.safetensors: the file is truncated",
    ),
}


@pytest.mark.parametrize("fault", sorted(SHARDED_FAULTS))
def test_damaged_sharded_checkpoint(sharded_dir, tmp_path, fault):
    damage, message = SHARDED_FAULTS[fault]
    folder = copy_of(sharded_dir, tmp_path)
    assert len(list(folder.glob("model-*.safetensors"))) == 5
    damage(folder)
    with pytest.raises(CheckpointError, match=message):
        DeepseekVLHFForCausalLM.from_pretrained(folder)


def test_newer_format_version_is_refused(tiny_dir, tmp_path):
    folder = copy_of(tiny_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["format_version"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config has format_version 2, but this code reads format versions up to 1"):
        DeepseekVLHFForCausalLM.from_pretrained(folder)


def test_good_checkpoints_load_and_the_check_follows_the_class(tiny_pair, tiny_dir, sharded_dir, tmp_path):
    """Sharded and single-file folders load; the base model loads from a full checkpoint (head left out) and
    checks its own keys; ignore_mismatched_sizes=True is honoured."""
    model, _ = tiny_pair
    reference = model.state_dict()
    for folder in (tiny_dir, sharded_dir):
        loaded = DeepseekVLHFForCausalLM.from_pretrained(folder)
        assert all(torch.equal(reference[k], v) for k, v in loaded.state_dict().items())
    assert isinstance(DeepseekVLHFModel.from_pretrained(tiny_dir), DeepseekVLHFModel)
    folder = copy_of(tiny_dir, tmp_path)
    rewrite(folder / "model.safetensors", narrow_adapter)
    loaded = DeepseekVLHFForCausalLM.from_pretrained(folder, ignore_mismatched_sizes=True)
    assert loaded.model.aligner.layers[1].weight.shape == (128, 128)


def header_only_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A bf16 safetensors file with a real header and sparse (unwritten) data: real size, no disk used."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * int(np.prod(shape, dtype=np.int64))
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def test_check_reads_only_headers_at_7b_size(tmp_path):
    """The pre-load check of a 7B-shape checkpoint (~14 GB) takes well under a second of reading."""
    config = preset_config("7b")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in DeepseekVLHFForCausalLM(config).state_dict().items()}
    path = tmp_path / "model.safetensors"
    header_only_safetensors(path, shapes)
    if os.stat(path).st_blocks * 512 > 2**24:
        pytest.skip("this filesystem has no sparse files")
    assert os.path.getsize(path) > 13 * 10**9
    start = time.perf_counter()
    DeepseekVLHFForCausalLM.check_checkpoint(tmp_path, config)
    assert time.perf_counter() - start < 5
    shapes["lm_head.weight"] = (100, 4096)
    header_only_safetensors(path, shapes)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight is \[100, 4096\] .* implies \[102400, 4096\]"):
        DeepseekVLHFForCausalLM.check_checkpoint(tmp_path, config)


REMOTE_LOAD = r"""
import json, sys, transformers
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    print(json.dumps({"version": transformers.__version__, "error": None}))
except Exception as err:
    print(json.dumps({"version": transformers.__version__, "error": type(err).__name__, "message": str(err)}))
"""


@pytest.mark.parametrize("version", ["5", pytest.param("4.57", marks=pytest.mark.compat)])
def test_remote_code_checks_through_the_auto_class(tiny_dir, tmp_path, version):
    """Hub users get the same CheckpointError through AutoModelForCausalLM on both transformers versions."""
    folder = copy_of(tiny_dir, tmp_path)
    cut_in_half(folder / "model.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    if version == "4.57":
        env["PYTHONPATH"] = compat_pythonpath()
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(folder)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["version"].startswith(version)
    assert report["error"] == "CheckpointError"
    assert report["message"].startswith(f"{folder / 'model.safetensors'}: the file is truncated")


# --- an interrupted write -----------------------------------------------------------------------------------

KILLED_WRITER = r"""
import os, sys, time
from deepseek_vl_hf.checkpoint import build_random_model, save_checkpoint
from deepseek_vl_hf.processing.processing_deepseek_vl_hf import DeepseekVLHFProcessor

target, ready = sys.argv[1], sys.argv[2]


def stalled_save(self, save_directory, *args, **kwargs):
    with open(ready + ".part", "w") as f:  # the weights are written, the processor files are not
        f.write(str(save_directory))
    os.replace(ready + ".part", ready)
    time.sleep(600)


DeepseekVLHFProcessor.save_pretrained = stalled_save
model, processor = build_random_model("tiny", seed=1)
save_checkpoint(model, processor, target, overwrite=True)
"""


def logits_of(folder: Path) -> torch.Tensor:
    model = DeepseekVLHFForCausalLM.from_pretrained(folder).eval()
    processor = DeepseekVLHFProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(text=prompt(1), images=[make_image(40, 30)])
    with torch.no_grad():
        return model(**inputs).logits


def test_killed_writer_loses_nothing(tiny_pair, tmp_path):
    """SIGKILL while save_checkpoint overwrites a good folder: the old checkpoint stays whole under its name;
    only a hidden `.ckpt.tmp-*` folder, without the processor files, is left beside it."""
    model, processor = tiny_pair
    target = save_checkpoint(model, processor, tmp_path / "ckpt")
    before = logits_of(target)
    ready = tmp_path / "ready"
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(target), str(ready)], cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert writer.poll() is None, writer.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the writer never reached the processor files"
            time.sleep(0.1)
    finally:
        writer.kill()
        writer.communicate(timeout=60)
    assert writer.returncode == -signal.SIGKILL
    partial = Path(ready.read_text())
    assert partial.parent == tmp_path and partial.name.startswith(".ckpt.tmp-")
    assert (partial / "model.safetensors").is_file() and not (partial / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([partial.name, "ckpt", "ready"])
    assert torch.equal(logits_of(target), before)
    with pytest.raises(OSError, match=r"Can't load image processor .* preprocessor_config\.json"):
        DeepseekVLHFProcessor.from_pretrained(partial, trust_remote_code=True)
    save_checkpoint(model, processor, target, overwrite=True)  # the leftover does not block the next write
    assert torch.equal(logits_of(target), before)


# --- issue 15: CI must not turn the 4.57 run into a skip; no debug leftovers; stage-2 grouping default ---------


def test_compat_overlay_that_cannot_install_fails_in_ci(monkeypatch, tmp_path):
    """An overlay pip cannot install is a failure naming pip's reason under CI=true, a skip elsewhere."""
    import tests.compat as compat

    monkeypatch.setattr(compat, "COMPAT_PACKAGES", ["transformers==4.57.6 impossible-version"])
    monkeypatch.setenv("DSVL_COMPAT_DIR", str(tmp_path / "overlay"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)could not install the transformers 4\.57 overlay.*"
                       r"Invalid requirement.*required in CI \(CI=true\)"):
        compat.compat_pythonpath()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="could not install the transformers 4.57 overlay"):
        compat.compat_pythonpath()
    assert not (tmp_path / "overlay" / ".complete").exists()


def test_no_debug_prints_left_in_the_code():
    """No debug-print leftovers (a print of a line starting with DBG) in the package, the tests or the tools."""
    repo = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"""print\(\s*f?['"]DBG""")
    files = [p for top in ("src", "tests", "modeling", "processing", "conversion", "bench") for p in (repo / top).rglob("*.py")]
    assert any(p.name == "fsdp_worker.py" for p in files)
    leftovers = [f"{p.relative_to(repo)}:{n}" for p in files
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert leftovers == []


def test_stage2_groups_by_modality_unless_the_recipe_says_otherwise(tmp_path):
    from deepseek_vl_hf.training import RecipeError, load_recipe

    repo = Path(__file__).resolve().parents[1]
    recipe = tmp_path / "stage.yaml"
    tree = (repo / "recipes" / "tiny" / "stage2.yaml").read_text().replace("group_by_modality: true", "")
    assert "group_by_modality:" not in tree
    recipe.write_text(tree)
    assert load_recipe(recipe).data.group_by_modality is True
    assert load_recipe(recipe, {"stage": 3}).data.group_by_modality is False
    assert load_recipe(recipe, {"stage": 1}).data.group_by_modality is False
    assert load_recipe(recipe, {"data.group_by_modality": False}).data.group_by_modality is False
    assert load_recipe(recipe).to_dict()["data"]["group_by_modality"] is True  # what the metadata records
    workers = {"train.dataloader_num_workers": 2, "train.gradient_accumulation_steps": 2}
    with pytest.raises(RecipeError, match=r"data\.group_by_modality \(on by default in stage 2\) cannot apply with "
                       r"train\.dataloader_num_workers=2 and gradient_accumulation_steps=2.*group_by_modality=false"):
        load_recipe(recipe, workers)
    with pytest.raises(RecipeError, match=r"\(set in the recipe\) cannot apply"):
        load_recipe(recipe, {**workers, "stage": 3, "data.group_by_modality": True})
    assert load_recipe(recipe, {**workers, "data.group_by_modality": False}).data.group_by_modality is False


# --- issue 15 item 2: a writer killed between its two renames; fsync before the rename ---------------------

PAUSED_WRITER = r"""
import sys
from deepseek_vl_hf.checkpoint import build_random_model, save_checkpoint

model, processor = build_random_model("tiny", seed=1)
save_checkpoint(model, processor, sys.argv[1], overwrite=True)
"""


def kill_when_paused(command: list[str], point: str, cwd: Path, log_dir: Path | None = None, timeout: float = 240) -> str:
    """Run `command` in `cwd` with the test pause at `point`, SIGKILL it once it says it is there; return its output
    (logged in `log_dir`, default `cwd`)."""
    env = {**os.environ, "DEEPSEEK_VL_HF_TEST_PAUSE": point, "OMP_NUM_THREADS": "2"}
    log = (log_dir or cwd) / f"killed-{time.monotonic_ns()}.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while f"paused at {point}" not in log.read_text():
                assert proc.poll() is None, f"exited {proc.returncode} before {point}:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"never reached {point}:\n{log.read_text()[-3000:]}"
                time.sleep(0.05)
        finally:
            proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return log.read_text()


def test_writer_killed_between_renames_is_recovered_by_the_next_reader_and_writer(tiny_pair, tmp_path):
    from deepseek_vl_hf.commands.common import load_model_and_processor

    model, processor = tiny_pair
    target = save_checkpoint(model, processor, tmp_path / "ckpt")
    before = logits_of(target)
    kill_when_paused([sys.executable, "-c", PAUSED_WRITER, str(target)], "between-renames ckpt", tmp_path)
    (aside,) = tmp_path.glob(".ckpt.old-*")  # the window: no folder under the name, the old one aside
    assert not target.exists()
    loaded, _ = load_model_and_processor(str(target))  # a reader moves it back
    assert target.is_dir() and not list(tmp_path.glob(".ckpt.old-*"))
    assert torch.equal(logits_of(target), before)
    del loaded

    os.replace(target, aside)  # the same window again; now the next writer finds it first
    with pytest.raises(FileExistsError, match="already exists"):
        save_checkpoint(model, processor, target)
    assert torch.equal(logits_of(target), before) and not list(tmp_path.glob(".ckpt.old-*"))
    live = tmp_path / f".ckpt.old-{os.getppid()}"  # a writer that still runs is left alone
    shutil.copytree(target, live)
    save_checkpoint(model, processor, target, overwrite=True)
    assert live.is_dir() and not list(tmp_path.glob(".ckpt.tmp-*"))


def test_files_and_folders_are_fsynced_before_the_rename(tiny_pair, tmp_path, monkeypatch):
    from deepseek_vl_hf import atomic

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("replace", str(src))), real_replace(src, dst))[1])
    model, processor = tiny_pair
    with atomic.atomic_directory(tmp_path / "out") as tmp:
        save_checkpoint(model, processor, tmp / "inner")
        (tmp / "note.txt").write_text("x")
    tmp = str(tmp)
    rename = events.index(("replace", tmp))
    synced = {path for kind, path in events[:rename] if kind == "fsync"}
    written = {str(p).replace(str(tmp_path / "out"), tmp, 1) for p in (tmp_path / "out").rglob("*")}
    assert written and written | {tmp} <= synced
    assert ("fsync", str(tmp_path)) in events[rename:]  # the rename itself is made durable


# --- issue 15 item 4: a failed chat turn leaves the session as it was ------------------------------------------

CONTEXT_ERROR = r"over the model's context length"


def filler(session, images: int, room: int) -> str:
    """A user message that, with the session's history and `images` new images, leaves about `room` tokens of the
    model's 1024-token context free (the tiny tokenizer spends a fixed number of tokens per repeated word)."""
    from deepseek_vl_hf.chat import user_content

    def length(words: int) -> int:
        messages = [*session.messages, {"role": "user", "content": user_content("w " * words, images)}]
        prompt = session.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        pictures = [make_image(8, 8)] * (len(session.images) + images)
        return len(session.processor(text=prompt, images=pictures or None)["input_ids"][0])

    base, per_word = length(0), (length(40) - length(0)) / 40
    words = int((1024 - room - base) / per_word)
    assert 1024 - 2 * room <= length(words) <= 1024 - 1
    return "w " * words


def test_failed_chat_turn_leaves_the_session_as_before(tiny_pair):
    """A turn that runs past the context during generation (and one over it already in the prompt) leaves the
    messages and images untouched, so the next turn answers exactly as if the failed one never happened."""
    from deepseek_vl_hf.chat import ChatSession

    model, processor = tiny_pair
    first, later = make_image(40, 30), make_image(30, 40)
    session = ChatSession(model, processor)
    "".join(session.stream_reply("What is this?", [first], max_new_tokens=3, do_sample=False))
    before_messages, before_images, before_prompt = json.dumps(session.messages), list(session.images), session.prompt()

    with pytest.raises(ValueError, match=CONTEXT_ERROR):  # generation runs past the 1024-token context
        "".join(session.stream_reply(filler(session, 1, 10), [later], max_new_tokens=30, min_new_tokens=30,
                                     do_sample=False))
    assert json.dumps(session.messages) == before_messages and session.images == before_images
    assert session.prompt() == before_prompt
    with pytest.raises(ValueError, match="model_max_length"):  # over the context before generating
        "".join(session.stream_reply("w " * 2000, [later], max_new_tokens=3))
    assert json.dumps(session.messages) == before_messages and session.images == before_images
    abandoned = session.stream_reply("Stop me.", [later], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    next(abandoned)
    abandoned.close()  # a client that leaves mid-answer
    assert json.dumps(session.messages) == before_messages and session.images == before_images

    answer = "".join(session.stream_reply("And this one?", [later], max_new_tokens=6, do_sample=False))
    clean = ChatSession(model, processor)
    "".join(clean.stream_reply("What is this?", [first], max_new_tokens=3, do_sample=False))
    assert answer == "".join(clean.stream_reply("And this one?", [later], max_new_tokens=6, do_sample=False))
    assert json.dumps(session.messages) == json.dumps(clean.messages)


def test_cli_and_web_chat_keep_going_after_a_context_length_error(tiny_dir, monkeypatch, capsys, tmp_path):
    import argparse
    import builtins

    import deepseek_vl_hf.chat as chat_module
    from deepseek_vl_hf.chat import ChatSession
    from deepseek_vl_hf.commands import chat as chat_command
    from deepseek_vl_hf.commands.common import load_model_and_processor
    from deepseek_vl_hf.serve import stream_turn

    model, processor = load_model_and_processor(str(tiny_dir))
    image = tmp_path / "a.png"
    make_image(40, 30).save(image)
    probe = ChatSession(model, processor)
    long_message = filler(probe, 1, 10)
    reference = "".join(probe.stream_reply("Hi", [str(image)], max_new_tokens=5, min_new_tokens=5, do_sample=False))

    # web chat: the error is shown, the session (kept in the page's state) is unchanged and serves the next turn
    session = ChatSession(model, processor)
    displays = list(stream_turn(session, long_message, [str(image)], [], max_new_tokens=30, min_new_tokens=30,
                                do_sample=False))
    assert displays[-1][-1]["metadata"] == {"title": "Error"} and re.search(CONTEXT_ERROR, displays[-1][-1]["content"])
    assert session.messages == [] and session.images == []
    displays = list(stream_turn(session, "Hi", [str(image)], displays[-1], max_new_tokens=5, min_new_tokens=5,
                                do_sample=False))
    assert displays[-1][-1]["content"] == reference

    # CLI chat: every answer is forced to its full length, so the long message overflows during generation
    real_kwargs = chat_module.generation_kwargs
    monkeypatch.setattr(chat_module, "generation_kwargs",
                        lambda max_new_tokens, *a: {**real_kwargs(max_new_tokens, *a), "min_new_tokens": max_new_tokens})
    lines = iter([f"/image {image}", long_message, f"/image {image}", "Hi", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    monkeypatch.setattr(chat_command, "load_model_and_processor", lambda *a: (model, processor))
    parser = argparse.ArgumentParser()
    chat_command.register(parser.add_subparsers(dest="command", required=True))
    chat_command.run(parser.parse_args(["chat", "--model", str(tiny_dir), "--max-new-tokens", "30"]))
    out, err = capsys.readouterr()
    assert re.search(CONTEXT_ERROR, err)
    assert out.splitlines()[-1].startswith("Assistant: ")
    assert out.splitlines()[-1][len("Assistant: "):].startswith(reference)


# --- issue 15 item 9: explicit device placement in the SAM encoder ------------------------------------------


def test_sam_encoder_parameters_follow_the_activations_device():
    """A split across two devices, on a CPU machine: the encoder's blocks, neck and convs on `meta` (shape-only
    execution), its own pos_embed and hd_alpha_downsamples left on the CPU. The forward runs on `meta` only when
    those two are moved to the activations' device explicitly. (A split over two GPUs was not run: no GPU lent.)"""
    from deepseek_vl_hf.checkpoint import build_random_model

    sam = build_random_model("tiny", seed=0)[0].model.vision_model.sam
    own = sam.pos_embed, sam.hd_alpha_downsamples
    sam.to("meta")
    sam.pos_embed, sam.hd_alpha_downsamples = own
    assert sam.pos_embed.device.type == "cpu" and sam.blocks[0].mlp.fc1.weight.device.type == "meta"
    pixels = torch.empty(2, 3, sam.config.image_size, sam.config.image_size, device="meta")
    out = sam(pixels)
    assert out.device.type == "meta" and out.shape == (2, sam.output_grid**2, sam.config.downsample_channels[-1])


SAM, SIGLIP = "model.vision_model.sam", "model.vision_model.siglip"
ON_CPU = {
    f"{SAM}.patch_embed": "cpu", f"{SAM}.pos_embed": "cpu", f"{SAM}.hd_alpha_downsamples": "cpu",
    f"{SAM}.blocks.0": "cpu", f"{SAM}.blocks.1": "cpu", f"{SAM}.neck": "cpu", f"{SAM}.neck_hd": "cpu",
    f"{SAM}.downsamples": "cpu", f"{SIGLIP}.patch_embed": "cpu", f"{SIGLIP}.pos_embed": "cpu",
    f"{SIGLIP}.blocks.0": "cpu", f"{SIGLIP}.blocks.1": "cpu", f"{SIGLIP}.norm": "cpu", "model.aligner": "cpu",
    "model.language_model": "cpu", "lm_head": "cpu",
}


@pytest.mark.parametrize("on_disk", [
    [f"{SAM}.neck", f"{SAM}.downsamples", f"{SIGLIP}.blocks.1"],
    [f"{SAM}.blocks.0"],  # a whole SAM block: its attention reads its own parameters inside its forward
    [SIGLIP],  # the whole SigLIP encoder, called through its hooks
])
def test_vision_tower_partly_offloaded_to_disk_gives_the_same_logits(tmp_path, on_disk):
    """A device_map with parts of the SAM and SigLIP towers on disk (accelerate's hooks load their weights at
    forward time from offload_folder): the same logits as the plain model, bit for bit."""
    from deepseek_vl_hf.checkpoint import build_random_model

    model, processor = build_random_model("tiny", seed=0)
    with torch.no_grad():
        model.model.vision_model.sam.hd_alpha_downsamples.fill_(0.5)  # the HD branch contributes
    folder = save_checkpoint(model, processor, tmp_path / "model")
    kept = {k: v for k, v in ON_CPU.items() if not any(k.startswith(d + ".") for d in on_disk)}
    device_map = {**kept, **dict.fromkeys(on_disk, "disk")}
    offloaded = DeepseekVLHFForCausalLM.from_pretrained(folder, device_map=device_map,
                                                        offload_folder=str(tmp_path / "offload")).eval()
    first = offloaded.get_submodule(on_disk[0])
    leaf = next(m for m in first.modules() if getattr(getattr(m, "_hf_hook", None), "offload", False))
    assert all(p.device.type == "meta" for p in leaf.parameters(recurse=False))  # on disk until used
    plain = DeepseekVLHFForCausalLM.from_pretrained(folder).eval()
    inputs = processor(text=prompt(1), images=[make_image(40, 30)], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(offloaded(**inputs).logits, plain(**inputs).logits)
