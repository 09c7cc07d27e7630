"""Worker of tests/test_fsdp.py, run as `torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT`.

Real FSDP2 sharding on CPU (gloo): every process builds the same tiny model (stage 3 freezing: SAM-B frozen),
`fully_shard`s each decoder layer / SigLIP block / SAM block (the runner's FSDP units) and the root, and takes
one AdamW step on its half of a 4-example batch. Rank 0 compares the gathered weights with the same step taken
by one unsharded process on the whole batch, and saves the gathered weights as a checkpoint folder.
Writes OUT/result.json, OUT/reference.safetensors and OUT/fsdp/ (a loadable checkpoint).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from deepseek_vl_hf.checkpoint import build_random_model, save_checkpoint
from deepseek_vl_hf.training.runner import FSDP_WRAP_CLASSES
from deepseek_vl_hf.training.stages import apply_stage

EXAMPLES, TEXT_TOKENS, LR = 4, 24, 1e-3


def make_batch(model, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Equal-length examples (an image + text, no padding): per-rank mean losses average to the global one."""
    config = model.config
    n_image = config.num_image_tokens
    text = torch.randint(3, 500, (EXAMPLES, TEXT_TOKENS), generator=generator)
    bos = torch.full((EXAMPLES, 1), config.bos_token_id)
    image = torch.full((EXAMPLES, n_image), config.image_token_id)
    input_ids = torch.cat([bos, image, text], dim=1)
    labels = input_ids.clone()
    labels[:, : 1 + n_image] = -100
    pixels = torch.rand((EXAMPLES, 3, config.image_size, config.image_size), generator=generator)
    return {"input_ids": input_ids, "labels": labels, "pixel_values": pixels}


def train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One AdamW step; returns the full (gathered) gradients it applied."""
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LR, betas=(0.9, 0.95), weight_decay=0.0
    )
    model.train()
    model(**batch).loss.backward()
    grads = {
        name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
        for name, p in model.named_parameters()
        if p.grad is not None
    }
    optimizer.step()
    return grads


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model, processor = build_random_model("tiny", seed=0)
    with torch.no_grad():
        model.model.vision_model.sam.hd_alpha_downsamples.fill_(0.5)
    apply_stage(model, 3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    batch = make_batch(model, torch.Generator().manual_seed(1))

    reference = copy.deepcopy(model)
    reference_grads = train_step(reference, batch)

    mesh = init_device_mesh("cpu", (world,))
    units = [m for m in model.modules() if type(m).__name__ in FSDP_WRAP_CLASSES]
    for module in units:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    share = EXAMPLES // world
    grads = train_step(model, {k: v[rank * share : (rank + 1) * share] for k, v in batch.items()})
    sharded = sum(isinstance(p, DTensor) for p in model.parameters())
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    if rank == 0:
        expected = reference.state_dict()
        diff = max((full[k] - expected[k]).abs().max().item() for k in expected)
        grad_diff = max(
            ((grads[k] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
            for k, g in reference_grads.items()
        )
        moved = sorted(k for k in expected if not torch.equal(expected[k], start[k]))
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "reference.safetensors"))
        fresh, _ = build_random_model("tiny", seed=0)
        fresh.load_state_dict(full)
        save_checkpoint(fresh, processor, out / "fsdp")
        result = {
            "world_size": world,
            "fsdp_units": len(units),
            "dtensor_parameters": sharded,
            "max_abs_diff": diff,
            "lr": LR,
            "max_relative_grad_diff": grad_diff,
            "grad_names": sorted(grads),
            "moved": moved,
        }
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
