"""``convert-official``: an official CaCoVID checkpoint's policy as a policy directory."""

from __future__ import annotations

import argparse
import json

from cacovid_cli.common import AddCommand


def cmd_convert_official(args: argparse.Namespace) -> int:
    from cacovid_rl.policy.official import convert_official

    # OfficialCheckpointError is a ValueError: main() prints it as one line and exits 2.
    summary = convert_official(
        args.ckpt_dir, args.out, attention=args.attention, dtype=args.dtype, overwrite=args.force
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "eval_defaults"}, indent=2))
    return 0


def register(add: AddCommand) -> None:
    """Add ``convert-official``."""
    p = add(
        "convert-official",
        "turn an official CaCoVID checkpoint's compression_policy into a policy directory",
        cmd_convert_official,
        "cacovid-rl convert-official /models/CaCoVID-llava-ov-7b --out policies/official_7b",
    )
    p.add_argument("ckpt_dir", help="official checkpoint: config.json + safetensors (sharded with an index, or one)")
    p.add_argument("--out", required=True, help="policy directory to write (model.safetensors + policy_config.json)")
    p.add_argument(
        "--attention",
        default="causal",
        choices=["causal", "bidirectional"],
        help="causal: what the official run computed (flash-attention-2 ignored its is_causal=False), the default "
        "for reproducing the released checkpoint; bidirectional: what that flag meant",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto keeps the checkpoint's (the released 7B is bfloat16)",
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
