"""A synthetic stand-in for DeepSeek-VL's real-world data: drawn images with questions that have one short answer.

Categories follow the paper's real-world taxonomy in miniature: `scene` (coloured shapes, positions, counts),
`ocr` (short words and numbers in small print, unreadable at the SigLIP branch's resolution by design, and in large
print readable at both), `chart` (bar and line charts), `document` (tables and text pages), `geometry` (angles,
polygons, lengths) and `text` (a language-only rule task that measures language retention on names no training
text contains). Everything is drawn with PIL and its built-in bitmap font, so nothing is downloaded, and
every image is a pure function of (seed, category, split, index): the same seed writes byte-identical files.

Each sample keeps the generator's own description (`scene`), from which every answer is derived; the answers
are single words or numbers, drawn uniformly from a known set per question kind, so exact match is meaningful
and chance is `1 / len(answers)`.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from deepseek_vl_hf.processing.processing_deepseek_vl_hf import DEFAULT_SYSTEM_PROMPT, IMAGE_TOKEN

VISUAL_CATEGORIES = ("scene", "ocr", "chart", "document", "geometry")
CATEGORIES = (*VISUAL_CATEGORIES, "text")
COLOURS = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 190, 0),
    "purple": (140, 50, 170),
    "orange": (240, 120, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
WORDS = ("cat", "dog", "sun", "map", "box", "key", "cup", "pen", "hat", "car", "bus", "fish")
LETTERS = ("A", "B", "C", "D", "E")
DIGITS = tuple(str(d) for d in range(10))
OCR_WORDS = ("cat", "sun", "box", "pen", "bus", "fish")
NUMBERS = ("12", "38", "47", "59", "66", "85")
OCR_GRID = 4  # the small print is repeated once per cell of an OCR_GRID x OCR_GRID grid
OCR_LARGE_SCALE, OCR_LARGE_GRID = 4, 2  # large print: the font 4x (44 px, ~16 px at 96 px) in a 2 x 2 grid
ANGLES = (30, 60, 90, 120, 150)
ENTITY_SYLLABLES = ("zor", "mel", "kap", "tiv", "ron", "bel", "dux", "fen", "gal", "hum", "jor", "lin", "vos", "wex")
FACT_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
# Per first syllable, how many of its 13 names go to each text split (the rest, 3, to the retention probe).
TEXT_SPLIT_SIZES = {"warmup": 6, "pretrain": 4}
SFT_DIALOGUES_PER_IMAGE = 2  # stage-3 dialogues per training image
SFT_TURNS = 6  # questions (turns) per stage-3 dialogue at most


@dataclass(frozen=True)
class Kind:
    """A question kind: its category and the set its answers are drawn from uniformly (chance = 1 / size)."""

    category: str
    answers: tuple[str, ...]

    @property
    def chance(self) -> float:
        return 1.0 / len(self.answers)


KINDS: dict[str, Kind] = {
    "scene/colour": Kind("scene", tuple(COLOURS)),
    "scene/shape": Kind("scene", SHAPES),
    "scene/count": Kind("scene", ("1", "2", "3")),
    "scene/side": Kind("scene", ("left", "right")),
    "ocr/word": Kind("ocr", OCR_WORDS),
    "ocr/number": Kind("ocr", NUMBERS),
    "ocr/large": Kind("ocr", OCR_WORDS + NUMBERS),
    "chart/largest": Kind("chart", LETTERS[:4]),
    "chart/value": Kind("chart", tuple(str(v) for v in range(1, 10))),
    "document/rows": Kind("document", ("2", "3", "4", "5")),
    "document/cell": Kind("document", DIGITS),
    "document/title": Kind("document", WORDS),
    "document/paragraphs": Kind("document", ("1", "2", "3", "4")),
    "geometry/angle": Kind("geometry", tuple(str(a) for a in ANGLES)),
    "geometry/sides": Kind("geometry", ("3", "4", "5", "6")),
    "geometry/length": Kind("geometry", ("1", "2", "3", "4", "5", "6")),
    "text/colour": Kind("text", FACT_COLOURS),
    "text/number": Kind("text", DIGITS),
}


@dataclass
class Sample:
    """One image (None for the text task) with every question the generator can answer about it."""

    category: str
    image: Image.Image | None
    scene: dict[str, Any]
    caption: str
    qa: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, question, answer)


# ---------------------------------------------------------------------------------------------------- drawing


def bitmap_font() -> ImageFont.ImageFont:
    """PIL's built-in bitmap font (the same pixels on every machine, unlike the FreeType default)."""
    loader = getattr(ImageFont, "load_default_imagefont", None)  # Pillow >= 10.1; before, load_default() is it
    return loader() if loader else ImageFont.load_default()


def draw_text(image: Image.Image, xy: tuple[int, int], text: str, fill: tuple[int, int, int], scale: int = 1) -> tuple:
    """Render `text` at `xy` with the bitmap font enlarged `scale` times (nearest); returns its box."""
    font = bitmap_font()
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right, bottom), 0)
    ImageDraw.Draw(mask).text((0, 0), text, font=font, fill=255)
    mask = mask.crop((left, top, right, bottom))
    if scale > 1:
        mask = mask.resize((mask.width * scale, mask.height * scale), Image.NEAREST)
    image.paste(Image.new("RGB", mask.size, fill), xy, mask)
    return (xy[0], xy[1], xy[0] + mask.width, xy[1] + mask.height)


def text_size(text: str, scale: int = 1) -> tuple[int, int]:
    """Width and height of `text` as `draw_text` renders it."""
    left, top, right, bottom = bitmap_font().getbbox(text)
    return (right - left) * scale, (bottom - top) * scale


def _background(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(205, 250) for _ in range(3))


def _canvas(rng: random.Random, size: int) -> Image.Image:
    return Image.new("RGB", (size, size), _background(rng))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """Draw a filled circle, square, triangle or cross inside `box` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        third_w, third_h = (x1 - x0) / 3, (y1 - y0) / 3
        draw.rectangle((x0 + third_w, y0, x1 - third_w, y1), fill=fill)
        draw.rectangle((x0, y0 + third_h, x1, y1 - third_h), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


# ------------------------------------------------------------------------------------------------- categories


def scene_answers(scene: dict[str, Any]) -> list[tuple[str, str, str]]:
    """All questions about a shapes scene, answered from its object list."""
    objects = scene["objects"]
    qa = [("scene/count", "How many objects are there?", str(len(objects)))]
    for obj in objects:
        side = "left" if obj["cell"] % 2 == 0 else "right"
        qa += [
            ("scene/colour", f"What colour is the {obj['shape']}?", obj["colour"]),
            ("scene/shape", f"What shape is the {obj['colour']} object?", obj["shape"]),
            ("scene/side", f"Is the {obj['colour']} {obj['shape']} on the left or the right?", side),
        ]
    return qa


def make_scene(rng: random.Random, size: int) -> Sample:
    """1-3 objects of distinct shapes and colours, each in its own cell of a 2x2 grid, 30-45% of the side."""
    count = rng.randint(1, 3)
    cells = rng.sample(range(4), count)
    shapes = rng.sample(SHAPES, count)
    colours = rng.sample(list(COLOURS), count)
    image = _canvas(rng, size)
    draw = ImageDraw.Draw(image)
    objects = []
    for cell, shape, colour in zip(cells, shapes, colours):
        extent = rng.uniform(0.30, 0.45) * size
        half = size / 2
        x = (cell % 2) * half + rng.uniform(0, half - extent)
        y = (cell // 2) * half + rng.uniform(0, half - extent)
        draw_shape(draw, shape, (x, y, x + extent, y + extent), COLOURS[colour])
        objects.append({"shape": shape, "colour": colour, "cell": cell, "box": [x, y, x + extent, y + extent]})
    scene = {"objects": objects}
    parts = [f"a {o['colour']} {o['shape']} on the {'left' if o['cell'] % 2 == 0 else 'right'}" for o in objects]
    caption = f"{len(objects)} objects: " + ", ".join(parts) + "."
    return Sample("scene", image, scene, caption, scene_answers(scene))


def make_ocr(rng: random.Random, size: int) -> Sample:
    """A short word or a two-digit number, half the time in small print (the bitmap font at 1x, 11 px tall) once in
    each cell of a 4x4 grid (as on a label sheet or a patterned wrapper), half the time in large print (4x, 44 px
    tall) once in each cell of a 2x2 grid.

    The OCR gap of the hybrid ablation is built in here: at the SigLIP branch's 96 px the small print shrinks to
    about 4 px and becomes unreadable, while at the SAM branch's 256 px it stays legible; the large print (about
    16 px at 96 px) is readable at both, which shows where the hybrid stops mattering. The repeats spread the text
    over the image tokens: the demo's 2-layer language model learns to read what many of its 36 image tokens carry
    within minutes, not what one token carries.
    """
    large = rng.random() < 0.5
    if large:
        text = rng.choice(OCR_WORDS + NUMBERS)
        kind, question, scale, grid = "ocr/large", "What is written in large print?", OCR_LARGE_SCALE, OCR_LARGE_GRID
    elif rng.random() < 0.5:
        kind, text, question, scale, grid = "ocr/word", rng.choice(OCR_WORDS), "What word is written?", 1, OCR_GRID
    else:
        kind, text, question, scale, grid = "ocr/number", rng.choice(NUMBERS), "What number is written?", 1, OCR_GRID
    image = _canvas(rng, size)
    width, height = text_size(text, scale)
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    cell, line = size // grid, size // 16  # the print sits on lines and columns of a 16 x 16 grid
    offset_x = rng.randrange(max(1, (cell - width) // line)) * line + 1
    offset_y = rng.randrange(max(1, (cell - height) // line + 1)) * line + max(0, (line - height) // 2)
    boxes = [
        list(draw_text(image, (column * cell + offset_x, row * cell + offset_y), text, ink, scale))
        for row in range(grid)
        for column in range(grid)
    ]
    scene = {"text": text, "boxes": boxes, "scale": scale}
    return Sample("ocr", image, scene, f"The text reads {text}.", [(kind, question, text)])


def chart_answers(scene: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Questions about a chart, answered from its values."""
    values = scene["values"]
    largest = LETTERS[values.index(max(values))]
    noun = "bar" if scene["type"] == "bar" else "point"
    qa = [("chart/largest", f"Which {noun} is the largest?", largest)]
    qa += [("chart/value", f"What is the value of {LETTERS[i]}?", str(v)) for i, v in enumerate(values)]
    return qa


def make_chart(rng: random.Random, size: int) -> Sample:
    """A bar or line chart of four values 1-9 (redrawn until the maximum is unique) over a unit grid."""
    values = [rng.randint(1, 9) for _ in range(4)]
    while values.count(max(values)) > 1:
        values = [rng.randint(1, 9) for _ in range(4)]
    largest = values.index(max(values))
    kind = rng.choice(("bar", "line"))
    image = _canvas(rng, size)
    draw = ImageDraw.Draw(image)
    left, bottom, unit = size // 8, size - size // 8, (size * 3 // 4) // 9
    for v in range(10):
        y = bottom - v * unit
        draw.line((left, y, size - 4, y), fill=(180, 180, 180) if v else (0, 0, 0), width=1)
    draw.line((left, bottom, left, bottom - 9 * unit), fill=(0, 0, 0), width=2)
    colour = COLOURS[rng.choice(list(COLOURS))]
    slot = (size - left - 8) // 4
    points, bars = [], []
    for i, value in enumerate(values):
        x0 = left + 4 + i * slot + slot // 6
        x1 = x0 + slot * 2 // 3
        if kind == "bar":
            draw.rectangle((x0, bottom - value * unit, x1, bottom - 1), fill=colour)
        points.append(((x0 + x1) // 2, bottom - value * unit))
        bars.append([x0, x1])
        draw_text(image, ((x0 + x1) // 2 - 6, bottom + 4), LETTERS[i], (0, 0, 0), scale=2)
    if kind == "line":
        draw.line(points, fill=colour, width=3)
        for x, y in points:
            draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=colour)
    scene = {"type": kind, "values": values, "bottom": bottom, "unit": unit, "bars": bars, "colour": list(colour)}
    listing = ", ".join(f"{LETTERS[i]} is {v}" for i, v in enumerate(values))
    caption = f"A {kind} chart: {listing}; the largest is {LETTERS[largest]}."
    return Sample("chart", image, scene, caption, chart_answers(scene))


def document_answers(scene: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Questions about a table or a text page, answered from its contents."""
    if scene["type"] == "table":
        qa = [("document/rows", "How many rows does the table have?", str(len(scene["cells"])))]
        return qa + [
            ("document/cell", f"What is the value in row {LETTERS[i]}?", str(v)) for i, v in enumerate(scene["cells"])
        ]
    return [
        ("document/title", "What is the title of the document?", scene["title"]),
        ("document/paragraphs", "How many paragraphs are there?", str(scene["paragraphs"])),
    ]


def _make_table(rng: random.Random, size: int, image: Image.Image) -> dict[str, Any]:
    rows = rng.randint(2, 5)
    cells = [rng.randrange(10) for _ in range(rows)]
    draw = ImageDraw.Draw(image)
    row_h, x0, x1 = size // 6, size // 6, size * 5 // 6
    mid = (x0 + x1) // 2
    y0 = (size - rows * row_h) // 2
    for r in range(rows + 1):
        draw.line((x0, y0 + r * row_h, x1, y0 + r * row_h), fill=(0, 0, 0), width=2)
    for x in (x0, mid, x1):
        draw.line((x, y0, x, y0 + rows * row_h), fill=(0, 0, 0), width=2)
    for r, value in enumerate(cells):
        for text, cx in ((LETTERS[r], (x0 + mid) // 2), (str(value), (mid + x1) // 2)):
            w, h = text_size(text, 3)
            draw_text(image, (cx - w // 2, y0 + r * row_h + (row_h - h) // 2), text, (0, 0, 0), scale=3)
    return {"type": "table", "cells": cells}


def _make_page(rng: random.Random, size: int, image: Image.Image) -> dict[str, Any]:
    title = rng.choice(WORDS)
    paragraphs = rng.randint(1, 4)
    w, h = text_size(title, 4)
    draw_text(image, ((size - w) // 2, size // 16), title, (0, 0, 0), scale=4)
    draw = ImageDraw.Draw(image)
    top, gap = size // 16 + h + size // 16, size // 40
    block = (size - top - size // 16) // 4
    for p in range(paragraphs):
        lines = rng.randint(2, 3)
        for line in range(lines):
            y = top + p * block + line * (block - gap) // 3
            right = size - size // 10 - (rng.randint(0, size // 3) if line == lines - 1 else 0)
            draw.rectangle((size // 10, y, right, y + (block - gap) // 6), fill=(110, 110, 110))
    return {"type": "page", "title": title, "paragraphs": paragraphs}


def make_document(rng: random.Random, size: int) -> Sample:
    """A two-column table (row letter, digit) of 2-5 rows, or a page with a title word and 1-4 paragraphs."""
    image = Image.new("RGB", (size, size), tuple(rng.randint(238, 255) for _ in range(3)))
    if rng.random() < 0.5:
        scene = _make_table(rng, size, image)
        listing = ", ".join(f"{LETTERS[i]} {v}" for i, v in enumerate(scene["cells"]))
        caption = f"A table with {len(scene['cells'])} rows: {listing}."
    else:
        scene = _make_page(rng, size, image)
        caption = f"A document titled {scene['title']} with {scene['paragraphs']} paragraphs."
    return Sample("document", image, scene, caption, document_answers(scene))


def geometry_answers(scene: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The question about a geometry figure, answered from its parameters."""
    if scene["type"] == "angle":
        return [("geometry/angle", "What is the angle in degrees?", str(scene["angle"]))]
    if scene["type"] == "polygon":
        return [("geometry/sides", "How many sides does the polygon have?", str(scene["sides"]))]
    return [("geometry/length", "How many units long is the segment?", str(scene["length"]))]


def make_geometry(rng: random.Random, size: int) -> Sample:
    """An angle between two rays, a regular polygon, or a segment on a unit grid."""
    image = _canvas(rng, size)
    draw = ImageDraw.Draw(image)
    ink = tuple(rng.randint(0, 80) for _ in range(3))
    figure = rng.choice(("angle", "polygon", "segment"))
    if figure == "angle":
        angle = rng.choice(ANGLES)
        start = rng.uniform(-15, 15)  # one ray near the horizontal, as figures are usually drawn
        cx, cy, radius = size / 2, size / 2, size * 0.42
        for direction in (start, start + angle):
            rad = math.radians(direction)
            draw.line((cx, cy, cx + radius * math.cos(rad), cy - radius * math.sin(rad)), fill=ink, width=4)
        arc = size * 0.12
        draw.arc((cx - arc, cy - arc, cx + arc, cy + arc), -start - angle, -start, fill=(200, 30, 30), width=3)
        scene = {"type": "angle", "angle": angle, "start": start}
        caption = f"An angle of {angle} degrees."
    elif figure == "polygon":
        sides = rng.randint(3, 6)
        rotation = rng.uniform(0, 2 * math.pi)
        radius = size * rng.uniform(0.3, 0.42)
        corners = [
            (size / 2 + radius * math.cos(rotation + 2 * math.pi * k / sides),
             size / 2 + radius * math.sin(rotation + 2 * math.pi * k / sides))
            for k in range(sides)
        ]
        draw.polygon(corners, outline=ink, width=4)
        scene = {"type": "polygon", "sides": sides, "corners": corners}
        caption = f"A polygon with {sides} sides."
    else:
        unit = size // 8
        for k in range(9):
            draw.line((k * unit, 0, k * unit, size), fill=(190, 190, 190))
            draw.line((0, k * unit, size, k * unit), fill=(190, 190, 190))
        length = rng.randint(1, 6)
        horizontal = rng.random() < 0.5
        a, b = rng.randint(1, 7 - length), rng.randint(1, 7)
        x0, y0 = (a, b) if horizontal else (b, a)
        x1, y1 = (x0 + length, y0) if horizontal else (x0, y0 + length)
        draw.line((x0 * unit, y0 * unit, x1 * unit, y1 * unit), fill=ink, width=5)
        scene = {"type": "segment", "length": length, "ends": [x0, y0, x1, y1], "unit": unit}
        caption = f"A segment {length} units long."
    return Sample("geometry", image, scene, caption, geometry_answers(scene))


GENERATORS: dict[str, Callable[[random.Random, int], Sample]] = {
    "scene": make_scene,
    "ocr": make_ocr,
    "chart": make_chart,
    "document": make_document,
    "geometry": make_geometry,
}


# --------------------------------------------------------------------------------------------------- text task

FACT_QUESTIONS = {
    "text/colour": ("What colour is the {e}?", "Which colour does the {e} have?", "Name the colour of the {e}."),
    "text/number": ("What number does the {e} have?", "Which number belongs to the {e}?", "Name the number of the {e}."),
}


def text_world(seed: int) -> dict[str, Any]:
    """The text task: made-up two-syllable names ("zor-mel") whose colour follows from the first syllable and whose
    number follows from the second (a rule, like a suffix telling a word's class), and the names split three ways:
    `warmup` (stage 0's text), `pretrain` (the language data of stages 2 and 3) and `probe` (the retention probe,
    in no training text). The probe asks the rule on names never seen, so it measures a skill, not recall."""
    rng = random.Random(f"{seed}-text-world")
    world: dict[str, Any] = {
        "colour": {syllable: rng.choice(FACT_COLOURS) for syllable in ENTITY_SYLLABLES},
        "number": {syllable: rng.choice(DIGITS) for syllable in ENTITY_SYLLABLES},
        "splits": {"warmup": [], "pretrain": [], "probe": []},
    }
    for first in ENTITY_SYLLABLES:  # every first syllable appears in every split
        names = [f"{first}-{second}" for second in ENTITY_SYLLABLES if second != first]
        rng.shuffle(names)
        cut = list(TEXT_SPLIT_SIZES.values())
        world["splits"]["warmup"] += names[: cut[0]]
        world["splits"]["pretrain"] += names[cut[0] : cut[0] + cut[1]]
        world["splits"]["probe"] += names[cut[0] + cut[1] :]
    return world


def text_answers(world: dict[str, Any], name: str) -> dict[str, str]:
    """A name's colour and number under the world's rule."""
    first, second = name.split("-")
    return {"text/colour": world["colour"][first], "text/number": world["number"][second]}


def fact_questions(world: dict[str, Any], split: str) -> list[tuple[str, str, str]]:
    """(kind, question, answer) about the names of `split`: every template for training splits, one (drawn per
    name and kind) for the probe."""
    rng = random.Random(f"{split}-templates")
    out = []
    for name in world["splits"][split]:
        answers = text_answers(world, name)
        for kind, templates in FACT_QUESTIONS.items():
            chosen = [rng.choice(templates)] if split == "probe" else templates
            out += [(kind, template.format(e=name), answers[kind]) for template in chosen]
    return out


def chat_transcript(question: str, answer: str) -> str:
    """A one-turn dialogue as the chat template renders it (default system prompt), for plain-text training."""
    return f"{DEFAULT_SYSTEM_PROMPT}\n\nUser: {question}\n\nAssistant: {answer}"


def text_corpus(world: dict[str, Any], split: str) -> list[str]:
    """A training split's language data: a statement about every name and a dialogue for every question."""
    statements = [
        f"The {name} is {answers['text/colour']} and has the number {answers['text/number']}."
        for name, answers in ((n, text_answers(world, n)) for n in world["splits"][split])
    ]
    return statements + [chat_transcript(q, a) for _, q, a in fact_questions(world, split)]


# ------------------------------------------------------------------------------------------------ dataset files


def make_sample(category: str, seed: int, split: str, index: int, size: int = 256) -> Sample:
    """Sample `index` of `category` in `split`: a pure function of its arguments."""
    return GENERATORS[category](random.Random(f"{seed}-{category}-{split}-{index}"), size)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def pretraining_text(caption: str, qa: list[tuple[str, str, str]]) -> str:
    """A caption followed by question/answer lines: the text of a stage-2 image document."""
    return " ".join([caption, *(f"Question: {q} Answer: {a}." for _, q, a in qa)])


def generate_dataset(
    out_dir: str | Path,
    seed: int = 0,
    train_per_category: int = 600,
    eval_per_kind: int = 40,
    size: int = 256,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write the demo data under `out_dir` and return its manifest (also written as manifest.json).

    Files: `images/{split}/{category}/{i}.png`; `images_train.jsonl` (every question per training image, for
    the vision warm-up); `stage1_pairs.jsonl` (image + caption); `stage2_interleaved.jsonl` (image + caption
    and Q/A text); `stage3_conversations.jsonl` (multi-turn SFT dialogues with the image); `text_warmup.jsonl`
    (stage 0's language data); `text_train.jsonl` (the language data of stage 2, other names);
    `text_dialogues.jsonl` (pure-text SFT, the same names as stage 2); `eval.jsonl` (held-out questions, balanced
    per kind) and, for the trainer's held-out losses, `eval_pairs.jsonl`, `eval_interleaved.jsonl`,
    `eval_conversations.jsonl` and `eval_text.jsonl`. Held-out images come from their own seed stream; held-out
    text questions are about names no training file contains.
    """
    out = Path(out_dir)
    train_rows, eval_rows = [], []
    for split, count in (("train", train_per_category), ("eval", None)):
        for category in VISUAL_CATEGORIES:
            folder = out / "images" / split / category
            folder.mkdir(parents=True, exist_ok=True)
            wanted = {k: eval_per_kind for k, kind in KINDS.items() if kind.category == category}
            index = 0
            while (count is not None and index < count) or (count is None and any(wanted.values())):
                sample = make_sample(category, seed, split, index, size)
                path = folder / f"{index}.png"
                row = {"image": str(path.relative_to(out)), "category": category, "caption": sample.caption}
                if split == "train":
                    sample.image.save(path)
                    train_rows.append({**row, "qa": sample.qa})
                else:
                    # one question per held-out image, of a kind still wanted (balanced evaluation)
                    qa = [item for item in sample.qa if wanted[item[0]] > 0]
                    if qa:
                        kind, question, answer = qa[random.Random(f"{seed}-pick-{category}-{index}").randrange(len(qa))]
                        wanted[kind] -= 1
                        sample.image.save(path)
                        eval_rows.append({**row, "kind": kind, "question": question, "answer": answer})
                index += 1
                if progress:
                    progress(1)
    world = text_world(seed)
    eval_rows += [
        {"category": "text", "kind": kind, "question": q, "answer": a, "image": None}
        for kind, q, a in fact_questions(world, "probe")
    ]
    _write_jsonl(out / "images_train.jsonl", train_rows)
    _write_jsonl(out / "stage1_pairs.jsonl", [{"image": r["image"], "text": r["caption"]} for r in train_rows])
    _write_jsonl(
        out / "stage2_interleaved.jsonl",
        [_document(r) for r in train_rows],
    )
    _write_jsonl(out / "stage3_conversations.jsonl", _conversations(train_rows, seed))
    _write_jsonl(out / "text_warmup.jsonl", [{"text": t} for t in text_corpus(world, "warmup")])
    _write_jsonl(out / "text_train.jsonl", [{"text": t} for t in text_corpus(world, "pretrain")])
    _write_jsonl(
        out / "text_dialogues.jsonl",
        [
            {"images": [], "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for _, q, a in fact_questions(world, "pretrain")
        ],
    )
    _write_jsonl(out / "eval.jsonl", eval_rows)
    visual_eval = [r for r in eval_rows if r["image"] is not None]
    _write_jsonl(out / "eval_pairs.jsonl", [{"image": r["image"], "text": r["caption"]} for r in visual_eval])
    _write_jsonl(out / "eval_interleaved.jsonl", [_document(r) for r in visual_eval])
    _write_jsonl(
        out / "eval_conversations.jsonl",
        [
            {"images": [r["image"]], "messages": [{"role": "user", "content": IMAGE_TOKEN + r["question"]},
                                                  {"role": "assistant", "content": r["answer"]}]}
            for r in visual_eval
        ],
    )
    _write_jsonl(
        out / "eval_text.jsonl", [{"text": chat_transcript(r["question"], r["answer"])} for r in eval_rows if r["image"] is None]
    )
    manifest = {
        "seed": seed,
        "image_size": size,
        "train_images": len(train_rows),
        "eval_questions": len(eval_rows),
        "chance": {kind: spec.chance for kind, spec in KINDS.items()},
        "categories": list(CATEGORIES),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _document(row: dict[str, Any]) -> dict[str, Any]:
    """A stage-2 interleaved document: the image, then its caption and question/answer text."""
    qa = row["qa"] if "qa" in row else [(row["kind"], row["question"], row["answer"])]
    return {"segments": [{"image": row["image"]}, {"text": pretraining_text(row["caption"], qa)}]}


def _conversations(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The SFT dialogues: SFT_DIALOGUES_PER_IMAGE per training image, each asking up to SFT_TURNS of its questions
    in random order, the image in the first turn.

    A dialogue costs one pass of the vision towers, most of a step's time, so every image gets the same number
    of dialogues and the images with many questions (scenes, charts, tables) give more answers per pass. Measured
    from one stage-2 model, 1600 SFT steps: charts 57% -> 88% held-out against dialogues made per question
    (six times as many for an OCR image as for a chart).
    """
    dialogues = []
    for index, row in enumerate(rows):
        rng = random.Random(f"{seed}-sft-{index}")
        for _ in range(SFT_DIALOGUES_PER_IMAGE):
            qa = rng.sample(row["qa"], min(SFT_TURNS, len(row["qa"])))
            messages = []
            for turn, (_, question, answer) in enumerate(qa):
                messages.append({"role": "user", "content": (IMAGE_TOKEN if turn == 0 else "") + question})
                messages.append({"role": "assistant", "content": answer})
            dialogues.append({"images": [row["image"]], "messages": messages})
    return dialogues


def tokenizer_corpus(seed: int = 0) -> list[str]:
    """Texts that cover the demo's vocabulary, for training the tiny tokenizer (so answers are few tokens)."""
    world = text_world(seed)
    lines = text_corpus(world, "warmup") + text_corpus(world, "pretrain")  # not the probe's names
    for category in VISUAL_CATEGORIES:
        for index in range(200):
            sample = make_sample(category, seed, "vocab", index, size=128)
            lines.append(pretraining_text(sample.caption, sample.qa))
    return lines
