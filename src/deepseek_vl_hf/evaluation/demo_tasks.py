"""The demo's held-out questions as offline lmms-eval tasks: `deepseek_vl_demo_{scene,ocr,chart,document,geometry}`
and their group `deepseek_vl_demo`.

The YAMLs ship in `deepseek_vl_hf/evaluation/tasks/`; `write_task_folder` copies them next to one parquet file per
category (images embedded) made from a data folder of `deepseek_vl_hf.demo.synthetic.generate_dataset`
(`eval.jsonl`), so `lmms-eval --include_path FOLDER` runs without network. The functions below are what the
YAMLs call: the prompt is the question, and scoring is the demo evaluator's own normalised exact match.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

from deepseek_vl_hf.atomic import atomic_directory
from deepseek_vl_hf.demo.evaluate import normalize_answer
from deepseek_vl_hf.demo.synthetic import VISUAL_CATEGORIES
from deepseek_vl_hf.evaluation import TASKS_DIR

GROUP = "deepseek_vl_demo"


def task_name(category: str) -> str:
    return f"{GROUP}_{category}"


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Exact match as the demo's evaluator scores it (`deepseek_vl_hf.demo.evaluate.normalize_answer`)."""
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}


def generation_kwargs() -> dict[str, Any]:
    """The tasks' `generation_kwargs`, read from the shipped template (its `!function` tags are not resolved)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    with open(TASKS_DIR / f"_{GROUP}_yaml", encoding="utf-8") as handle:
        return yaml.load(handle, Loader=_Loader)["generation_kwargs"]  # noqa: S506 (a SafeLoader subclass)


def read_questions(data_dir: str | Path) -> list[dict[str, Any]]:
    """The held-out questions with an image (`eval.jsonl` rows), in file order."""
    with open(Path(data_dir) / "eval.jsonl", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [row for row in rows if row["image"] is not None]


def write_task_folder(data_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the task YAMLs and `{category}.parquet` (question, answer, kind, category, image bytes, path) for
    every visual category of `data_dir/eval.jsonl` into `out_dir` (replaced whole); returns `out_dir`."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    data_dir = Path(data_dir)
    questions = read_questions(data_dir)
    missing = [c for c in VISUAL_CATEGORIES if not any(q["category"] == c for q in questions)]
    if missing:
        raise ValueError(f"{data_dir / 'eval.jsonl'} has no held-out questions of {missing}; write it with "
                         "deepseek_vl_hf.demo.synthetic.generate_dataset")
    features = Features({"question": Value("string"), "answer": Value("string"), "kind": Value("string"),
                         "category": Value("string"), "path": Value("string"), "image": ImageFeature()})
    with atomic_directory(out_dir, overwrite=True) as tmp:
        for source in TASKS_DIR.iterdir():
            if source.name.endswith(("yaml", "_yaml")):
                shutil.copyfile(source, tmp / source.name)
        for category in VISUAL_CATEGORIES:
            rows = [
                {"question": q["question"], "answer": q["answer"], "kind": q["kind"], "category": category,
                 "path": q["image"], "image": {"bytes": (data_dir / q["image"]).read_bytes(), "path": None}}
                for q in questions if q["category"] == category
            ]
            Dataset.from_list(rows, features=features).to_parquet(str(tmp / f"{category}.parquet"))
    return Path(out_dir)
