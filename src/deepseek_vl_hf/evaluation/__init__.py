"""Evaluation with lmms-eval: the `deepseek_vl_hf` model plugin, offline tasks on the demo's data, and the harness
runner behind `deepseek-vl-hf eval`.

lmms-eval finds the plugin through the `lmms_eval.models` entry point, which calls `lmms_eval_models` below; this
module imports nothing heavy, so registering costs lmms-eval nothing until the model is asked for.
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "deepseek_vl_hf"
TASKS_DIR = Path(__file__).parent / "tasks"


def lmms_eval_models():
    """The entry point's payload: lmms-eval's manifest for `--model deepseek_vl_hf` (a "simple" model class)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_NAME, simple_class_path="deepseek_vl_hf.evaluation.lmms_eval_model.DeepseekVLHF"
    )
