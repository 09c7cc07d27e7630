"""Explicit key rules between checkpoint layouts: official DeepSeek-VL, ours, and transformers' native port.

Every table maps each source key by a full-match regex to its target key(s) and says what happens to the tensor
(`copy`, `split` along dim 0, `merge` by concatenation along dim 0, `unsqueeze`/`squeeze` of dim 0). Keys that
no rule matches are left-over keys, an error for the converter, except those matched by the layout's explicitly
ignorable patterns (tensors that exist in the source but that the target model has no place for).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

OPS = ("copy", "split", "merge", "unsqueeze", "squeeze")


@dataclass(frozen=True)
class Rule:
    """Source regex (full match) -> target template(s) (`re.Match.expand` syntax) and the tensor operation.

    `merge` rules capture the part name in the group `part` and concatenate the parts in `order`.
    """

    pattern: str
    targets: tuple[str, ...]
    op: str = "copy"
    order: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; use one of {OPS}")
        if (self.op == "merge") != bool(self.order):
            raise ValueError(f"rule {self.pattern!r}: `order` goes with (and only with) op 'merge'")


def rule(pattern: str, *targets: str, op: str = "copy", order: Sequence[str] = ()) -> Rule:
    """Shorthand for `Rule(pattern, targets, op, order)`."""
    return Rule(pattern, tuple(targets), op, tuple(order))


class KeyMapper:
    """Applies one rule table: routes source keys, converts (key, tensor) streams, names expected sources."""

    def __init__(self, rules: Sequence[Rule], ignored: Sequence[str] = ()):
        self.rules = list(rules)
        self._compiled = [(re.compile(r.pattern), r) for r in self.rules]
        self._ignored = [re.compile(p) for p in ignored]

    def match(self, key: str) -> tuple[Rule, re.Match] | None:
        """The first rule whose pattern matches the whole key, with its match; `None` if none does."""
        for regex, item in self._compiled:
            found = regex.fullmatch(key)
            if found:
                return item, found
        return None

    def is_ignored(self, key: str) -> bool:
        """Whether `key` is one of this layout's explicitly ignorable tensors."""
        return any(regex.fullmatch(key) for regex in self._ignored)

    def target_names(self, key: str) -> list[str]:
        """The target key(s) a source key maps to (empty when no rule matches)."""
        routed = self.match(key)
        if routed is None:
            return []
        item, found = routed
        return [found.expand(t) for t in item.targets]

    def stream(self, items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Converted `(target key, tensor)` pairs, in the order they complete.

        Ignored and unmatched source keys are skipped (the caller reports them); a merge whose parts do not all
        arrive is never emitted, so its target shows up as missing.
        """
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in items:
            routed = self.match(key)
            if routed is None:
                continue
            item, found = routed
            names = [found.expand(t) for t in item.targets]
            if item.op == "merge":
                parts = pending.setdefault(names[0], {})
                parts[found.group("part")] = tensor
                if len(parts) == len(item.order):
                    del pending[names[0]]
                    yield names[0], torch.cat([parts[p] for p in item.order], dim=0)
            elif item.op == "split":
                yield from zip(names, torch.chunk(tensor, len(names), dim=0))
            elif item.op == "unsqueeze":
                yield names[0], tensor.unsqueeze(0)
            elif item.op == "squeeze":
                yield names[0], tensor.squeeze(0)
            else:
                for name in names:
                    yield name, tensor


# ---------------------------------------------------------------------------------------------------------------
# Official DeepSeek-VL (`multi_modality`) <-> ours.
# ---------------------------------------------------------------------------------------------------------------

OFFICIAL_SAM = "vision_model.vision_tower_high.vision_tower."
OFFICIAL_SIGLIP_HYBRID = "vision_model.vision_tower_low.vision_tower."
OFFICIAL_SIGLIP_ONLY = "vision_model.vision_tower."
OURS_SAM = "model.vision_model.sam."
OURS_SIGLIP = "model.vision_model.siglip."

# Tensors in the released checkpoints that the official forward never uses (the SigLIP MAP head and the hybrid
# tower's two LayerNorms); they are dropped on import and cannot be recreated, hence no export to official.
OFFICIAL_IGNORED = (
    r"vision_model\.(?:vision_tower_low\.)?vision_tower\.attn_pool\..+",
    r"vision_model\.(?:high|low)_layer_norm\.(?:weight|bias)",
)

_SIGLIP_TENSORS = (
    r"patch_embed\.proj\.(?:weight|bias)|pos_embed|norm\.(?:weight|bias)"
    r"|blocks\.\d+\.(?:norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(?:weight|bias)"
)
_SAM_TENSORS = (
    r"patch_embed\.proj\.(?:weight|bias)|pos_embed|hd_alpha_downsamples"
    r"|blocks\.\d+\.(?:norm1|norm2|attn\.qkv|attn\.proj)\.(?:weight|bias)|blocks\.\d+\.attn\.rel_pos_[hw]"
    r"|neck(?:_hd)?\.[0-3]\.(?:weight|bias)|downsamples\.\d+\.weight"
)


def official_to_ours_rules(hybrid: bool) -> list[Rule]:
    """Official -> ours. Tensors keep their shapes; SAM's MLP is `lin1/lin2` there, `fc1/fc2` here."""
    siglip = re.escape(OFFICIAL_SIGLIP_HYBRID if hybrid else OFFICIAL_SIGLIP_ONLY)
    sam = re.escape(OFFICIAL_SAM)
    table = [rule(rf"{siglip}({_SIGLIP_TENSORS})", rf"{OURS_SIGLIP}\1")]
    if hybrid:
        table += [
            rule(rf"{sam}blocks\.(\d+)\.mlp\.lin([12])\.(weight|bias)", rf"{OURS_SAM}blocks.\1.mlp.fc\2.\3"),
            rule(rf"{sam}({_SAM_TENSORS})", rf"{OURS_SAM}\1"),
        ]
    return table + [
        rule(r"aligner\.(high_up_proj|low_up_proj|layers\.\d+)\.(weight|bias)", r"model.aligner.\1.\2"),
        rule(r"language_model\.model\.(.+)", r"model.language_model.\1"),
        rule(r"language_model\.lm_head\.weight", "lm_head.weight"),
    ]


def ours_to_official_rules(hybrid: bool) -> list[Rule]:
    """Ours -> official key names (used for error hints and to build official-layout test checkpoints)."""
    siglip = OFFICIAL_SIGLIP_HYBRID if hybrid else OFFICIAL_SIGLIP_ONLY
    table = [rule(rf"{re.escape(OURS_SIGLIP)}({_SIGLIP_TENSORS})", rf"{siglip}\1")]
    if hybrid:
        sam = re.escape(OURS_SAM)
        table += [
            rule(rf"{sam}blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)", rf"{OFFICIAL_SAM}blocks.\1.mlp.lin\2.\3"),
            rule(rf"{sam}({_SAM_TENSORS})", rf"{OFFICIAL_SAM}\1"),
        ]
    return table + [
        rule(r"model\.aligner\.(high_up_proj|low_up_proj|layers\.\d+)\.(weight|bias)", r"aligner.\1.\2"),
        rule(r"model\.language_model\.(.+)", r"language_model.model.\1"),
        rule(r"lm_head\.weight", "language_model.lm_head.weight"),
    ]


# ---------------------------------------------------------------------------------------------------------------
# transformers' native port (DeepseekVLHybridForConditionalGeneration / DeepseekVLForConditionalGeneration) <->
# ours. The native SigLIP splits qkv into q/k/v projections and stores positions as [tokens, width]. Its SigLIP
# keys are `model.vision_model.vision_model.*` in the Hub checkpoints and `model.vision_model.*` when saved by
# transformers 5; both are read, the Hub layout is written (transformers 4.57 and 5.x load it).
# ---------------------------------------------------------------------------------------------------------------

NATIVE_SAM = r"model\.high_res_vision_model\.vision_encoder\."
NATIVE_SIGLIP = r"model\.vision_model\.(?:vision_model\.)?"
NATIVE_SIGLIP_OUT = "model.vision_model.vision_model."
# The native SigLIP's MAP head (`vision_use_head=True`) has no counterpart in ours (nor in the official forward).
NATIVE_IGNORED = (rf"{NATIVE_SIGLIP}head\..+",)

_NECK_PARTS = (("conv1.weight", "0.weight"), ("layer_norm1.weight", "1.weight"), ("layer_norm1.bias", "1.bias"),
               ("conv2.weight", "2.weight"), ("layer_norm2.weight", "3.weight"), ("layer_norm2.bias", "3.bias"))


def native_to_ours_rules(hybrid: bool, tied_head: bool = False) -> list[Rule]:
    """Native -> ours. `tied_head`: the source has no `lm_head.weight` (tied embeddings), so the embedding
    matrix also becomes our (untied) LM head."""
    s = NATIVE_SIGLIP
    table = [
        rule(rf"{s}embeddings\.patch_embedding\.(weight|bias)", rf"{OURS_SIGLIP}patch_embed.proj.\1"),
        rule(rf"{s}embeddings\.position_embedding\.weight", f"{OURS_SIGLIP}pos_embed", op="unsqueeze"),
        rule(rf"{s}encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", rf"{OURS_SIGLIP}blocks.\1.norm\2.\3"),
        rule(rf"{s}encoder\.layers\.(\d+)\.self_attn\.(?P<part>[qkv])_proj\.(weight|bias)",
             rf"{OURS_SIGLIP}blocks.\1.attn.qkv.\3", op="merge", order=("q", "k", "v")),
        rule(rf"{s}encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", rf"{OURS_SIGLIP}blocks.\1.attn.proj.\2"),
        rule(rf"{s}encoder\.layers\.(\d+)\.mlp\.fc([12])\.(weight|bias)", rf"{OURS_SIGLIP}blocks.\1.mlp.fc\2.\3"),
        rule(rf"{s}post_layernorm\.(weight|bias)", rf"{OURS_SIGLIP}norm.\1"),
    ]
    if hybrid:
        n = NATIVE_SAM
        table += [
            rule(rf"{n}pos_embed", f"{OURS_SAM}pos_embed"),
            rule(rf"{n}patch_embed\.projection\.(weight|bias)", rf"{OURS_SAM}patch_embed.proj.\1"),
            rule(rf"{n}layers\.(\d+)\.layer_norm([12])\.(weight|bias)", rf"{OURS_SAM}blocks.\1.norm\2.\3"),
            rule(rf"{n}layers\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", rf"{OURS_SAM}blocks.\1.attn.\2.\3"),
            rule(rf"{n}layers\.(\d+)\.attn\.rel_pos_([hw])", rf"{OURS_SAM}blocks.\1.attn.rel_pos_\2"),
            rule(rf"{n}layers\.(\d+)\.mlp\.lin([12])\.(weight|bias)", rf"{OURS_SAM}blocks.\1.mlp.fc\2.\3"),
            *(rule(rf"{n}neck\.{re.escape(a)}", f"{OURS_SAM}neck.{b}") for a, b in _NECK_PARTS),
            *(rule(rf"model\.high_res_vision_neck\.{re.escape(a)}", f"{OURS_SAM}neck_hd.{b}") for a, b in _NECK_PARTS),
            rule(r"model\.high_res_vision_proj\.conv1\.weight", f"{OURS_SAM}downsamples.0.weight"),
            rule(r"model\.high_res_vision_proj\.conv2\.weight", f"{OURS_SAM}downsamples.1.weight"),
            rule(r"model\.high_res_vision_alpha", f"{OURS_SAM}hd_alpha_downsamples"),
            rule(r"model\.aligner\.high_res_vision_proj\.(weight|bias)", r"model.aligner.high_up_proj.\1"),
            rule(r"model\.aligner\.vision_proj\.(weight|bias)", r"model.aligner.low_up_proj.\1"),
            rule(r"model\.aligner\.proj\.(weight|bias)", r"model.aligner.layers.1.\1"),
        ]
    else:
        table += [
            rule(r"model\.aligner\.linear1\.(weight|bias)", r"model.aligner.layers.0.\1"),
            rule(r"model\.aligner\.linear2\.(weight|bias)", r"model.aligner.layers.2.\1"),
        ]
    if tied_head:
        table.append(rule(r"model\.language_model\.embed_tokens\.weight",
                          "model.language_model.embed_tokens.weight", "lm_head.weight"))
    return table + [
        rule(r"model\.language_model\.(.+)", r"model.language_model.\1"),
        rule(r"lm_head\.weight", "lm_head.weight"),
    ]


def ours_to_native_rules(hybrid: bool) -> list[Rule]:
    """Ours -> native (the Hub layout of transformers' DeepSeek-VL checkpoints)."""
    s, o = NATIVE_SIGLIP_OUT, re.escape(OURS_SIGLIP)
    table = [
        rule(rf"{o}patch_embed\.proj\.(weight|bias)", rf"{s}embeddings.patch_embedding.\1"),
        rule(rf"{o}pos_embed", f"{s}embeddings.position_embedding.weight", op="squeeze"),
        rule(rf"{o}blocks\.(\d+)\.norm([12])\.(weight|bias)", rf"{s}encoder.layers.\1.layer_norm\2.\3"),
        rule(rf"{o}blocks\.(\d+)\.attn\.qkv\.(weight|bias)", *(rf"{s}encoder.layers.\1.self_attn.{p}_proj.\2" for p in "qkv"),
             op="split"),
        rule(rf"{o}blocks\.(\d+)\.attn\.proj\.(weight|bias)", rf"{s}encoder.layers.\1.self_attn.out_proj.\2"),
        rule(rf"{o}blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)", rf"{s}encoder.layers.\1.mlp.fc\2.\3"),
        rule(rf"{o}norm\.(weight|bias)", rf"{s}post_layernorm.\1"),
    ]
    if hybrid:
        n, m = "model.high_res_vision_model.vision_encoder.", re.escape(OURS_SAM)
        table += [
            rule(rf"{m}pos_embed", f"{n}pos_embed"),
            rule(rf"{m}patch_embed\.proj\.(weight|bias)", rf"{n}patch_embed.projection.\1"),
            rule(rf"{m}blocks\.(\d+)\.norm([12])\.(weight|bias)", rf"{n}layers.\1.layer_norm\2.\3"),
            rule(rf"{m}blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", rf"{n}layers.\1.attn.\2.\3"),
            rule(rf"{m}blocks\.(\d+)\.attn\.rel_pos_([hw])", rf"{n}layers.\1.attn.rel_pos_\2"),
            rule(rf"{m}blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)", rf"{n}layers.\1.mlp.lin\2.\3"),
            *(rule(rf"{m}neck\.{re.escape(b)}", f"{n}neck.{a}") for a, b in _NECK_PARTS),
            *(rule(rf"{m}neck_hd\.{re.escape(b)}", f"model.high_res_vision_neck.{a}") for a, b in _NECK_PARTS),
            rule(rf"{m}downsamples\.0\.weight", "model.high_res_vision_proj.conv1.weight"),
            rule(rf"{m}downsamples\.1\.weight", "model.high_res_vision_proj.conv2.weight"),
            rule(rf"{m}hd_alpha_downsamples", "model.high_res_vision_alpha"),
            rule(r"model\.aligner\.high_up_proj\.(weight|bias)", r"model.aligner.high_res_vision_proj.\1"),
            rule(r"model\.aligner\.low_up_proj\.(weight|bias)", r"model.aligner.vision_proj.\1"),
            rule(r"model\.aligner\.layers\.1\.(weight|bias)", r"model.aligner.proj.\1"),
        ]
    else:
        table += [
            rule(r"model\.aligner\.layers\.0\.(weight|bias)", r"model.aligner.linear1.\1"),
            rule(r"model\.aligner\.layers\.2\.(weight|bias)", r"model.aligner.linear2.\1"),
        ]
    return table + [
        rule(r"model\.language_model\.(.+)", r"model.language_model.\1"),
        rule(r"lm_head\.weight", "lm_head.weight"),
    ]
