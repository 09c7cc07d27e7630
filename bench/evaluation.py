"""The lmms-eval plugin's throughput on the tiny offline task: samples/s at batch 8 against batch 1, same plugin
instance, same requests (the demo tasks' questions on 256 px images, asked of the tiny random-weight model loaded
from a saved folder with `trust_remote_code=True`).

`generate_until` uses the tasks' own settings (at most 6 new tokens, greedy); `loglikelihood` scores 4 one-token
choices per question (lmms-eval's `multiple_choice` pattern). Each row checks that batching changes nothing:
the same answers, log-likelihoods within 1e-4. The harness's own start-up (task indexing, model loading; about
half a minute per `lmms-eval` command on a quiet 2-core CPU) is not in these rows.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .harness import Row, combined_cpu_wall, interleaved

TITLE = "lmms-eval plugin throughput on the tiny task (tiny model, fp32)"
LABELS = ("batch 8", "batch 1")
LOGLIKELIHOOD_TOLERANCE = 1e-4


def _docs(count: int, size: int) -> list[dict[str, Any]]:
    """`count` held-out-style questions on `size` px images, cycling over the demo's visual categories."""
    from deepseek_vl_hf.demo.synthetic import VISUAL_CATEGORIES, make_sample

    docs = []
    for index in range(count):
        category = VISUAL_CATEGORIES[index % len(VISUAL_CATEGORIES)]
        sample = make_sample(category, 0, "bench", index, size)
        _, question, answer = sample.qa[0]
        docs.append({"image": sample.image, "question": question, "answer": answer})
    return docs


def _requests(lm, docs: list[dict[str, Any]], kind: str, seconds: list[Any]) -> list:
    """lmms-eval `Instance`s of a simple model's task `bench` over `docs` (one per entry of `seconds`)."""
    from lmms_eval.api.instance import Instance

    from deepseek_vl_hf.evaluation.demo_tasks import doc_to_text, doc_to_visual

    lm.task_dict = {"bench": {"test": docs}}
    return [
        Instance(request_type=kind, arguments=(doc_to_text(docs[i]), second, doc_to_visual, i, "bench", "test"),
                 idx=0, metadata={"task": "bench", "doc_id": i, "repeats": 1})
        for i, second in seconds
    ]


def run(mode: str) -> list[Row]:
    """samples/s of generate_until and loglikelihood at batch 8 vs 1 (smoke: batch 2 vs 1, 4 questions, 64 px)."""
    from deepseek_vl_hf.checkpoint import build_random_model, save_checkpoint
    from deepseek_vl_hf.evaluation.demo_tasks import generation_kwargs
    from deepseek_vl_hf.evaluation.lmms_eval_model import DeepseekVLHF

    count = {"full": 32, "quick": 16, "smoke": 4}[mode]
    repeats = {"full": 3, "quick": 1, "smoke": 1}[mode]
    big = 2 if mode == "smoke" else 8
    docs = _docs(count, 64 if mode == "smoke" else 256)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_checkpoint(*build_random_model("tiny", seed=0), Path(tmp) / "tiny")
        lm = DeepseekVLHF(pretrained=str(folder), dtype="float32")
    gen = _requests(lm, docs, "generate_until", [(i, generation_kwargs()) for i in range(count)])
    choices = [f" {c}" for c in ("A", "B", "C", "D")]
    ll = _requests(lm, docs, "loglikelihood", [(i, c) for i in range(count) for c in choices])

    def call(method, requests, batch):
        lm.batch_size = batch
        return method(requests)

    rows = []
    for name, method, requests in (("generate_until", lm.generate_until, gen),
                                   ("loglikelihood, 4 choices", lm.loglikelihood, ll)):
        t = interleaved({"big": lambda m=method, r=requests: call(m, r, big),
                         "one": lambda m=method, r=requests: call(m, r, 1)}, repeats=repeats, warmup=1)
        big_out, one_out = t["big"].result, t["one"].result
        if name == "generate_until":
            correct = big_out == one_out
            note = f"same {count} answers at both batch sizes: {correct}"
        else:
            diff = max(abs(a[0] - b[0]) for a, b in zip(big_out, one_out))
            correct = diff <= LOGLIKELIHOOD_TOLERANCE and [a[1] for a in big_out] == [b[1] for b in one_out]
            note = f"max log-likelihood difference {diff:.1e} (<= {LOGLIKELIHOOD_TOLERANCE:g} wanted)"
        rows.append(Row(f"{name} ({count} questions), batch {big} vs 1", "samples/s", count / t["big"].median,
                        count / t["one"].median, combined_cpu_wall(t["big"], t["one"]), higher_is_better=True,
                        note=note, correct=correct))
    return rows
