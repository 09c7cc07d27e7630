"""Which parameters train in each of the paper's three stages (DeepSeek-VL, arXiv 2403.05525, section 3.2).

Every parameter belongs to exactly one group:

| group            | modules                                              | stage 1 | stage 2 | stage 3 |
|------------------|------------------------------------------------------|---------|---------|---------|
| `aligner`        | `model.aligner` (the VL adapter)                     | train   | train   | train   |
| `sam_new_layers` | SAM `downsamples`, `neck_hd`, `hd_alpha_downsamples` | train   | train   | train   |
| `language_model` | `model.language_model`, `lm_head`                    | frozen  | train   | train   |
| `siglip`         | the whole SigLIP branch                              | frozen  | frozen  | train   |
| `sam_body`       | SAM-B: `patch_embed`, `pos_embed`, `blocks`, `neck`  | frozen  | frozen  | frozen  |

`sam_new_layers` are the layers SAM-B does not have: the paper counts the downsampling convs as part of the
adapter; `neck_hd` and `hd_alpha` are new too.
A recipe's `trainable:` mapping (group -> bool) overrides single groups, e.g. `{sam_new_layers: false}`.
The official code differs in one detail: its `freeze_high=False` also keeps SAM's own `neck` trainable
(substring match on "neck"); here the pretrained neck belongs to the frozen SAM-B body.
"""

from __future__ import annotations

from torch import nn

GROUPS: dict[str, tuple[str, ...]] = {
    "aligner": ("model.aligner",),
    "sam_new_layers": (
        "model.vision_model.sam.downsamples",
        "model.vision_model.sam.neck_hd",
        "model.vision_model.sam.hd_alpha_downsamples",
    ),
    "language_model": ("model.language_model", "lm_head"),
    "siglip": ("model.vision_model.siglip",),
    "sam_body": (
        "model.vision_model.sam.patch_embed",
        "model.vision_model.sam.pos_embed",
        "model.vision_model.sam.blocks",
        "model.vision_model.sam.neck",
    ),
}

STAGE_GROUPS: dict[int, tuple[str, ...]] = {
    1: ("aligner", "sam_new_layers"),
    2: ("aligner", "sam_new_layers", "language_model"),
    3: ("aligner", "sam_new_layers", "language_model", "siglip"),
}


def group_of(parameter_name: str) -> str:
    """The group a parameter belongs to; a name outside every group is an error (a new module needs one)."""
    for group, prefixes in GROUPS.items():
        if any(parameter_name == p or parameter_name.startswith(p + ".") for p in prefixes):
            return group
    raise ValueError(
        f"parameter {parameter_name!r} belongs to no training group; add its module to stages.GROUPS"
    )


def trainable_groups(stage: int, overrides: dict[str, bool] | None = None) -> list[str]:
    """The groups that train in `stage`, after the recipe's per-group overrides."""
    if stage not in STAGE_GROUPS:
        raise ValueError(f"stage must be one of {sorted(STAGE_GROUPS)}, got {stage!r}")
    unknown = sorted(set(overrides or {}) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown parameter group(s) {unknown} in `trainable`; choose from {sorted(GROUPS)}")
    selected = {group: group in STAGE_GROUPS[stage] for group in GROUPS}
    selected.update(overrides or {})
    return [group for group, on in selected.items() if on]


def apply_stage(model: nn.Module, stage: int, overrides: dict[str, bool] | None = None) -> list[str]:
    """Set `requires_grad` for `stage` (frozen everywhere else) and return the trainable parameter names."""
    groups = set(trainable_groups(stage, overrides))
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(group_of(name) in groups)
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        raise ValueError(
            f"stage {stage} with groups {sorted(groups)} leaves no parameter to train in this model"
        )
    return trainable
