"""A small byte-level BPE tokenizer trained locally, with DeepSeek-VL's special tokens.

Random-weight models (tests, `init`, the demo) need a tokenizer and none may be downloaded; this one has the
same special tokens and the same byte-level BPE kind as DeepSeek-LLM's, just a tiny vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
IMAGE_TOKEN = "<image_placeholder>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN)

_BASE_CORPUS = """\
You are a helpful language and vision assistant. You are able to understand the visual content that the user
provides, and assist the user with a variety of tasks using natural language.
User: What is in the image? Assistant: The image shows a red circle, a blue square and a green triangle.
User: Describe each stage of this image. Assistant: There are three stages in the chart, from left to right.
User: What is written on the banner? Assistant: The banner says hello world.
User: How many objects are there? Assistant: There are 3 objects: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.
The quick brown fox jumps over the lazy dog. A table has rows and columns; the value of x is 42.
Which bar is the largest? The largest bar is B. What is the angle? The angle is 60 degrees.
Colors: red, green, blue, yellow, purple, orange, black, white, gray. Shapes: circle, square, triangle, cross.
Positions: left, right, top, bottom, center. Numbers: zero one two three four five six seven eight nine ten.
"""


def build_tokenizer(vocab_size: int = 2048, corpus: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on a built-in corpus plus `corpus`; specials get ids 0, 1, 2 (BOS, EOS, image).

    The tokenizer adds no special tokens by itself: the processor prepends BOS, as DeepSeek-VL does.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [*_BASE_CORPUS.splitlines(), *corpus]
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[IMAGE_TOKEN],
        clean_up_tokenization_spaces=False,
        model_max_length=16384,
    )
