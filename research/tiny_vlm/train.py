"""Train the shipped tiny video LLM: ``python -m research.tiny_vlm.train --out cacovid_rl/assets/tiny_vlm``.

Run from the repository root (``research`` is not installed with the package). docs/TINY_VLM.md describes the
recipe, its cost and how the shipped checkpoint was made (phase 1, then ``--init-from`` for phase 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from research.tiny_vlm.model import ASSET_DIR, TinyVLMSpec
from research.tiny_vlm.scenes import Stage
from research.tiny_vlm.settings import TrainSettings
from research.tiny_vlm.training import train_tiny_vlm


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m research.tiny_vlm.train",
        description="Train the shipped tiny video LLM on synthetic needle videos.",
    )
    p.add_argument("--data", default="/tmp/cacovid_tiny_vlm_data", help="synthetic dataset dir (generated if missing)")
    p.add_argument("--data-size", type=int, default=10000, help="videos generated when --data holds no dataset")
    p.add_argument("--out", default=str(ASSET_DIR), help="output dir (save_pretrained layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="phase-1 steps, curriculum included")
    p.add_argument("--log", default=None, help="append JSON progress lines here")
    p.add_argument("--hidden", type=int, default=None, help="LLM hidden size")
    p.add_argument("--layers", type=int, default=None, help="LLM layers")
    p.add_argument("--lr", type=float, default=None, help="phase-1 peak learning rate")
    p.add_argument("--curriculum", default=None, help='JSON list of Stage fields, e.g. [{"steps": 100, ...}]')
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--no-save", action="store_true")
    p.add_argument(
        "--init-from", default=None, help="a phase-1 checkpoint of the same seed: skip phase 1, run phase 2 only"
    )
    p.add_argument("--pruned-steps", type=int, default=None, help="phase-2 steps (0: full tokens only)")
    return p


def spec_from_args(args: argparse.Namespace) -> TinyVLMSpec:
    spec = TinyVLMSpec()
    sizes = {"hidden_size": args.hidden, "num_layers": args.layers}
    return dataclasses.replace(spec, **{k: v for k, v in sizes.items() if v is not None})


def _curriculum(text: str) -> tuple[Stage, ...]:
    try:
        stages = json.loads(text)
        return tuple(Stage(**st) for st in stages)
    except (json.JSONDecodeError, TypeError) as exc:
        raise SystemExit(
            f"--curriculum must be a JSON list of objects with Stage fields "
            f"({', '.join(f.name for f in dataclasses.fields(Stage))}), e.g. "
            f'\'[{{"steps": 100, "min_per_frame": 1, "max_per_frame": 2}}]\': {exc}'
        ) from exc


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    settings = TrainSettings()
    overrides = {"steps": args.steps, "lr": args.lr, "eval_every": args.eval_every}
    changes: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    if args.pruned_steps is not None:
        changes["pruned"] = dataclasses.replace(settings.pruned, steps=args.pruned_steps)
    if args.curriculum is not None:
        changes["curriculum"] = _curriculum(args.curriculum)
    return dataclasses.replace(settings, **changes)


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    train_tiny_vlm(
        args.data,
        args.out,
        args.seed,
        spec_from_args(args),
        settings_from_args(args),
        args.log,
        save=not args.no_save,
        data_size=args.data_size,
        init_from=args.init_from,
    )


if __name__ == "__main__":
    main()
