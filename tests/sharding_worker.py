"""Worker of tests/test_sharding.py: `torchrun --nproc_per_node N tests/sharding_worker.py SPEC.json`.

Runs `run_stage` on a recipe (SPEC: "recipe", "overrides", "resume", "kill_at", "log") and records, in
LOG/<run>-<pid>.jsonl of each process (ranks and their loader workers), every record the mixture encodes and
every example the collator batches (slot, source, token ids). With "kill_at", every rank SIGKILLs itself at
the end of that optimizer step, as a crashed job would end.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

import deepseek_vl_hf.data.mixture as mixture
from deepseek_vl_hf.training.recipe import load_recipe
from deepseek_vl_hf.training.runner import SourceTaggingCollator, run_stage


def main(spec: dict) -> None:
    log_dir = Path(spec["log"])
    rank = int(os.environ["RANK"])

    def log(entry: dict) -> None:
        with open(log_dir / f"{spec['run']}-{os.getpid()}.jsonl", "a") as handle:
            handle.write(json.dumps({"rank": rank, **entry}) + "\n")

    encode = mixture.encode_record

    def counted_encode(record, kind, *args, **kwargs):
        log({"event": "encode", "kind": kind})
        return encode(record, kind, *args, **kwargs)

    collate = SourceTaggingCollator.__call__

    def logged_collate(self, features):
        for feature in features:
            log(
                {
                    "event": "batch",
                    "slot": feature["slot"],
                    "source": feature["source"],
                    "ids": feature["input_ids"],
                }
            )
        return collate(self, features)

    mixture.encode_record = counted_encode
    SourceTaggingCollator.__call__ = logged_collate

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == spec.get("kill_at"):
                os.kill(os.getpid(), signal.SIGKILL)

    recipe = load_recipe(spec["recipe"], spec["overrides"])
    run_stage(recipe, resume=spec.get("resume", False), callbacks=[Kill()])


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
