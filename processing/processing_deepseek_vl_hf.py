"""DeepSeek-VL processor: tokenizer + image processor, image-placeholder expansion and the chat format.

Hub remote code: imports only transformers, torch and the image processor beside it; works on transformers
4.57.x and 5.x.
"""

from __future__ import annotations

import json
import os

import transformers
from transformers import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessorMixin

from .image_processing_deepseek_vl_hf import SETTING_NAMES as IMAGE_SETTING_NAMES
from .image_processing_deepseek_vl_hf import DeepseekVLHFImageProcessor, load_image  # noqa: F401

IMAGE_TOKEN = "<image_placeholder>"
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

# The "deepseek" conversation format: "{system}\n\n" (omitted when empty), "User: {text}\n\n",
# "Assistant: {text}<｜end▁of▁sentence｜>", a generation prompt ends with "Assistant:". The first message may be
# a system message (else the default system prompt is used); the official code's roles "User" / "Assistant" are
# accepted as "user" / "assistant"; images sit in user turns where the content list
# places them. Consecutive text parts are joined by one space; each turn's text is stripped. What the model
# learns to write, " {text}<｜end▁of▁sentence｜>" after each "Assistant:", is marked {% generation %}, so
# `return_assistant_tokens_mask` (TRL's assistant-only loss) and this package's SFT labels find it.
CHAT_TEMPLATE = (
    "{%- macro render(content, role, index) -%}"
    "{%- if content is string -%}{%- set ns = namespace(out=content) -%}"
    "{%- else -%}{%- set ns = namespace(out='', prev='') -%}"
    "{%- if content is mapping or (content is not none and content is not iterable) -%}{{ raise_exception('message '"
    " ~ index ~ ' has content that is neither a string nor a list of parts') }}{%- endif -%}"
    "{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}"
    "{%- if role != 'user' -%}{{ raise_exception('message ' ~ index ~ ' (' ~ role ~ ') holds an image: images go"
    " in user messages only') }}{%- endif -%}"
    "{%- set ns.out = ns.out + '<image_placeholder>' -%}{%- set ns.prev = 'image' -%}"
    "{%- elif part['type'] == 'text' -%}"
    "{%- if part['text'] is not string -%}{{ raise_exception('message ' ~ index ~ ' has a text part without a text"
    " string') }}{%- endif -%}"
    "{%- if ns.prev == 'text' -%}{%- set ns.out = ns.out + ' ' -%}{%- endif -%}"
    "{%- set ns.out = ns.out + part['text'] -%}{%- set ns.prev = 'text' -%}"
    "{%- else -%}{{ raise_exception('message ' ~ index ~ ' has a content part of unsupported type ' ~ part['type']"
    " ~ ': use text or image') }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if role != 'user' and '<image_placeholder>' in ns.out -%}{{ raise_exception('message ' ~ index ~ ' (' ~"
    " role ~ ') contains <image_placeholder>: images go in user messages only') }}{%- endif -%}"
    "{{- ns.out | trim -}}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = render(messages[0]['content'], 'system', 0) -%}{%- set first = 1 -%}"
    "{%- else -%}"
    "{%- set system_text = '" + DEFAULT_SYSTEM_PROMPT + "' -%}{%- set first = 0 -%}"
    "{%- endif -%}"
    "{%- if system_text -%}{{ system_text }}{{ '\\n\\n' }}{%- endif -%}"
    "{%- for message in messages[first:] -%}"
    "{%- set index = loop.index0 + first -%}"
    "{%- set role = message['role'] | lower if message['role'] in ('User', 'Assistant') else message['role'] -%}"
    "{%- if role == 'user' -%}{%- set label = 'User' -%}"
    "{%- elif role == 'assistant' -%}{%- set label = 'Assistant' -%}"
    "{%- elif role == 'system' -%}{{ raise_exception('message ' ~ index ~ ' is a system message: only"
    " the first message may be one') }}"
    "{%- else -%}{{ raise_exception('message ' ~ index ~ ' has unknown role ' ~ role ~ ': use system,"
    " user or assistant (or the official User / Assistant)') }}"
    "{%- endif -%}"
    "{%- set text = render(message['content'], role, index) -%}"
    "{%- if text and role == 'assistant' -%}"
    "Assistant:{% generation %} {{ text }}<｜end▁of▁sentence｜>{% endgeneration %}"
    "{%- elif text -%}{{ label }}: {{ text }}"
    "{%- if not loop.last or add_generation_prompt -%}{{ '\\n\\n' }}{%- endif -%}"
    "{%- else -%}{{ label }}:{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)


# Keywords of transformers' processor contract (`ProcessorMixin.__call__` / `apply_chat_template`, 4.57 and 5.x)
# that change nothing here. `add_special_tokens`: BOS is added once, always (the chat template does not write it,
# and DeepSeek-VL always starts with it; a text that already starts with BOS gets no second one), so TRL's
# `add_special_tokens=False` still trains on the sequences inference sees. `return_token_type_ids` and
# `sanitize_control_tokens` are accepted when off.
_IGNORED_TEXT_KWARGS = ("add_special_tokens", "return_dict", "verbose", "return_overflowing_tokens")
_OFF_ONLY_KWARGS = {
    "return_token_type_ids": "DeepSeek-VL's LLM takes no token type ids",
    "sanitize_control_tokens": "this processor does not mark control tokens; leave sanitize_control_tokens off",
    "return_special_tokens_mask": "this processor returns no special-tokens mask",
}
# transformers groups processor keywords by modality; they are flattened here.
_NESTED_KWARGS = ("text_kwargs", "images_kwargs", "common_kwargs", "processor_kwargs")


class ProcessorInputError(ValueError):
    """Text and images that do not fit together (placeholder count, nesting, length)."""


class DeepseekVLHFProcessor(ProcessorMixin):
    r"""Prepares DeepSeek-VL inputs: `input_ids`, `attention_mask` and `pixel_values`.

    Each `<image_placeholder>` in the text stands for one image, in order, and is expanded into
    `num_image_tokens` image tokens. Sequences start with BOS and are padded on the left (for batched
    generation) with the pad token, or EOS when the tokenizer has none, as DeepSeek-VL does.

    Args:
        image_processor ([`DeepseekVLHFImageProcessor`]): makes `pixel_values` [N, 3, S, S] in [0, 1].
        tokenizer: a fast tokenizer that knows `<image_placeholder>`.
        chat_template (`str`, *optional*): Jinja chat template; DeepSeek-VL's "deepseek" format by default.
        num_image_tokens (`int`): image tokens per image (576 for the released models).
        image_token (`str`): the placeholder string.
    """

    attributes = ["image_processor", "tokenizer"]
    if int(transformers.__version__.split(".")[0]) < 5:  # 5.x finds the sub-processors from __init__'s signature
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        num_image_tokens: int = 576,
        image_token: str = IMAGE_TOKEN,
        **kwargs,
    ):
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)

    @property
    def image_token_id(self) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ProcessorInputError(f"the tokenizer does not know the image token {self.image_token!r}")
        return token_id

    @property
    def pad_token_id(self) -> int:
        """The pad id, falling back to EOS (DeepSeek-LLM's tokenizer has no pad token)."""
        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def _get_num_multimodal_tokens(self, image_sizes: list | None = None, **kwargs) -> MultiModalData:
        """Image tokens (and patches: one) per image of the given (height, width) sizes; what serving engines'
        transformers backends (vLLM, SGLang) read to reserve placeholder positions. Every image becomes
        `num_image_tokens`, whatever its size (it is resized and padded to one square)."""
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(
            num_image_tokens=[self.num_image_tokens] * len(image_sizes), num_image_patches=[1] * len(image_sizes)
        )

    def apply_chat_template(self, conversation, *args, **kwargs):
        """transformers' chat templating, but an empty conversation is a clear error (not an IndexError).

        With `tokenize=True` and no `return_tensors`, the result holds lists, as transformers' processors give
        (TRL's template probes read token ids from it); `__call__` itself returns tensors unless told otherwise.
        """
        if not conversation:
            raise ProcessorInputError("the conversation is empty: give at least one message")
        if kwargs.get("return_tensors", "auto") == "auto":
            kwargs["return_tensors"] = None
        return super().apply_chat_template(conversation, *args, **kwargs)

    def _split_images(self, texts: list[str], images) -> list[list]:
        """Per-text image lists: `images` is flat (in text order) or nested one list per text."""
        counts = [text.count(self.image_token) for text in texts]
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        nested = len(images) > 0 and all(isinstance(item, (list, tuple)) for item in images)
        if nested:
            if len(images) != len(texts):
                raise ProcessorInputError(
                    f"images is nested per text but has {len(images)} lists for {len(texts)} texts; give one list "
                    "per text or a flat list in text order"
                )
            per_text = [list(item) for item in images]
        else:
            if sum(counts) != len(images):
                raise ProcessorInputError(
                    f"the text has {sum(counts)} {self.image_token} placeholder(s) (per text: {counts}) but "
                    f"{len(images)} image(s) were given; put exactly one {self.image_token} where each image belongs"
                )
            starts = [sum(counts[:i]) for i in range(len(counts))]
            per_text = [list(images[s : s + c]) for s, c in zip(starts, counts)]
        for index, (count, text_images) in enumerate(zip(counts, per_text)):
            if count != len(text_images):
                raise ProcessorInputError(
                    f"text {index} has {count} {self.image_token} placeholder(s) but {len(text_images)} image(s) "
                    "were given for it; put exactly one placeholder where each image belongs"
                )
        return per_text

    def encode_text(
        self, text: str, max_length: int | None = None, return_offsets: bool = False
    ) -> tuple[list[int], int] | tuple[list[int], int, list[tuple[int, int]]]:
        """Token ids with BOS and each placeholder expanded; returns (ids, number of images kept), and with
        `return_offsets` each id's (start, end) character span in `text` (BOS: (0, 0); an image's ids: its
        placeholder's span). Offsets need a fast tokenizer."""
        bos = self.tokenizer.bos_token
        skip = len(bos) if bos and text.startswith(bos) else 0
        encoding = self.tokenizer(  # length: checked in __call__
            text[skip:], add_special_tokens=False, verbose=False, return_offsets_mapping=return_offsets
        )
        ids = encoding["input_ids"]
        spans = encoding["offset_mapping"] if return_offsets else [(0, 0)] * len(ids)
        image_id = self.image_token_id
        out = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        offsets = [(0, 0)] * len(out)
        kept = 0
        for token, (start, end) in zip(ids, spans):
            piece = [image_id] * self.num_image_tokens if token == image_id else [token]
            if max_length is not None and len(out) + len(piece) > max_length:
                break  # truncate before a piece that does not fit whole: never through an image's tokens
            out += piece
            offsets += [(start + skip, end + skip)] * len(piece)
            kept += token == image_id
        return (out, kept, offsets) if return_offsets else (out, kept)

    def __call__(
        self,
        text: str | list[str] | None = None,
        images=None,
        padding: bool | str = True,
        padding_side: str | None = None,
        truncation: bool | str | None = False,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_attention_mask: bool | None = None,
        return_offsets_mapping: bool = False,
        return_text_replacement_offsets: bool = False,
        return_mm_token_type_ids: bool = False,
        return_length: bool = False,
        return_tensors: str | None = "pt",
        videos=None,
        audio=None,
        **kwargs,
    ) -> BatchFeature:
        """Tokenise `text` (a string or a batch), expand placeholders and preprocess `images`.

        The length limit is `max_length`, else the tokenizer's `model_max_length` (when set). Over-long sequences
        raise an error unless `truncation=True`; truncation cuts before any image whose tokens would not fit
        whole and drops that image and the ones after it. `padding`: True / "longest" pads to the longest text,
        "max_length" to `max_length`, False / "do_not_pad" needs equal lengths; `pad_to_multiple_of` rounds the
        width up; `padding_side` defaults to left (batched generation). Optional outputs: `offset_mapping` (each
        token's character span in its text; an image's tokens all span its placeholder), `text_replacement_offsets`
        (empty: placeholders expand into tokens, never into text, so spans need no shift; what transformers' and
        TRL's assistant masks read), `mm_token_type_ids` (1 at image tokens) and `length`.
        """
        if videos is not None or audio is not None:
            raise ProcessorInputError("DeepSeek-VL takes text and images only, not videos or audio")
        for name in _NESTED_KWARGS:
            nested = kwargs.pop(name, None) or {}
            if not isinstance(nested, dict):
                raise TypeError(f"{name} must be a dict of keyword arguments, got {type(nested).__name__}")
            kwargs.update(nested)
        named = {"padding": padding, "padding_side": padding_side, "truncation": truncation, "max_length": max_length,
                 "pad_to_multiple_of": pad_to_multiple_of, "return_tensors": return_tensors}
        for key in named.keys() & kwargs.keys():  # given again inside a nested dict
            named[key] = kwargs.pop(key)
        for key, flag in (("return_attention_mask", return_attention_mask),
                          ("return_offsets_mapping", return_offsets_mapping),
                          ("return_text_replacement_offsets", return_text_replacement_offsets),
                          ("return_mm_token_type_ids", return_mm_token_type_ids), ("return_length", return_length)):
            named[key] = kwargs.pop(key, flag)
        image_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in IMAGE_SETTING_NAMES}
        for key, reason in _OFF_ONLY_KWARGS.items():
            if kwargs.pop(key, None):
                raise ProcessorInputError(f"{key}=True is not supported: {reason}")
        unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _IGNORED_TEXT_KWARGS)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown} for DeepseekVLHFProcessor")
        if text is None:
            raise ProcessorInputError("text is required: DeepSeek-VL images are placed by <image_placeholder> in the text")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ProcessorInputError("text must be a string or a non-empty list of strings")
        per_text_images = self._split_images(texts, images)
        max_length, truncation = named["max_length"], named["truncation"]
        truncation = truncation not in (False, None, "do_not_truncate")
        limit_name = "max_length"
        if max_length is None and self.tokenizer.model_max_length < 1e7:  # transformers' "unset" is 1e30
            max_length, limit_name = int(self.tokenizer.model_max_length), "the tokenizer's model_max_length"
        sequences, offsets, kept_images = [], [], []
        for index, (item, text_images) in enumerate(zip(texts, per_text_images)):
            ids, kept, spans = self.encode_text(item, max_length if truncation else None, return_offsets=True)
            if max_length is not None and not truncation and len(ids) > max_length:
                raise ProcessorInputError(
                    f"text {index} is {len(ids)} tokens long (images expanded), over {limit_name}={max_length}; "
                    "shorten it or pass truncation=True (with max_length=N for a shorter limit), which never cuts "
                    "through an image"
                )
            sequences.append(ids)
            offsets.append(spans)
            kept_images += text_images[:kept]
        data = self._pad(sequences, offsets, named, max_length)
        if kept_images:
            data["pixel_values"] = self.image_processor(kept_images, return_tensors="pt", **image_kwargs)["pixel_values"]
        return BatchFeature(data=data, tensor_type=named["return_tensors"])

    def _pad(self, sequences: list[list[int]], offsets: list[list[tuple[int, int]]], options: dict,
             max_length: int | None) -> dict:
        """Pad to one width (see `__call__` for the options) and build the requested per-token outputs."""
        side = options["padding_side"] or "left"
        if side not in ("left", "right"):
            raise ProcessorInputError(f"padding_side must be 'left' or 'right', got {side!r}")
        padding = options["padding"]
        padding = getattr(padding, "value", padding)  # transformers' PaddingStrategy enum
        longest = max(len(s) for s in sequences)
        if padding in (False, None, "do_not_pad"):
            if len({len(s) for s in sequences}) > 1:
                raise ProcessorInputError("texts of different lengths need padding=True to form one batch")
            width = longest
        elif padding == "max_length":
            if options["max_length"] is None and max_length is None:
                raise ProcessorInputError("padding='max_length' needs max_length=N (or the tokenizer's model_max_length)")
            width = max(longest, options["max_length"] or max_length)
        elif padding in (True, "longest"):
            width = longest
        else:
            raise ProcessorInputError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        multiple = options["pad_to_multiple_of"]
        if multiple:
            width = -(-width // multiple) * multiple
        image_id = self.image_token_id
        columns: dict[str, list] = {"input_ids": []}
        if options["return_attention_mask"] is not False:
            columns["attention_mask"] = []
        if options["return_offsets_mapping"]:
            columns["offset_mapping"] = []
        if options["return_mm_token_type_ids"]:
            columns["mm_token_type_ids"] = []

        def padded(values: list, fill) -> list:
            pad = [fill] * (width - len(values))
            return pad + values if side == "left" else values + pad

        for seq, spans in zip(sequences, offsets):
            columns["input_ids"].append(padded(seq, self.pad_token_id))
            if "attention_mask" in columns:
                columns["attention_mask"].append(padded([1] * len(seq), 0))
            if "offset_mapping" in columns:  # pads span nothing, at the edge they sit on: offsets stay sorted
                edge = 0 if side == "left" or not spans else max(end for _, end in spans)
                columns["offset_mapping"].append(padded([list(span) for span in spans], [edge, edge]))
            if "mm_token_type_ids" in columns:
                columns["mm_token_type_ids"].append(padded([int(t == image_id) for t in seq], 0))
        if options["return_text_replacement_offsets"]:
            columns["text_replacement_offsets"] = [[] for _ in sequences]
        if options["return_length"]:
            columns["length"] = [len(seq) for seq in sequences]
        return columns

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as usual, then write the tokenizer config in the form both transformers 4.x and 5.x read."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        path = os.path.join(save_directory, "tokenizer_config.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                tokenizer_config = json.load(f)
            if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":  # a 5.x-only class name
                tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
            extra = tokenizer_config.get("extra_special_tokens")
            if isinstance(extra, list):  # 5.x writes a list; 4.x reads it as `additional_special_tokens`
                tokenizer_config["additional_special_tokens"] = tokenizer_config.pop("extra_special_tokens")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
        return result

    def batch_decode(self, *args, **kwargs) -> list[str]:
        """Decode a batch of token ids (forwards to the tokenizer)."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        """Decode token ids (forwards to the tokenizer)."""
        return self.tokenizer.decode(*args, **kwargs)


DeepseekVLHFProcessor.register_for_auto_class()

__all__ = ["CHAT_TEMPLATE", "DEFAULT_SYSTEM_PROMPT", "DeepseekVLHFProcessor", "ProcessorInputError"]
