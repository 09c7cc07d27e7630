"""DeepSeek-VL image processor: resize the longest side to `image_size`, pad to a square, rescale to [0, 1].

This follows DeepSeek-VL's preprocessing (PIL's `convert("RGB")`, PIL bicubic resize, the long side to
`image_size` and the short side truncated with `int`, at least `min_size`; paste centred on a square canvas of
the background colour; multiply by `rescale_factor`). The released processors do not normalise: the model
normalises per vision branch.

Hub remote code: imports only the standard library, numpy, PIL, torch and transformers, through their public
APIs; works on transformers 4.57.x and 5.x.
"""

from __future__ import annotations

import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL's default `Image.MAX_IMAGE_PIXELS`, written out: a changed global setting does not move our limit.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
RESAMPLE_BACKENDS = ("pil", "torch")
ALPHA_MODES = ("drop", "composite")
SETTING_NAMES = (
    "image_size",
    "min_size",
    "image_mean",
    "image_std",
    "rescale_factor",
    "do_normalize",
    "background_color",
    "resample_backend",
    "alpha_mode",
    "jpeg_draft",
    "max_image_pixels",
    "num_workers",
)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_EXIF_ORIENTATION = 0x0112


class ImageInputError(ValueError):
    """An image that cannot be used; the message names the image (index, path), the reason and the fix.

    `index` (the position in the flattened list of images of the call) and `path` are also kept as attributes.
    It can be built from the message alone, so that it survives re-raising by data-loader worker processes.
    """

    def __init__(self, message: str, index: int | None = None, path: str | None = None):
        super().__init__(message)
        self.index = index
        self.path = path

    def __reduce__(self):
        return type(self), (str(self), self.index, self.path)


def _error(index: int, path: str | None, reason: str, hint: str) -> ImageInputError:
    where = f"image {index}" if path is None else f"image {index} ({path})"
    return ImageInputError(f"{where}: {reason}; {hint}", index=index, path=path)


def default_background_color(image_mean: tuple[float, ...]) -> tuple[int, int, int]:
    """DeepSeek-VL's padding colour: the mean as truncated 8-bit values (CLIP mean -> (122, 116, 104))."""
    return tuple(int(m * 255) for m in image_mean)


DEFAULT_BACKGROUND = default_background_color(CLIP_MEAN)


def resized_size(height: int, width: int, image_size: int, min_size: int) -> tuple[int, int]:
    """(height, width) after scaling the longest side to `image_size`, truncating, clamping to `min_size`.

    The expression and its order of operations are DeepSeek-VL's, so that the sizes agree to the pixel.
    """
    longest = max(height, width)
    return (
        max(int(height / longest * image_size), min_size),
        max(int(width / longest * image_size), min_size),
    )


# ------------------------------------------------------------------------------------------------------------
# Loading: every accepted input becomes an RGB PIL image or a uint8 CHW tensor, or an ImageInputError.
# ------------------------------------------------------------------------------------------------------------


def _u16_to_u8(values: np.ndarray) -> np.ndarray:
    """16-bit levels to 8-bit by dividing by 257 (65535 -> 255), rounded to nearest."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _int_to_u8(values: np.ndarray) -> np.ndarray:
    """32-bit integer levels to 8-bit, with the bit depth read from the value range (see the class doc)."""
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high <= 255:
        return values.astype(np.uint8)
    if low >= 0 and high <= 65535:
        return _u16_to_u8(values)
    return _stretch_to_u8(values.astype(np.float64), low, high)


def _float_to_u8(values: np.ndarray, index: int, path: str | None) -> np.ndarray:
    """Float levels to 8-bit: [0, 1] is scaled by 255, [0, 255] kept, any other range stretched."""
    if not np.isfinite(values).all():
        raise _error(
            index,
            path,
            "the float (mode F) image holds NaN or infinite values",
            "replace them with finite values before passing the image",
        )
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 1:
        return np.rint(values * 255).astype(np.uint8)
    if low >= 0 and high <= 255:
        return np.rint(values).astype(np.uint8)
    return _stretch_to_u8(values, low, high)


def _stretch_to_u8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _to_rgb(
    image: Image.Image, background: tuple[int, int, int], alpha_mode: str, index: int, path: str | None
) -> Image.Image:
    """Any PIL mode to RGB. Transparency is dropped as the official `convert("RGB")` does (`alpha_mode` "drop"),
    or transparent pixels are composited onto `background` ("composite")."""
    mode = image.mode
    try:
        if mode in _SIXTEEN_BIT_MODES:
            gray = _u16_to_u8(np.asarray(image))
        elif mode == "I":
            gray = _int_to_u8(np.asarray(image))
        elif mode == "F":
            gray = _float_to_u8(np.asarray(image), index, path)
        else:
            gray = None
        if gray is not None:
            return Image.fromarray(gray, "L").convert("RGB")
        if mode == "La":  # premultiplied: PIL converts it only to LA
            image, mode = image.convert("LA"), "LA"
        if alpha_mode == "composite" and (mode in _ALPHA_MODES or "transparency" in image.info):
            canvas = Image.new("RGBA", image.size, (*background, 255))
            canvas.alpha_composite(image.convert("RGBA"))
            return canvas.convert("RGB")
        return image if mode == "RGB" else image.convert("RGB")
    except ImageInputError:
        raise
    except Exception as err:
        raise _error(
            index,
            path,
            f"its colour mode {mode!r} cannot be converted to RGB ({err})",
            "convert it to RGB yourself (e.g. with PIL's Image.convert) before passing it",
        ) from err


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag, so photos taken sideways come out upright; broken EXIF is ignored."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:
        return image
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def _finish(
    image: Image.Image,
    index: int,
    path: str | None,
    background: tuple[int, int, int],
    max_pixels: int | None,
    alpha_mode: str,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Size check (before decoding), decode, EXIF orientation and RGB conversion of an opened PIL image.
    `draft` = (image_size, min_size): a JPEG file is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still
    covers the resized size (PIL's public `Image.draft`)."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise _error(
            index, path, f"the image has no pixels (size {width}x{height})", "pass a non-empty image"
        )
    if max_pixels is not None and width * height > max_pixels:
        raise _error(
            index,
            path,
            f"it is too large: {width}x{height} = {width * height} pixels is over "
            f"max_image_pixels={max_pixels} (decompression-bomb guard)",
            "shrink it beforehand, or, if you trust the file, raise max_image_pixels (None: no limit)",
        )
    if draft is not None and image.format == "JPEG":
        target = resized_size(height, width, *draft)
        image.draft(image.mode, target[::-1])
    try:
        image.load()
    except Exception as err:
        raise _error(
            index,
            path,
            f"it cannot be decoded, the data is truncated or corrupt ({err})",
            "re-create or re-download the file, or leave it out",
        ) from err
    return _to_rgb(_upright(image), background, alpha_mode, index, path)


def _open(
    source: Any,
    index: int,
    path: str | None,
    background: tuple[int, int, int],
    max_pixels: int | None,
    alpha_mode: str,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Open an encoded image (file path or binary stream), keep its first frame and return it as RGB."""
    try:
        image = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _error(
            index,
            path,
            f"it is too large for PIL's own decompression-bomb limit ({err})",
            "if you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS and max_image_pixels",
        ) from err
    except UnidentifiedImageError as err:
        raise _error(
            index,
            path,
            "it is not an image PIL can read (unknown or damaged format)",
            "check that it really is an image file (JPEG, PNG, GIF, WebP, BMP, TIFF, ...)",
        ) from err
    except Exception as err:  # OSError (permissions, I/O) or whatever a format plugin raises on bad headers
        raise _error(
            index,
            path,
            f"it cannot be read ({type(err).__name__}: {err})",
            "check that the file is a readable, undamaged image",
        ) from err
    with image:  # closes the file only: the pixels `_finish` loaded stay usable, no copy needed
        return _finish(image, index, path, background, max_pixels, alpha_mode, draft)


def _open_path(
    image: str | os.PathLike,
    index: int,
    background: tuple[int, int, int],
    max_pixels: int | None,
    alpha_mode: str,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    path = os.fspath(image)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if _URL.match(path):
        raise _error(
            index,
            path,
            "it is a URL, and this processor does not download anything",
            "fetch the image yourself and pass the bytes, a PIL image or a local file path",
        )
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        where = "" if os.path.isabs(path) else f" (relative paths are resolved from {os.getcwd()})"
        raise _error(index, path, "file not found", f"check the path{where}")
    if os.path.isdir(path):
        raise _error(index, path, "it is a directory, not an image file", "pass the path of an image file")
    if not os.path.isfile(path):
        raise _error(
            index,
            path,
            "it is not a regular file (a device, pipe or socket)",
            "pass the path of an image file",
        )
    try:
        empty = os.path.getsize(path) == 0
    except OSError:
        empty = False
    if empty:
        raise _error(
            index,
            path,
            "the file is empty (0 bytes)",
            "it was probably not fully written or downloaded: re-create it or leave it out",
        )
    return _open(path, index, path, background, max_pixels, alpha_mode, draft)


def _numpy_to_torch(array: np.ndarray, index: int) -> torch.Tensor:
    if array.dtype != np.uint8 and array.dtype.kind != "f":
        raise _error(
            index,
            None,
            f"the numpy array has dtype {array.dtype}",
            "use uint8 (0-255) or a float dtype with values in [0, 1]",
        )
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def _tensor_to_chw_uint8(tensor: torch.Tensor, index: int, channels_last: bool, kind: str) -> torch.Tensor:
    """Validate a numpy-derived (HWC) or torch (CHW) image and return it as uint8 [3, H, W] without PIL."""
    layout = "HWC (height, width, channels)" if channels_last else "CHW (channels, height, width)"
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(-1 if channels_last else 0)
    if tensor.ndim != 3:
        raise _error(
            index,
            None,
            f"the {kind} has {tensor.ndim} dimensions (shape {tuple(tensor.shape)})",
            f"pass one image as {layout} or 2-D grayscale, a batch as 4-D, or a list of images",
        )
    if channels_last:
        tensor = tensor.permute(2, 0, 1)
    channels, height, width = tensor.shape
    if channels not in (1, 3):
        raise _error(
            index,
            None,
            f"the {kind} has {channels} channels (shape {tuple(tensor.shape)}, read as {layout})",
            "give 3 (RGB) or 1 (grayscale) channels in that layout; for an image with alpha pass a PIL RGBA "
            "image (alpha_mode decides what happens to transparency)",
        )
    if height == 0 or width == 0:
        raise _error(
            index, None, f"the {kind} is empty (shape {tuple(tensor.shape)})", "pass a non-empty image"
        )
    if tensor.dtype.is_floating_point:
        if not bool(torch.isfinite(tensor).all()):
            raise _error(
                index, None, f"the float {kind} holds NaN or infinite values", "pass finite values in [0, 1]"
            )
        low, high = float(tensor.min()), float(tensor.max())
        if low < 0 or high > 1:
            raise _error(
                index,
                None,
                f"the float {kind} has values in [{low:g}, {high:g}], outside [0, 1]",
                "scale floats to [0, 1], or pass uint8 values 0-255",
            )
        tensor = tensor.to(torch.float64).mul(255).round_().to(torch.uint8)
    elif tensor.dtype != torch.uint8:
        raise _error(
            index,
            None,
            f"the {kind} has dtype {tensor.dtype}",
            "use uint8 (0-255) or a float dtype with values in [0, 1]",
        )
    if channels == 1:
        tensor = tensor.expand(3, height, width)
    return tensor


def _array_to_chw_uint8(image: np.ndarray | torch.Tensor, index: int) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        return _tensor_to_chw_uint8(
            _numpy_to_torch(image, index), index, channels_last=True, kind="numpy array"
        )
    return _tensor_to_chw_uint8(image, index, channels_last=False, kind="tensor")


def load_image(
    image: Any,
    index: int = 0,
    *,
    background_color: tuple[int, int, int] = DEFAULT_BACKGROUND,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    alpha_mode: str = "drop",
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Load one image as an upright RGB PIL image, or raise an `ImageInputError` that says what is wrong.

    Accepts a PIL image, a local file path (str / os.PathLike), encoded bytes, a binary file object, a
    numpy uint8 HWC (or HW) array or a torch CHW (or HW) tensor (uint8, or float in [0, 1]). `index` only
    labels error messages. Transparency is dropped (`alpha_mode` "drop", as the official code) or composited onto
    `background_color` ("composite"); `draft` = (image_size, min_size) decodes JPEG files and bytes at a reduced
    DCT scale that still covers the resized size (faster, not the official pixels); a multi-frame file
    gives its first frame; images over `max_image_pixels` are refused before decoding (None: no limit). An
    RGB PIL image that needs no change is returned as it is (not copied).
    """
    background = _triple("background_color", background_color, int)
    _check_alpha_mode(alpha_mode)
    if isinstance(image, Image.Image):
        return _finish(image, index, None, background, max_image_pixels, alpha_mode)
    if isinstance(image, (str, os.PathLike)):
        return _open_path(image, index, background, max_image_pixels, alpha_mode, draft)
    if isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            raise _error(index, None, "the image bytes are empty", "pass the complete encoded file contents")
        return _open(io.BytesIO(bytes(image)), index, None, background, max_image_pixels, alpha_mode, draft)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        chw = _array_to_chw_uint8(image, index)
        return Image.fromarray(chw.permute(1, 2, 0).contiguous().numpy(), "RGB")
    if hasattr(image, "read"):
        name = getattr(image, "name", None)
        path = name if isinstance(name, str) else None
        return _open(image, index, path, background, max_image_pixels, alpha_mode, draft)
    if image is None:
        raise _error(index, None, "it is None", "pass an image, or leave the entry out")
    raise _error(
        index,
        None,
        f"inputs of type {type(image).__name__} are not supported",
        "pass a PIL image, a local file path, bytes, a numpy uint8 HWC array or a torch CHW tensor",
    )


# ------------------------------------------------------------------------------------------------------------
# The processor.
# ------------------------------------------------------------------------------------------------------------


class DeepseekVLHFImageProcessorKwargs(ImagesKwargs, total=False):
    """Keyword arguments of `DeepseekVLHFImageProcessor` beyond the generic image ones."""

    image_size: int
    min_size: int
    background_color: tuple[int, int, int] | None
    resample_backend: str
    alpha_mode: str
    jpeg_draft: bool
    max_image_pixels: int | None
    num_workers: int


def _check_alpha_mode(alpha_mode: Any) -> None:
    if alpha_mode not in ALPHA_MODES:
        raise ValueError(
            f"alpha_mode must be one of {ALPHA_MODES} ('drop': ignore transparency as the official code does; "
            f"'composite': blend transparent pixels onto the background colour), got {alpha_mode!r}"
        )


def _triple(name: str, value: Any, kind: type) -> tuple:
    try:
        items = tuple(kind(v) for v in value)
    except (TypeError, ValueError):
        items = ()
    if len(items) != 3:
        raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {value!r}")
    return items


def _validated(settings: dict[str, Any]) -> dict[str, Any]:
    """Check and normalise the settings (tuples, ints); a bad value raises ValueError naming it."""
    s = dict(settings)
    for name in ("image_size", "min_size"):
        if isinstance(s[name], bool) or not isinstance(s[name], (int, np.integer)) or s[name] < 1:
            raise ValueError(f"{name} must be a positive integer, got {s[name]!r}")
        s[name] = int(s[name])
    if s["min_size"] > s["image_size"]:
        raise ValueError(f"min_size ({s['min_size']}) must not exceed image_size ({s['image_size']})")
    s["image_mean"] = _triple("image_mean", s["image_mean"], float)
    s["image_std"] = _triple("image_std", s["image_std"], float)
    if any(v <= 0 for v in s["image_std"]):
        raise ValueError(f"image_std must be positive, got {s['image_std']}")
    factor = s["rescale_factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float, np.number)) or not factor > 0:
        raise ValueError(f"rescale_factor must be a positive number, got {s['rescale_factor']!r}")
    s["rescale_factor"] = float(s["rescale_factor"])
    s["do_normalize"] = bool(s["do_normalize"])
    s["jpeg_draft"] = bool(s["jpeg_draft"])
    if s["background_color"] is not None:
        s["background_color"] = _triple("background_color", s["background_color"], int)
        if not all(0 <= v <= 255 for v in s["background_color"]):
            raise ValueError(f"background_color must hold values 0-255, got {s['background_color']}")
    if s["resample_backend"] not in RESAMPLE_BACKENDS:
        raise ValueError(
            f"resample_backend must be one of {RESAMPLE_BACKENDS}, got {s['resample_backend']!r}"
        )
    _check_alpha_mode(s["alpha_mode"])
    limit = s["max_image_pixels"]
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1
    ):
        raise ValueError(f"max_image_pixels must be a positive integer or None, got {limit!r}")
    s["max_image_pixels"] = None if limit is None else int(limit)
    workers = s["num_workers"]
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {workers!r}")
    s["num_workers"] = int(workers)
    return s


def _flatten(images: Any) -> list:
    """One image, a (nested) list of images, or a 4-D batch (numpy NHWC / torch NCHW) -> a flat list."""
    if isinstance(images, (list, tuple)):
        return [item for entry in images for item in _flatten(entry)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


class DeepseekVLHFImageProcessor(BaseImageProcessor):
    r"""Makes DeepSeek-VL `pixel_values`: float32 [N, 3, S, S], in [0, 1] unless `do_normalize`.

    Each image is converted to RGB as the official loader does (PIL `convert("RGB")`: transparency is dropped),
    resized with PIL's bicubic filter so that its longest side is S = `image_size` and its short side is
    `int(short / long * S)` but at least `min_size`, pasted centred (top/left get the smaller half of the
    padding) on an S x S canvas of `background_color`, and multiplied by `rescale_factor`. With the default
    settings the output equals the official preprocessing bit for bit on 8-bit images.

    Opt-in settings that differ from the official code:

    - `alpha_mode="composite"`: transparent pixels (RGBA, LA, PA, P or RGB/L with a transparency key) are
      composited onto the padding colour instead of showing whatever colour hides under alpha 0.
    - `resample_backend="torch"`: torch's uint8 antialiased bicubic, several times faster than PIL's on large
      images; its integer weights round differently, so about 1% of the values differ by 1 grey level (rarely 2).
    - `jpeg_draft=True`: JPEG files are decoded at a reduced DCT scale that still covers the output size (much
      faster on large photos; a few grey levels off).

    Choices beyond the official code (which only handles clean 8-bit RGB PIL images), always on:

    - Multi-frame files (animated GIF/WebP/PNG, multi-page TIFF) give their first frame; a PIL image passed in
      gives the frame it is on.
    - The EXIF orientation tag is applied, so photos come out upright (the official code shows the model the
      stored, possibly sideways, pixels).
    - 16-bit grayscale (I;16*) is divided by 257 (rounded), where PIL's conversion clips every value over 255 to
      white. 32-bit grayscale (I) is read by its value range:
      0-255 as 8-bit, 0-65535 as 16-bit, anything else stretched from min to max. Float (F) images: [0, 1] is
      multiplied by 255, [0, 255] kept, anything else stretched. Other modes use PIL's conversion to RGB.
    - Encoded images over `max_image_pixels` are refused from their header size, before decoding.
    - Anything unusable raises `ImageInputError` naming the image's index (and path) and the fix.

    Args:
        image_size (`int`): S, the side of the square output (1024 for the hybrid 7B, 384 for 1.3B).
        min_size (`int`): the smallest side after resizing (before padding).
        image_mean, image_std (3 floats): used for the default background colour and by `do_normalize`.
        rescale_factor (`float`): multiplies the 0-255 values.
        do_normalize (`bool`): subtract `image_mean` and divide by `image_std` (off in the released
            processors: the model normalises per vision branch).
        background_color (3 ints or `None`): padding colour; `None` means `int(m * 255)` for each mean value.
        resample_backend (`str`): "pil" (default; PIL's bicubic, exactly as the official code) or "torch"
            (uint8 antialiased bicubic in torch: faster, within 1 grey level of PIL but for a rare few values
            that differ by 2).
        jpeg_draft (`bool`): decode JPEG files (paths, bytes, file objects) at the smallest DCT scale (1/2, 1/4,
            1/8) whose size still covers the resized image; much faster on photos over twice the output size, but
            not the official pixels (off by a few grey levels; bench/preprocess.py reports by how much). Off by
            default.
        alpha_mode (`str`): "drop" (default; transparency ignored, as the official `convert("RGB")`) or
            "composite" (transparent pixels blended onto the padding colour).
        max_image_pixels (`int` or `None`): largest accepted width * height of an encoded image; `None` for no
            limit. PIL's own global limit still applies when opening files.
        num_workers (`int`): threads that load and resize images in parallel; 0 works in the calling thread.

    Inputs: a PIL image, a local file path, encoded bytes, a binary file object, a numpy uint8 HWC (or HW)
    array, a torch CHW (or HW) tensor (uint8, or float in [0, 1]; kept off PIL on the torch backend, and moved
    to CPU), or a (nested) list of these; a 4-D numpy (NHWC) array or torch (NCHW) tensor is read as a batch.
    Errors count images by their position in the flattened list. Nothing is downloaded.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = DeepseekVLHFImageProcessorKwargs

    def __init__(
        self,
        image_size: int = 1024,
        min_size: int = 14,
        image_mean: tuple[float, float, float] = CLIP_MEAN,
        image_std: tuple[float, float, float] = CLIP_STD,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = False,
        background_color: tuple[int, int, int] | None = None,
        resample_backend: str = "pil",
        alpha_mode: str = "drop",
        jpeg_draft: bool = False,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        num_workers: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        settings = _validated(
            {
                "image_size": image_size,
                "min_size": min_size,
                "image_mean": image_mean,
                "image_std": image_std,
                "rescale_factor": rescale_factor,
                "do_normalize": do_normalize,
                "background_color": background_color,
                "resample_backend": resample_backend,
                "alpha_mode": alpha_mode,
                "jpeg_draft": jpeg_draft,
                "max_image_pixels": max_image_pixels,
                "num_workers": num_workers,
            }
        )
        for name, value in settings.items():
            setattr(self, name, value)

    @property
    def fill_color(self) -> tuple[int, int, int]:
        """The padding and alpha-compositing colour in effect: `background_color` or the mean's colour."""
        return self.background_color or default_background_color(self.image_mean)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings: the base class's dict plus ours as plain lists/numbers (None values kept)."""
        output = super().to_dict()
        for name in SETTING_NAMES:
            value = getattr(self, name)
            output[name] = list(value) if isinstance(value, tuple) else value
        return output

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """Turn one image or a list of images into `pixel_values` [N, 3, S, S] float32.

        Keyword arguments override this processor's settings for this call (e.g. `image_size=384`).
        `return_tensors` is "pt" (or None) for a torch tensor, or "np" for a numpy array.
        """
        unknown = sorted(set(kwargs) - set(SETTING_NAMES))
        if unknown:
            raise TypeError(
                f"unexpected keyword argument(s) {unknown}; settings that can be overridden: "
                f"{list(SETTING_NAMES)}"
            )
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        s = _validated({name: kwargs.get(name, getattr(self, name)) for name in SETTING_NAMES})
        items = _flatten(images)
        size = s["image_size"]
        fill = s["background_color"] or default_background_color(s["image_mean"])
        # numpy allocates large arrays on transparent huge pages: far fewer page faults than torch.empty.
        pixel_values = torch.from_numpy(np.empty((len(items), 3, size, size), dtype=np.float32))
        # The same object given twice is processed once (and never loaded by two threads at the same time).
        first: dict[int, int] = {}
        for i, item in enumerate(items):
            first.setdefault(id(item), i)
        unique = sorted(set(first.values()))

        def work(i: int) -> None:
            self._process(items[i], i, s, fill, pixel_values[i].numpy())

        if s["num_workers"] > 0 and len(unique) > 1:
            pool = ThreadPoolExecutor(max_workers=min(s["num_workers"], len(unique)))
            try:
                list(pool.map(work, unique))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            for i in unique:
                work(i)
        for i, item in enumerate(items):
            if first[id(item)] != i:
                pixel_values[i] = pixel_values[first[id(item)]]
        if s["do_normalize"]:
            mean = torch.tensor(s["image_mean"], dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.tensor(s["image_std"], dtype=torch.float32).view(1, 3, 1, 1)
            pixel_values.sub_(mean).div_(std)
        data = pixel_values.numpy() if return_tensors == "np" else pixel_values
        return BatchFeature(data={"pixel_values": data})

    @staticmethod
    def _process(
        image: Any, index: int, s: dict[str, Any], fill: tuple[int, int, int], slot: np.ndarray
    ) -> None:
        """Load one input, resize it to `resized_size` and paste it into its float32 [3, S, S] `slot`."""
        size, min_size = s["image_size"], s["min_size"]
        if s["resample_backend"] == "torch" and isinstance(image, (np.ndarray, torch.Tensor)):
            chw = _array_to_chw_uint8(image, index)
            _paste(slot, _resize(chw, resized_size(*chw.shape[1:], size, min_size)), fill, s["rescale_factor"])
            return
        pil = load_image(
            image,
            index,
            background_color=fill,
            max_image_pixels=s["max_image_pixels"],
            alpha_mode=s["alpha_mode"],
            draft=(size, min_size) if s["jpeg_draft"] else None,
        )
        target = resized_size(pil.height, pil.width, size, min_size)
        if target != (pil.height, pil.width) and s["resample_backend"] == "pil":
            pil = pil.resize(target[::-1], Image.Resampling.BICUBIC)
        pixels = np.asarray(pil)  # public array interface: one copy of the pixels, HWC uint8
        if target != pixels.shape[:2]:
            # a writable copy: torch warns on the read-only array PIL's public array interface gives
            resized = _resize(torch.from_numpy(pixels.copy()).permute(2, 0, 1), target)
            pixels = resized.permute(1, 2, 0).numpy()
        _paste(slot, pixels, fill, s["rescale_factor"])


def _resize(chw: torch.Tensor, target: tuple[int, int]) -> torch.Tensor:
    """uint8 [C, H, W] -> uint8 [C, *target] (channels-last memory), torch's antialiased bicubic."""
    if target == tuple(chw.shape[1:]):
        return chw
    # channels-last memory takes torch's fast uint8 kernel on any input layout.
    batch = chw.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return F.interpolate(batch, size=target, mode="bicubic", antialias=True, align_corners=False)[0]


def _paste(slot: np.ndarray, image: np.ndarray | torch.Tensor, fill: tuple[int, int, int], rescale_factor: float) -> None:
    """Write the background and the centred uint8 `image` (numpy [h, w, 3] or torch [3, h, w]) into the float32
    [3, S, S] `slot`, rescaled as the official code does (`uint8 -> float64 * factor -> float32`)."""
    # numpy, single-threaded, is as fast here as torch's threads and never waits for a busy second core.
    if isinstance(image, torch.Tensor):
        image = image.permute(1, 2, 0).numpy()
    size = slot.shape[-1]
    height, width = image.shape[:2]
    top, left = (size - height) // 2, (size - width) // 2
    bottom, right = top + height, left + width
    for channel, value in enumerate(fill):
        plane = slot[channel]
        for band in (plane[:top], plane[bottom:], plane[top:bottom, :left], plane[top:bottom, right:]):
            band.fill(value * rescale_factor)
    region, pixels = slot[:, top:bottom, left:right], image.transpose(2, 0, 1)
    divisor = _exact_divisor(rescale_factor)
    if divisor is None:
        np.multiply(pixels, rescale_factor, out=region, dtype=np.float64)
    else:  # one float32 pass, same values
        np.divide(pixels, divisor, out=region, dtype=np.float32)


@lru_cache(maxsize=16)
def _exact_divisor(rescale_factor: float) -> np.float32 | None:
    """float32 `1 / rescale_factor` if `uint8 / it` in float32 equals `uint8 -> float64 * rescale_factor -> float32`
    for all 256 levels (it does for 1/255), else None."""
    levels = np.arange(256, dtype=np.uint8)
    divisor = np.float32(1 / rescale_factor)
    reference = (levels * np.float64(rescale_factor)).astype(np.float32)
    return divisor if np.array_equal(np.divide(levels, divisor, dtype=np.float32), reference) else None


DeepseekVLHFImageProcessor.register_for_auto_class()

__all__ = [
    "DeepseekVLHFImageProcessor",
    "ImageInputError",
    "default_background_color",
    "load_image",
    "resized_size",
]
