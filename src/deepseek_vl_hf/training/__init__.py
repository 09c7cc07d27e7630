"""Training: the paper's three stages on the Hugging Face Trainer (freezing, recipes, callbacks, runner)."""

from deepseek_vl_hf.training.recipe import Recipe, RecipeError, load_recipe
from deepseek_vl_hf.training.stages import GROUPS, STAGE_GROUPS, apply_stage, group_of, trainable_groups

__all__ = [
    "GROUPS",
    "STAGE_GROUPS",
    "Recipe",
    "RecipeError",
    "apply_stage",
    "group_of",
    "load_recipe",
    "trainable_groups",
]
