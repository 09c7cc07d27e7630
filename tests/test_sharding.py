"""Per-rank data sharding and streaming sources: each rank (and loader worker) reads, decodes and encodes only
its own slots of the one seeded plan; resuming continues the plan; sharded streaming sources train.

The torchrun test runs 4 CPU processes (gloo) on the tiny stage-2 recipe (tests/sharding_worker.py logs
every encode and every batched example per process); the rest simulate ranks in one process.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter, defaultdict
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from deepseek_vl_hf.data import MixtureDataset, ModalitySchedule, Source
from deepseek_vl_hf.training import load_recipe
from deepseek_vl_hf.training.runner import parse_data, run_stage

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "data" / "tiny"
SCHEDULE = {"start_language_share": 0.5, "target_language_share": 0.5, "warmup_steps": 0}
WORLD, PER_DEVICE, STEPS = 4, 2, 4
EXAMPLES_PER_STEP = WORLD * PER_DEVICE


def stage2_overrides(out: Path, **extra) -> dict:
    return {
        "model.init_from": None,
        "model.preset": "tiny",
        "train.output_dir": str(out),
        "train.max_steps": STEPS,
        "train.per_device_batch_size": PER_DEVICE,
        "train.save_steps": 2,
        "train.logging_steps": 1,
        "data.max_length": 96,
        "data.eval": {},
        "data.schedule": SCHEDULE,
        **extra,
    }


def torchrun_worker(spec: dict, folder: Path) -> subprocess.CompletedProcess:
    path = folder / f"{spec['run']}.json"
    path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command += ["tests/sharding_worker.py", str(path)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def read_log(folder: Path, run: str) -> tuple[Counter, dict[int, list]]:
    """Encode calls per rank, and each rank's batched examples as (slot, source, ids)."""
    encodes, batched = Counter(), defaultdict(list)
    for path in folder.glob(f"{run}-*.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry["event"] == "encode":
                encodes[entry["rank"]] += 1
            else:
                batched[entry["rank"]].append((entry["slot"], entry["source"], tuple(entry["ids"])))
    return encodes, batched


def reference_plan(processor, steps: int) -> dict[int, tuple]:
    """The one-process stream of the same recipe and seed: slot -> (source, ids)."""
    recipe = load_recipe(REPO / "recipes" / "tiny" / "stage2.yaml", {"data.schedule": SCHEDULE})
    sources, schedule = parse_data(recipe)
    dataset = MixtureDataset(
        sources, processor, schedule, EXAMPLES_PER_STEP, group_by_modality=True, seed=0, max_length=96
    )
    return {
        e["slot"]: (e["source"], tuple(e["input_ids"])) for e in islice(dataset, steps * EXAMPLES_PER_STEP)
    }


def test_four_ranks_encode_only_their_share_and_a_killed_run_resumes_the_plan(tmp_path, tiny_pair):
    out, logs = tmp_path / "s2", tmp_path / "logs"
    logs.mkdir()
    recipe = str(REPO / "recipes" / "tiny" / "stage2.yaml")
    killed = torchrun_worker(
        {
            "run": "killed",
            "recipe": recipe,
            "overrides": stage2_overrides(out),
            "kill_at": 3,
            "log": str(logs),
        },
        tmp_path,
    )
    assert killed.returncode != 0 and (tmp_path / "s2-checkpoints" / "checkpoint-2").is_dir(), killed.stderr[
        -3000:
    ]
    assert not (tmp_path / "s2-checkpoints" / "checkpoint-4").exists()
    resumed = torchrun_worker(
        {
            "run": "resumed",
            "recipe": recipe,
            "overrides": stage2_overrides(out, **{"train.dataloader_num_workers": 2}),
            "resume": True,
            "log": str(logs),
        },
        tmp_path,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]

    reference = reference_plan(tiny_pair[1], STEPS + 6)  # loader workers prefetch ahead
    modality = {s.name: s.modality for s in parse_data(load_recipe(recipe))[0]}
    for run, first_step in (("killed", 0), ("resumed", 2)):
        encodes, batched = read_log(logs, run)
        slots = [slot for examples in batched.values() for slot, _, _ in examples]
        # No rank encodes what it does not train on, and no slot is encoded twice across ranks ...
        assert encodes == Counter({rank: len(examples) for rank, examples in batched.items()})
        assert len(slots) == len(set(slots))
        # ... each rank's slots are its per-device slice of every step ...
        for rank, examples in batched.items():
            assert all((slot % EXAMPLES_PER_STEP) // PER_DEVICE == rank for slot, _, _ in examples)
        # ... and together they are the one-process plan from where the run started, consumed steps whole.
        done = set(
            range(first_step * EXAMPLES_PER_STEP, (3 if run == "killed" else STEPS) * EXAMPLES_PER_STEP)
        )
        assert done <= set(slots) and min(slots) == first_step * EXAMPLES_PER_STEP
        assert all(reference[slot] == (source, ids) for ex in batched.values() for slot, source, ids in ex)
        by_step = defaultdict(set)
        for examples in batched.values():
            for slot, source, _ in examples:
                by_step[slot // EXAMPLES_PER_STEP].add(modality[source])
        assert all(len(kinds) == 1 for kinds in by_step.values())  # one modality per global step
    assert len({kinds.pop() for kinds in by_step.values()}) == 2  # both modalities occur
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["world_size"] == WORLD and meta["steps"] == STEPS
    planned = Counter(reference[slot][0] for slot in range(STEPS * EXAMPLES_PER_STEP))
    assert meta["data_mix"]["observed_examples"] == {name: planned[name] for name in modality}


# ------------------------------------------------------------------------------------------------------------
# Ranks simulated in one process.
# ------------------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def mixed_sources(tmp_path):
    rows = [{"image": str(TINY / "images" / f"{i:02d}.png"), "text": f"shape {i}"} for i in range(7)]
    rows[2]["image"] = "nowhere.png"  # a bad record: replaced by the next record of its order
    return [
        Source(
            "text", "text", str(write_jsonl(tmp_path / "t.jsonl", [{"text": f"text {i}"} for i in range(9)]))
        ),
        Source("pairs", "pairs", str(write_jsonl(tmp_path / "p.jsonl", rows))),
    ]


def signature(examples) -> list[tuple]:
    return [(e["slot"], e["source"], tuple(e["input_ids"])) for e in examples]


def rank_stream(sources, processor, rank, world, micro, steps, workers=0, position=0):
    dataset = MixtureDataset(
        sources,
        processor,
        ModalitySchedule(0.5, 0.5),
        examples_per_step=8,
        seed=3,
        rank=rank,
        world_size=world,
        micro_batch_size=micro,
    )
    dataset.load_state_dict({"position": position})
    share = steps * 8 // world - position // world
    if not workers:
        return signature(islice(dataset, share)), dataset
    loader = torch.utils.data.DataLoader(dataset, batch_size=micro, num_workers=workers, collate_fn=list)
    return signature(e for batch in islice(loader, share // micro) for e in batch), dataset


def test_ranks_and_workers_split_the_one_process_stream(mixed_sources, tiny_pair):
    """4 ranks x micro-batches of 1 (2 per step per rank), with and without 2 loader workers, and resumed at a
    step: together they are the one-process stream, bad-record replacements included."""
    processor = tiny_pair[1]
    whole, single = rank_stream(mixed_sources, processor, 0, 1, 8, steps=12)
    assert sum(single.stats["skipped"]["pairs"].values()) > 0  # the bad record was drawn and replaced
    for workers in (0, 2):
        union = sorted(
            e for rank in range(4) for e in rank_stream(mixed_sources, processor, rank, 4, 1, 12, workers)[0]
        )
        assert union == whole
    resumed = sorted(
        e
        for rank in range(4)
        for e in rank_stream(mixed_sources, processor, rank, 4, 1, 12, 2, position=40)[0]
    )
    assert resumed == whole[40:]


def test_a_bad_record_is_seen_by_its_rank_only(mixed_sources, tiny_pair):
    """Each bad draw is met, counted and replaced by the one rank whose slot drew it (before: by every rank)."""
    _, single = rank_stream(mixed_sources, tiny_pair[1], 0, 1, 8, steps=12)
    ranks = [rank_stream(mixed_sources, tiny_pair[1], rank, 4, 2, steps=12)[1] for rank in range(4)]
    assert [sum(dataset.stats["examples"].values()) for dataset in ranks] == [24] * 4
    skipped = [dataset.stats["skipped"]["pairs"].get("missing image", 0) for dataset in ranks]
    assert sum(skipped) == single.stats["skipped"]["pairs"]["missing image"] > 0


# ------------------------------------------------------------------------------------------------------------
# Streaming sources.
# ------------------------------------------------------------------------------------------------------------


def write_webdataset(folder: Path, shards: int, records: list[dict]) -> Path:
    """WebDataset tar shards: `key.json` (the record, its image refs naming the sample's members) + images."""
    folder.mkdir()
    for shard in range(shards):
        with tarfile.open(folder / f"shard-{shard:03d}.tar", "w") as tar:
            for index in range(shard, len(records), shards):
                record = json.loads(json.dumps(records[index]))
                members = {}
                for number, segment in enumerate(record.get("segments", [])):
                    if "image" in segment:
                        members[f"{number}.png"] = (TINY / segment["image"]).read_bytes()
                        segment["image"] = f"{number}.png"
                members["json"] = json.dumps(record).encode()
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"sample{index:05d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def write_parquet_shards(folder: Path, shards: int, rows: list[dict]) -> Path:
    folder.mkdir()
    for shard in range(shards):
        part = rows[shard::shards]
        table = pa.table(
            {"image": [{"bytes": r["image"], "path": None} for r in part], "text": [r["text"] for r in part]}
        )
        pq.write_table(table, folder / f"part-{shard:03d}.parquet")
    return folder


@pytest.fixture
def streaming_sources(tmp_path):
    interleaved = [json.loads(line) for line in (TINY / "interleaved.jsonl").read_text().splitlines()]
    interleaved = [  # 8 distinct documents, 2 per shard
        {"segments": [{"text": f"Document {i}."}, *interleaved[i % len(interleaved)]["segments"]]}
        for i in range(8)
    ]
    pairs = [json.loads(line) for line in (TINY / "pairs.jsonl").read_text().splitlines()]
    pair_rows = [{"image": (TINY / row["image"]).read_bytes(), "text": row["text"]} for row in pairs]
    return {
        "interleaved": write_webdataset(tmp_path / "web", 4, interleaved),
        "captions": write_parquet_shards(tmp_path / "captions", 4, pair_rows),
        "text": TINY / "text.jsonl",
    }


def test_streaming_shards_are_split_between_ranks_and_workers_and_resume(streaming_sources, tiny_pair):
    source = Source(
        "web", "interleaved", str(streaming_sources["interleaved"]), streaming=True, shuffle_buffer=4
    )
    count = 8

    def texts(rank, position=0, limit=None, world=2):
        dataset = MixtureDataset(
            [source],
            tiny_pair[1],
            examples_per_step=4,
            seed=1,
            rank=rank,
            world_size=world,
            micro_batch_size=1,
        )
        dataset.load_state_dict({"position": position})
        loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=list)
        return [(b[0]["slot"], tuple(b[0]["input_ids"])) for b in islice(loader, limit)]

    # 2 ranks x 2 workers = 4 readers of the 4 shards: one pass over the data is the first `count` slots.
    first_pass = sorted(e for rank in range(2) for e in texts(rank, limit=count // 2))
    assert len({ids for _, ids in first_pass}) == count
    full = texts(0, limit=8)
    assert texts(0, position=8, limit=4) == full[4:]  # resumed at step 2: rank 0 continues its readers


def test_streaming_webdataset_and_parquet_shards_train_the_tiny_stage2(streaming_sources, tmp_path):
    out = tmp_path / "s2"
    recipe = load_recipe(
        REPO / "recipes" / "tiny" / "stage2.yaml",
        {
            **stage2_overrides(out, **{"train.max_steps": 3, "train.save_steps": 10}),
            "data.sources": [
                {
                    "name": "interleaved",
                    "kind": "interleaved",
                    "path": str(streaming_sources["interleaved"]),
                    "streaming": True,
                },
                {
                    "name": "captions",
                    "kind": "pairs",
                    "path": str(streaming_sources["captions"]),
                    "streaming": True,
                },
                {"name": "text", "kind": "text", "path": str(streaming_sources["text"]), "streaming": True},
            ],
        },
    )
    assert run_stage(recipe) == out
    meta = json.loads((out / "training_metadata.json").read_text())
    assert meta["steps"] == 3 and sum(meta["data_mix"]["observed_examples"].values()) == 3 * PER_DEVICE
    assert all(source["streaming"] for source in meta["data_mix"]["sources"])
    assert meta["final_metrics"]["train_loss"] > 0


# ------------------------------------------------------------------------------------------------------------
# The scale model (docs/scaling.md).
# ------------------------------------------------------------------------------------------------------------


def test_scale_model_counts_the_7b_and_its_document_is_generated_from_the_current_assumptions():
    from bench import scaling_model

    params = scaling_model.parameter_counts()
    assert params["language_model"] + params["embed_tokens"] == 6_910_365_696  # DeepSeek-LLM 7B
    costs = {"decode_ms": 50.0, "preprocess_ms": 150.0, "encode_text_ms": 100.0, "text_tokens": 4000}
    packed, unpacked = scaling_model.project(costs, params, per_device=4)
    assert packed["images_per_multimodal_sequence"] == pytest.approx(4096 / (576 + 75))
    # language steps: 4 x 4096 tokens at 8N + 16 l d T FLOPs each, at 57% of 312 TFLOPS
    flops = 4 * 4096 * (8 * params["language_model"] + 16 * 30 * 4096 * 4096)
    assert packed["step_s"]["language"] == pytest.approx(flops / (0.57 * 312e12))
    assert packed["data_s"]["multimodal"] == pytest.approx(
        4 * (packed["images_per_multimodal_sequence"] * 0.2 + 4096 * 0.025e-3)
    )
    assert 0.4 < packed["mfu"] < 0.57 * 6 / 8 + 0.01  # recomputed forwards are not model FLOPs
    assert packed["workers_unsharded"] > 100 * packed["workers_average"]
    assert (
        unpacked["tokens_per_multimodal_sequence"] < 4096
        and unpacked["step_s"]["multimodal"] < packed["step_s"]["multimodal"]
    )
    block = (
        (REPO / "docs" / "scaling.md").read_text().split(scaling_model.BEGIN)[1].split(scaling_model.END)[0]
    )
    assert "python -m bench.scaling_model --write" in block
    assert all(
        f"- `{name}` = {v:g}: {source}" in block for name, (v, source) in scaling_model.ASSUMPTIONS.items()
    )
