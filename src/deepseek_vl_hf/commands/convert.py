"""`deepseek-vl-hf convert`: official or native checkpoints -> our format, and our format -> native."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from deepseek_vl_hf.commands.common import parse_overrides


def run(args: argparse.Namespace) -> None:
    from deepseek_vl_hf.cards import write_card
    from deepseek_vl_hf.conversion.folders import DTYPES
    from deepseek_vl_hf.conversion.native import convert_native, export_native
    from deepseek_vl_hf.conversion.official import convert_official
    from deepseek_vl_hf.conversion.verify import check_runs, compare_with_native
    from deepseek_vl_hf.conversion.weights import ConversionError

    common = dict(dtype=DTYPES.get(args.dtype), max_shard_size=args.max_shard_size, overwrite=args.overwrite)

    def card(folder) -> None:
        write_card(folder, base_model=args.base_model, model_id=Path(args.output).name)

    start = time.perf_counter()
    try:
        if args.to_format == "native":
            result = export_native(args.input, args.output, **common)
        elif args.from_format == "official":
            result = convert_official(args.input, args.output, overrides=parse_overrides(args.set), finalize=card, **common)
        else:
            result = convert_native(args.input, args.output, finalize=card, **common)
    except (ConversionError, FileNotFoundError, FileExistsError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    elapsed = time.perf_counter() - start
    print(f"wrote {result.output} ({str(result.dtype).replace('torch.', '')}) in {elapsed:.1f} s")
    for note in result.notes:
        print(f"note: {note}")
    if not args.verify:
        return
    if args.from_format == "official":
        print("verify: no official model class can run here; the converted model "
              f"{check_runs(result.output, args.verify_dtype)}")
    else:
        ours, native = (args.input, result.output) if args.to_format else (result.output, args.input)
        diff = compare_with_native(ours, native, args.verify_dtype)
        print(f"verify: max |logit difference| between source and converted model on the sample: {diff:.3g}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert official/native checkpoints to this format (--from), or this format to native (--to)",
        description="Export to the official layout is not offered: the official checkpoints' unused tensors "
                    "(SigLIP attn_pool.*, high/low_layer_norm) are dropped on import and cannot be recreated.",
    )
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="from_format", choices=["official", "native"],
                           help="source layout: official DeepSeek-VL (multi_modality) or transformers' native port")
    direction.add_argument("--to", dest="to_format", choices=["native"],
                           help="export one of our folders to transformers' native layout")
    p.add_argument("--input", required=True, help="source checkpoint folder")
    p.add_argument("--output", required=True, help="folder to create")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="cast floating tensors (auto keeps the source dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB or 500MB")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="official only: override a converted config value, e.g. siglip_config.num_attention_heads=4, "
                        "for towers whose shapes the official model_name does not give (repeatable)")
    p.add_argument("--base-model", default=None, help="Hub id of the source weights, for the model card")
    p.add_argument("--verify", action="store_true",
                   help="run source and converted model on a built-in sample and print the max logit difference "
                        "(official sources: check that the converted model loads and runs)")
    p.add_argument("--verify-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="dtype the --verify models run in")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)
