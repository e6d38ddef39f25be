"""``train`` and ``eval``: the two subcommands that run the Ray layers (``learner``, ``actors``).

Both import them inside the command, so ``cacovid-rl --help`` and the other subcommands never load Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cacovid_cli.common import (
    AddCommand,
    UserError,
    add_config_args,
    config_from_args,
    device_overrides,
    load_policy,
)
from cacovid_rl.config import Config

EXIT_CHECKPOINT_FAILED = 3
"""``train`` exit code when the final or the stop checkpoint could not be written (the run's state is not saved)."""


# ----------------------------------------------------------------------------------------------------------------------
# training data preparation


def ensure_data(cfg: Config) -> None:
    """Generate the synthetic dataset when the config points at it and it is not there yet.

    Refuses a synthetic directory written by another generator version (its ``synthetic.json`` names a
    different task, or none): the shipped model would be trained against questions it was never taught.
    """
    from cacovid_rl.data.synthetic import TASK, make_synthetic

    if not cfg.data.synthetic_dir:
        return
    manifest = Path(cfg.data.synthetic_dir) / "synthetic.json"
    if Path(cfg.data.train_path).is_file():
        if manifest.is_file():
            try:
                task = json.loads(manifest.read_text()).get("task", "quadrants-v1")
            except (json.JSONDecodeError, AttributeError) as exc:
                raise ValueError(f"{manifest} is not a JSON object ({exc}): delete {cfg.data.synthetic_dir}") from exc
            if task != TASK:
                raise ValueError(
                    f"{cfg.data.synthetic_dir} holds synthetic task '{task}' but this version generates and "
                    f"ships a model for '{TASK}': delete {cfg.data.synthetic_dir} (it is regenerated on the next "
                    "run) or point data.synthetic_dir elsewhere"
                )
        return

    logging.getLogger("cacovid_rl").warning(
        "training data %s missing: generating %d synthetic records in %s",
        cfg.data.train_path,
        cfg.data.synthetic_size,
        cfg.data.synthetic_dir,
    )
    make_synthetic(cfg.data.synthetic_dir, n=cfg.data.synthetic_size, seed=0)


def blind_filter(cfg: Config) -> Config:
    """With ``data.blind_filter``: the config that trains on the blind-test-filtered copy of ``data.train_path``.

    The resolved config (written beside the run) names the filtered file and has the flag off, so a resume
    or a report reads the same records.
    """
    if not cfg.data.blind_filter:
        return cfg
    from cacovid_rl.data.blind_test import filter_training_file, model_fingerprint
    from cacovid_rl.models.loading import load_adapter, resolve_model_path

    out, summary = filter_training_file(
        cfg.data.train_path,
        cfg.data.video_root,
        lambda: load_adapter(cfg.model),
        cfg.model.max_new_tokens,
        model=model_fingerprint(resolve_model_path(cfg.model.path)),
    )
    log = logging.getLogger("cacovid_rl")
    if summary is None:
        log.info("training on the blind-test-filtered records in %s", out)
    else:
        log.warning(
            "blind test on %s: %d of %d questions answered without the video and dropped; %d kept in %s",
            cfg.data.train_path,
            summary.dropped,
            summary.total,
            summary.kept,
            out,
        )
    return cfg.replace(**{"data.train_path": str(out), "data.blind_filter": False})


# ----------------------------------------------------------------------------------------------------------------------
# subcommands


def cmd_train(args: argparse.Namespace) -> int:
    """Train; exits 0 when done, 2 on a user error, 3 when the final/stop checkpoint failed, 128 + N when stopped by
    signal N (after writing its stop checkpoint), so a supervisor can tell a finished run from an interrupted one."""
    if args.resume and args.resume_or_start:
        raise UserError("--resume and --resume-or-start exclude each other (the second also starts a new run)")
    if args.allow_config_change and not (args.resume or args.resume_or_start):
        raise UserError("--allow-config-change only applies with --resume or --resume-or-start")
    cfg = config_from_args(args, device_overrides(args.device, ("model.device", "learner.device")))
    from cacovid_rl.preflight import check_model_dir

    check_model_dir(cfg.model.path)  # before the blind test loads it or any data is generated
    ensure_data(cfg)
    cfg = blind_filter(cfg)
    from learner.checkpoint import CheckpointError
    from learner.driver import train

    try:
        summary = train(
            cfg,
            resume=args.resume or args.resume_or_start,
            stop_after_updates=args.stop_after,
            resume_or_start=args.resume_or_start,
            allow_config_change=args.allow_config_change,
        )
    except CheckpointError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_CHECKPOINT_FAILED
    print(json.dumps({k: v for k, v in summary.items() if k != "counters"}, indent=2))
    signum = summary.get("stopped_by_signal")
    if signum is not None:
        print(
            f"stopped by signal {signum} at update {summary['version']}; checkpoint {summary['checkpoint'] or 'none'} "
            "(continue with --resume)",
            file=sys.stderr,
        )
        return 128 + int(signum)
    if args.eval_after and cfg.data.eval_path:
        from cacovid_rl.policy.network import CacovidPolicy

        policy = CacovidPolicy.from_pretrained(summary["policy_dir"])
        _evaluate_and_write(cfg, policy, summary["version"], Path(cfg.output_dir) / "eval")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    extra = device_overrides(args.device, ("model.device",))
    if args.data:
        if not Path(args.data).is_file():
            raise UserError(f"--data '{args.data}' is not a file (a records JSON file)")
        extra.append(f"data.eval_path={args.data}")
    cfg = config_from_args(args, extra)
    policy = load_policy(args.policy) if args.policy else None
    _evaluate_and_write(cfg, policy, 0, Path(args.out or Path(cfg.output_dir) / "eval"))
    return 0


def _evaluate_and_write(cfg: Config, policy: object, version: int, out_dir: Path) -> None:
    """Evaluate in this process, write the JSON + PNG to ``out_dir`` and print the table and where they went."""
    from actors.evaluation import run_evaluation
    from cacovid_rl.eval.evaluate import write_eval_outputs

    result = run_evaluation(cfg, policy, version=version, progress=True)
    json_path, png_path, _, _ = write_eval_outputs(result, out_dir)
    print_eval(result)
    print(f"wrote {json_path} and {png_path}")


def print_eval(result: dict) -> None:
    """The accuracy table: one row per method, one column per retention."""
    from rich.console import Console
    from rich.table import Table

    rets = result["retentions"]
    table = Table(title=f"accuracy (n={result['n']}, skipped={result['skipped']}, full tokens {result['full']:.3f})")
    table.add_column("method")
    for r in rets:
        table.add_column(f"{r:.0%}", justify="right")
    for m, per in result["methods"].items():
        table.add_row(m, *[f"{per[str(r)]:.3f}" for r in rets])
    Console().print(table)


# ----------------------------------------------------------------------------------------------------------------------
# parsers


def register(add: AddCommand) -> None:
    """Add ``train`` and ``eval``."""
    p = add(
        "train",
        "train a policy with Ray reward actors (local debug mode by default)",
        cmd_train,
        "cacovid-rl train --config debug_local --eval-after",
        "cacovid-rl train --config debug_local learner.total_steps=50 sampling.rate=0.25",
        "cacovid-rl train --config configs/llava_ov_7b.yaml --device cuda --resume",
    )
    add_config_args(p)
    p.add_argument("--device", default=None, help="shorthand for model.device=D learner.device=D (cpu, cuda)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest verified checkpoint in learner.checkpoint_dir (an error when there is none)",
    )
    p.add_argument(
        "--resume-or-start",
        action="store_true",
        help="like --resume, but start a new run when learner.checkpoint_dir holds no verified checkpoint",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though seed, data, batch size, model or policy differ from the checkpoint's config",
    )
    p.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after N more updates")
    p.add_argument("--eval-after", action="store_true", help="evaluate the final policy on data.eval_path")

    p = add(
        "eval",
        "accuracy at several retentions vs baselines on data.eval_path",
        cmd_eval,
        "cacovid-rl eval --config debug_local --policy runs/debug_local/policy",
        "cacovid-rl eval --config debug_local --data data/synthetic/val.json eval.retentions=[0.05,0.1]",
    )
    add_config_args(p)
    p.add_argument("--policy", default="", help="policy directory (save_pretrained); omit for baselines only")
    p.add_argument("--data", default="", help="records JSON file to evaluate (default: the config's data.eval_path)")
    p.add_argument("--device", default=None, help="shorthand for model.device=D (cpu, cuda)")
    p.add_argument("--out", default="", help="output directory for JSON + PNG (default: <output_dir>/eval)")
