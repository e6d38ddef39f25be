"""``blind-test`` and ``make-synthetic``: preparing training and evaluation records."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cacovid_cli.common import AddCommand, UserError


def cmd_blind_test(args: argparse.Namespace) -> int:
    from cacovid_rl.config import ModelConfig
    from cacovid_rl.data.blind_test import run_blind_test
    from cacovid_rl.data.records import load_records
    from cacovid_rl.models.loading import load_adapter

    if not Path(args.data).is_file():
        raise UserError(f"--data '{args.data}' is not a file (a records JSON file)")
    report = load_records(args.data, args.video_root or str(Path(args.data).parent), check_videos=False)
    for err in report.errors[:20]:
        print(f"warning: {err}", file=sys.stderr)
    adapter = load_adapter(ModelConfig(path=args.model, device=args.device, dtype=args.dtype))
    summary = run_blind_test(report.records, adapter, args.out)
    print(json.dumps(summary.__dict__ if hasattr(summary, "__dict__") else summary, indent=2, default=str))
    return 0


def cmd_make_synthetic(args: argparse.Namespace) -> int:
    from cacovid_rl.data.synthetic import make_synthetic

    paths = make_synthetic(args.out, n=args.n, seed=args.seed)
    print(f"wrote {args.n} synthetic videos to {Path(args.out) / 'videos'} and their records to")
    for split, path in paths.items():
        print(f"  {split}: {path}")
    return 0


def register(add: AddCommand) -> None:
    """Add ``blind-test`` and ``make-synthetic``."""
    p = add(
        "blind-test",
        "drop questions the LLM answers without the video",
        cmd_blind_test,
        "cacovid-rl blind-test --data data/synthetic/train.json --model tiny --out data/synthetic/train.blind.json",
        "cacovid-rl blind-test --data videor1.json --model /models/llava-onevision-qwen2-7b-ov-hf "
        "--out filtered.json --device cuda --dtype bfloat16",
    )
    p.add_argument("--data", required=True, help="records JSON file (Video-R1 or CaCoVID schema)")
    p.add_argument("--model", required=True, help="video LLM checkpoint directory, or tiny")
    p.add_argument("--out", required=True, help="filtered records JSON file to write (resumable)")
    p.add_argument("--video-root", default="", help="video root (default: the data file's folder)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="bfloat16 on GPUs")

    p = add(
        "make-synthetic",
        "generate the synthetic needle video-QA dataset",
        cmd_make_synthetic,
        "cacovid-rl make-synthetic --out data/synthetic --n 2000 --seed 0",
        "cacovid-rl make-synthetic --out data/clips --n 10 --seed 1     # a few clips to try `answer` on",
    )
    p.add_argument("--out", required=True, help="output directory (videos/ and train/val/test.json)")
    p.add_argument("--n", type=int, default=2000, help="number of videos over all splits")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
