"""Training data: record formats, labels, truncation, bad records, the mixture sampler and the collator."""

from __future__ import annotations

import json
import logging
from itertools import islice

import pytest
import torch

from deepseek_vl_hf.data import (
    IGNORE_INDEX,
    BadRecord,
    MixtureDataset,
    ModalitySchedule,
    Source,
    VLCollator,
    encode_record,
    read_records,
)
from tests.conftest import make_image

SYSTEM = "Be brief."


@pytest.fixture
def processor(tiny_pair):
    return tiny_pair[1]


@pytest.fixture
def png(tmp_path):
    """A small PNG next to the data files, named by its path relative to tmp_path."""
    make_image(40, 30, seed=1).save(tmp_path / "red.png")
    return "red.png"


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        for line in extra_lines:
            handle.write(line + "\n")
    return path


def only_record(path, kind):
    (record,) = list(read_records(path, kind))
    return record


def tok(processor, text):
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def specials(processor):
    t = processor.tokenizer
    return t.bos_token_id, t.eos_token_id, [processor.image_token_id] * processor.num_image_tokens


def masked(ids):
    return [IGNORE_INDEX] * len(ids)


# ------------------------------------------------------------------------------------------------------------
# Labels, per format: exact positions.
# ------------------------------------------------------------------------------------------------------------


def test_pairs_label_all_text_and_eos_never_bos_or_image(processor, tmp_path, png):
    record = only_record(
        write_jsonl(tmp_path / "pairs.jsonl", [{"image": png, "text": "a red circle"}]), "pairs"
    )
    out = encode_record(record, "pairs", processor, 512, "all")
    bos, eos, image = specials(processor)
    text = tok(processor, "a red circle")
    assert out["input_ids"] == [bos, *image, *text, eos]
    assert out["labels"] == [IGNORE_INDEX, *masked(image), *text, eos]
    assert len(out["images"]) == 1 and out["images"][0].size == (40, 30)


def test_interleaved_and_mmc4_label_all_text(processor, tmp_path, png):
    rows = [
        {"segments": [{"text": "Intro"}, {"image": png}, {"text": "Caption"}]},
        {"text_list": ["Intro", "Caption"], "image_info": [{"image_name": png, "matched_text_index": 1}]},
    ]
    canonical, mmc4 = read_records(write_jsonl(tmp_path / "docs.jsonl", rows), "interleaved")
    assert mmc4 == canonical
    out = encode_record(canonical, "interleaved", processor, 512, "all")
    bos, eos, image = specials(processor)
    before, after = tok(processor, "Intro\n"), tok(processor, "\nCaption")
    assert out["input_ids"] == [bos, *before, *image, *after, eos]
    assert out["labels"] == [IGNORE_INDEX, *before, *masked(image), *after, eos]


def test_text_labels_all_but_bos(processor, tmp_path):
    record = only_record(write_jsonl(tmp_path / "text.jsonl", [{"text": "the quick brown fox"}]), "text")
    out = encode_record(record, "text", processor, 512, "all")
    bos, eos, _ = specials(processor)
    text = tok(processor, "the quick brown fox")
    assert out["input_ids"] == [bos, *text, eos]
    assert out["labels"] == [IGNORE_INDEX, *text, eos]
    assert out["images"] == []


def test_conversation_with_system_and_two_turns_supervises_only_answers(processor, tmp_path, png):
    row = {
        "images": [png],
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "<image_placeholder>\nWhat is it?"},
            {"role": "assistant", "content": "A red square."},
            {"role": "user", "content": "Color?"},
            {"role": "assistant", "content": "Red."},
        ],
    }
    record = only_record(write_jsonl(tmp_path / "chat.jsonl", [row]), "conversations")
    out = encode_record(record, "conversations", processor, 512, "assistant")
    bos, eos, image = specials(processor)
    system_user = tok(processor, f"{SYSTEM}\n\nUser: ")
    question = tok(processor, "\nWhat is it?\n\nAssistant:")
    answer1 = tok(processor, " A red square.")
    user2 = tok(processor, "User: Color?\n\nAssistant:")
    answer2 = tok(processor, " Red.")
    assert out["input_ids"] == [bos, *system_user, *image, *question, *answer1, eos, *user2, *answer2, eos]
    prompt_labels = masked([bos, *system_user, *image, *question])
    assert out["labels"] == [*prompt_labels, *answer1, eos, *masked(user2), *answer2, eos]


def test_llava_and_content_list_conversations_match_canonical(processor, tmp_path, png):
    rows = [
        {
            "images": [png],
            "messages": [
                {"role": "user", "content": "<image_placeholder>\nWhat?"},
                {"role": "assistant", "content": "Red."},
            ],
        },
        {
            "image": png,
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}],
        },
    ]
    canonical, llava = read_records(write_jsonl(tmp_path / "chat.jsonl", rows), "conversations")
    assert llava == canonical
    out = encode_record(llava, "conversations", processor, 512, "assistant")
    _, eos, _ = specials(processor)
    supervised = [t for t, label in zip(out["input_ids"], out["labels"]) if label != IGNORE_INDEX]
    assert supervised == [*tok(processor, " Red."), eos]
    assert out["labels"][-len(supervised) :] == out["input_ids"][-len(supervised) :]
    content_list = {
        "images": canonical["images"],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        ],
    }
    assert (
        encode_record(content_list, "conversations", processor, 512, "assistant")["labels"] == out["labels"]
    )


def test_marked_answers_label_like_the_prefix_rendering(processor, tmp_path, png):
    """The template's {% generation %} marks (one render) and the fallback of rendering up to each answer (for
    templates without marks) give the same labels, and TRL-style assistant masks see the same answers."""
    import copy

    from deepseek_vl_hf.data.encoding import GENERATION_TAG

    chats = [
        [{"role": "user", "content": "<image_placeholder> What?"}, {"role": "assistant", "content": "Red."}],
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Shape?"}]},
            {"role": "assistant", "content": "A square."},
            {"role": "user", "content": "And the colour?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Red, mostly."}]},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes."},
        ],
    ]
    unmarked = copy.copy(processor)
    unmarked.chat_template = GENERATION_TAG.sub("", processor.chat_template).replace("{% endgeneration %}", "")
    assert GENERATION_TAG.search(processor.chat_template) and not GENERATION_TAG.search(unmarked.chat_template)
    for messages in chats:
        record = {"images": [str(tmp_path / png)], "messages": messages}
        with_marks = encode_record(record, "conversations", processor, 512, "assistant")
        without = encode_record(record, "conversations", unmarked, 512, "assistant")
        assert with_marks["input_ids"] == without["input_ids"]
        assert with_marks["labels"] == without["labels"]
        assert sum(label != IGNORE_INDEX for label in with_marks["labels"]) > len(messages) // 2
    text = processor.apply_chat_template(chats[1], tokenize=False)
    from transformers.utils.chat_template_utils import render_jinja_template

    _, (spans,) = render_jinja_template([chats[1]], chat_template=processor.chat_template,
                                        return_assistant_tokens_mask=True)
    assert [text[a:b] for a, b in spans] == [
        " A square.<｜end▁of▁sentence｜>", " Red, mostly.<｜end▁of▁sentence｜>", " Yes.<｜end▁of▁sentence｜>"
    ]


def test_json_parquet_and_datasets_folders_read_like_jsonl(tmp_path, png):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = [
        {
            "images": [png],
            "messages": [
                {"role": "user", "content": "<image_placeholder> hi"},
                {"role": "assistant", "content": "hello"},
            ],
        }
    ]
    expected = list(read_records(write_jsonl(tmp_path / "chat.jsonl", rows), "conversations"))
    (tmp_path / "chat.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "chat_ds"))
    for name in ("chat.json", "chat.parquet", "chat_ds"):
        assert list(read_records(tmp_path / name, "conversations")) == expected, name


def test_image_bytes_in_parquet_and_datasets_folders(processor, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, Features, Image, Value

    make_image(20, 20, seed=2).save(tmp_path / "a.png")
    good = {"image": {"bytes": (tmp_path / "a.png").read_bytes(), "path": None}, "text": "square"}
    corrupt = {"image": {"bytes": b"not an image", "path": None}, "text": "broken"}
    pq.write_table(pa.Table.from_pylist([good]), tmp_path / "pairs.parquet")
    out = encode_record(only_record(tmp_path / "pairs.parquet", "pairs"), "pairs", processor, 512, "all")
    assert out["images"][0].size == (20, 20)
    features = Features({"image": Image(), "text": Value("string")})
    Dataset.from_list([good, corrupt], features=features).save_to_disk(str(tmp_path / "pairs_ds"))
    first, second = read_records(tmp_path / "pairs_ds", "pairs")
    assert encode_record(first, "pairs", processor, 512, "all")["images"][0].size == (20, 20)
    with pytest.raises(BadRecord, match="corrupt image"):
        encode_record(second, "pairs", processor, 512, "all")


# ------------------------------------------------------------------------------------------------------------
# Truncation.
# ------------------------------------------------------------------------------------------------------------


def test_truncation_never_cuts_through_an_image(processor, tmp_path, png):
    record = {"segments": [{"text": "one two"}, {"image": str(tmp_path / png)}, {"text": "three"}]}
    bos, eos, image = specials(processor)
    head = [bos, *tok(processor, "one two\n")]
    for max_length in (len(head), len(head) + 1, len(head) + len(image) - 1):
        out = encode_record(record, "interleaved", processor, max_length, "all")
        assert out["input_ids"] == head and out["images"] == []
    out = encode_record(record, "interleaved", processor, len(head) + len(image), "all")
    assert out["input_ids"] == [*head, *image] and len(out["images"]) == 1


def test_over_long_with_nothing_supervised_left_is_a_bad_record(processor, png):
    with pytest.raises(BadRecord, match="over-long") as caught:
        encode_record({"image": png, "text": "a red circle"}, "pairs", processor, 20, "all")
    assert caught.value.reason == "over-long"
    chat = {
        "images": [],
        "messages": [{"role": "user", "content": "x " * 100}, {"role": "assistant", "content": "y"}],
    }
    with pytest.raises(BadRecord, match="over-long"):
        encode_record(chat, "conversations", processor, 64, "assistant")


# ------------------------------------------------------------------------------------------------------------
# Bad records.
# ------------------------------------------------------------------------------------------------------------


def chat_row(images, question="<image_placeholder> What?"):
    return {
        "images": images,
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "Red."}],
    }


def test_bad_records_are_skipped_and_counted_by_reason(processor, tmp_path, png, caplog):
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    rows = [
        chat_row([png]),
        chat_row(["nowhere.png"]),
        chat_row(["corrupt.png"]),
        chat_row([png], "<image_placeholder> and <image_placeholder>?"),
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows, extra_lines=['{"images": [', '["a list"]'])
    reasons = []
    for record in read_records(path, "conversations"):
        try:
            encode_record(record, "conversations", processor, 512, "assistant")
        except BadRecord as err:
            reasons.append(err.reason)
    expected = ["missing image", "corrupt image", "placeholder mismatch", "malformed", "malformed"]
    assert reasons == expected

    dataset = MixtureDataset([Source("chat", "conversations", str(path))], processor, max_length=512)
    with caplog.at_level(logging.WARNING, logger="deepseek_vl_hf.data"):
        examples = list(islice(dataset, 30))
    assert all(example["input_ids"] == examples[0]["input_ids"] for example in examples)
    skipped = dataset.stats["skipped"]["chat"]
    assert set(skipped) == set(expected) and all(count > 0 for count in skipped.values())
    assert dataset.stats["examples"] == {"chat": 30}
    assert any("missing image" in record.getMessage() for record in caplog.records)


def test_a_source_of_only_bad_records_raises_naming_it(processor, tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [chat_row(["nowhere.png"])] * 3, extra_lines=["{"])
    dataset = MixtureDataset([Source("broken_set", "conversations", str(path))], processor, max_length=512)
    with pytest.raises(RuntimeError, match=r"'broken_set'.*no usable record.*all 4"):
        next(iter(dataset))


# ------------------------------------------------------------------------------------------------------------
# Mixture sampler.
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture
def sources(tmp_path):
    make_image(8, 8, seed=3).save(tmp_path / "s.png")
    write_jsonl(tmp_path / "web.jsonl", [{"text": f"web text {i}"} for i in range(12)])
    write_jsonl(tmp_path / "books.jsonl", [{"text": f"book text {i}"} for i in range(8)])
    write_jsonl(tmp_path / "pairs.jsonl", [{"image": "s.png", "text": f"square {i}"} for i in range(6)])
    dialogue = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"hello {i}"}]}
        for i in range(10)
    ]
    write_jsonl(tmp_path / "dialogue.jsonl", dialogue)
    return [
        Source("web", "text", str(tmp_path / "web.jsonl"), weight=3.0),
        Source("books", "text", str(tmp_path / "books.jsonl"), weight=1.0),
        Source("pairs", "pairs", str(tmp_path / "pairs.jsonl"), weight=1.0),
    ]


def mixture(sources, processor, **kwargs):
    settings = dict(
        schedule=ModalitySchedule(target_language_share=0.7),
        examples_per_step=1,
        group_by_modality=True,
        seed=0,
        max_length=256,
    )
    return MixtureDataset(sources, processor, **{**settings, **kwargs})


def test_observed_shares_follow_weights_and_schedule(sources, processor):
    """Tolerance: each source's share within 0.05 of its target over 2000 draws (a share's std <= 0.011)."""
    dataset = mixture(sources, processor)
    list(islice(dataset, 2000))
    counts = dataset.observed_shares()
    shares = {name: count / 2000 for name, count in counts.items()}
    assert shares == pytest.approx({"web": 0.7 * 0.75, "books": 0.7 * 0.25, "pairs": 0.3}, abs=0.05)


def test_grouping_makes_each_step_single_modality(sources, processor):
    modality = {source.name: source.modality for source in sources}
    grouped = mixture(sources, processor, examples_per_step=8)
    steps = [list(islice(grouped, 8)) for _ in range(25)]
    assert all(len({modality[example["source"]] for example in step}) == 1 for step in steps)
    plans = [grouped.step_sources(step) for step in range(500)]
    assert all(len({sources[i].modality for i in plan}) == 1 for plan in plans)
    mixed = mixture(sources, processor, examples_per_step=8, group_by_modality=False)
    assert any(len({sources[i].modality for i in mixed.step_sources(step)}) == 2 for step in range(50))


def test_modality_warmup_starts_at_language_only_and_reaches_the_target(sources, processor):
    schedule = ModalitySchedule(start_language_share=1.0, target_language_share=0.3, warmup_steps=100)
    assert [schedule.language_share(s) for s in (0, 50, 100, 5000)] == pytest.approx([1.0, 0.65, 0.3, 0.3])
    for seed in range(20):
        plan = mixture(sources, processor, schedule=schedule, examples_per_step=4, seed=seed).step_sources(0)
        assert {sources[i].modality for i in plan} == {"text"}
    dataset = mixture(sources, processor, schedule=schedule, examples_per_step=4)
    late = [sources[dataset.step_sources(step)[0]].modality for step in range(1000, 3000)]
    assert late.count("text") / len(late) == pytest.approx(0.3, abs=0.05)


def test_single_modality_collapses_the_schedule(sources, processor, tmp_path):
    dialogue = Source("dialogue", "conversations", str(tmp_path / "dialogue.jsonl"), text_only=True)
    assert dialogue.modality == "text" and dialogue.supervise == "assistant"
    only_images = mixture(sources[2:], processor)
    assert only_images.language_share(0) == 0.0
    only_text = mixture(
        [sources[0], dialogue], processor, schedule=ModalitySchedule(target_language_share=0.2)
    )
    assert only_text.language_share(10) == 1.0
    assert {example["source"] for example in islice(only_text, 40)} == {"web", "dialogue"}


def signature(examples):
    return [
        (example["source"], tuple(example["input_ids"]), tuple(example["labels"])) for example in examples
    ]


def test_resume_from_state_dict_continues_identically(sources, processor, tmp_path):
    write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"image": "s.png", "text": f"square {i}"} for i in range(6)]
        + [{"image": "nowhere.png", "text": "lost"}] * 2,
    )
    uninterrupted = mixture(sources, processor, examples_per_step=4)
    expected = signature(islice(uninterrupted, 130))

    first = mixture(sources, processor, examples_per_step=4)
    head = signature(islice(first, 57))  # mid-step, and past a full pass over every source
    state = first.state_dict()
    assert head == expected[:57] and sum(state["stats"]["skipped"]["pairs"].values()) > 0
    resumed = mixture(sources, processor, examples_per_step=4)
    resumed.load_state_dict(state)
    assert signature(islice(resumed, 73)) == expected[57:]
    assert resumed.stats["examples"] == uninterrupted.stats["examples"]
    from_position = mixture(sources, processor, examples_per_step=4)
    from_position.load_state_dict({"position": 57})
    assert signature(islice(from_position, 73)) == expected[57:]


def test_data_loader_workers_yield_whole_steps_in_stream_order(sources, processor):
    expected = signature(islice(mixture(sources, processor, examples_per_step=4), 40))
    loader = torch.utils.data.DataLoader(
        mixture(sources, processor, examples_per_step=4), batch_size=4, num_workers=2, collate_fn=list
    )
    assert signature(example for batch in islice(loader, 10) for example in batch) == expected


def test_same_seed_same_stream_other_seed_other_stream(sources, processor):
    def stream(seed):
        return signature(islice(mixture(sources, processor, examples_per_step=4, seed=seed), 60))

    assert stream(1) == stream(1)
    assert stream(1) != stream(2)


# ------------------------------------------------------------------------------------------------------------
# Collator.
# ------------------------------------------------------------------------------------------------------------


def test_collator_right_pads_and_stacks_pixel_values(processor, png, tmp_path):
    with_image = encode_record(
        {"image": str(tmp_path / png), "text": "a red circle"}, "pairs", processor, 512, "all"
    )
    text_only = encode_record({"text": "hi"}, "text", processor, 512, "all")
    collate = VLCollator(pad_token_id=processor.pad_token_id, image_processor=processor.image_processor)
    batch = collate([text_only, with_image])
    width = len(with_image["input_ids"])
    short = len(text_only["input_ids"])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    assert batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (width - short)
    assert batch["input_ids"][0, short:].eq(processor.pad_token_id).all()
    assert batch["labels"][0].tolist() == text_only["labels"] + [IGNORE_INDEX] * (width - short)
    assert batch["labels"][1].tolist() == with_image["labels"]
    size = processor.image_processor.image_size
    assert batch["pixel_values"].shape == (1, 3, size, size) and batch["pixel_values"].dtype == torch.float32
    assert "pixel_values" not in collate([text_only, text_only])
