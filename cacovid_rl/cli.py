"""The ``cacovid-rl`` command.

Subcommands that need Ray (``train``, ``eval``) import the driver lazily, so the library itself
never imports Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cacovid_rl.config import Config, ConfigError, load_config

DEFAULT_CONFIG = Path("configs/debug_local.yaml")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        help="YAML config (default: configs/debug_local.yaml: CPU, shipped tiny model, generated data)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.total_steps=20 model.device=cuda")


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config or DEFAULT_CONFIG, args.overrides)


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


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args)
    ensure_data(cfg)
    cfg = blind_filter(cfg)
    from learner.driver import train

    summary = train(cfg, resume=args.resume, stop_after_updates=args.stop_after)
    print(json.dumps({k: v for k, v in summary.items() if k != "counters"}, indent=2))
    if args.eval_after and cfg.data.eval_path:
        from actors.evaluation import run_evaluation
        from cacovid_rl.eval.evaluate import write_eval_outputs
        from cacovid_rl.policy.network import CacovidPolicy

        policy = CacovidPolicy.from_pretrained(summary["policy_dir"])
        result = run_evaluation(cfg, policy, summary["version"], progress=True)
        json_path, png_path, _, _ = write_eval_outputs(result, Path(cfg.output_dir) / "eval")
        _print_eval(result)
        print(f"wrote {json_path} and {png_path}")
    return 0


def _print_eval(result: dict) -> None:
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


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from actors.evaluation import run_evaluation
    from cacovid_rl.eval.evaluate import write_eval_outputs
    from cacovid_rl.policy.network import CacovidPolicy

    policy = CacovidPolicy.from_pretrained(args.policy) if args.policy else None
    result = run_evaluation(cfg, policy, version=0, progress=True)
    json_path, png_path, _, _ = write_eval_outputs(result, Path(args.out or Path(cfg.output_dir) / "eval"))
    _print_eval(result)
    print(f"wrote {json_path} and {png_path}")
    return 0


def cmd_answer(args: argparse.Namespace) -> int:
    from cacovid_rl.inference import CacovidPruner

    pruner = CacovidPruner.from_pretrained(args.policy)
    out = pruner.answer(args.model, args.video, args.question, retention=args.retention, num_frames=args.num_frames)
    print(json.dumps({"answer": out.text, "kept": len(out.kept_indices), "of": out.num_video_tokens}))
    return 0


def cmd_blind_test(args: argparse.Namespace) -> int:
    from cacovid_rl.config import ModelConfig
    from cacovid_rl.data.blind_test import run_blind_test
    from cacovid_rl.data.records import load_records
    from cacovid_rl.models.loading import load_adapter

    report = load_records(args.data, args.video_root or str(Path(args.data).parent), check_videos=False)
    for err in report.errors[:20]:
        print(f"warning: {err}", file=sys.stderr)
    adapter = load_adapter(ModelConfig(path=args.model, device=args.device, dtype=args.dtype))
    summary = run_blind_test(report.records, adapter, args.out)
    print(json.dumps(summary.__dict__ if hasattr(summary, "__dict__") else summary, indent=2, default=str))
    return 0


def cmd_make_synthetic(args: argparse.Namespace) -> int:
    from cacovid_rl.data.synthetic import make_synthetic

    make_synthetic(args.out, n=args.n, seed=args.seed)
    print(f"wrote synthetic dataset to {args.out}")
    return 0


def cmd_train_tiny_vlm(args: argparse.Namespace) -> int:
    from cacovid_rl.models.tiny_vlm import train_tiny_vlm

    train_tiny_vlm(args.data, args.out, seed=args.seed, init_from=args.init_from)
    return 0


def cmd_convert_official(args: argparse.Namespace) -> int:
    from cacovid_rl.policy.official import OfficialCheckpointError, convert_official

    try:
        summary = convert_official(
            args.ckpt_dir, args.out, attention=args.attention, dtype=args.dtype, overwrite=args.force
        )
    except OfficialCheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "eval_defaults"}, indent=2))
    return 0


def cmd_report(argv: list[str]) -> int:
    from cacovid_rl.eval.report import build_parser as report_parser
    from cacovid_rl.eval.report import main as report_main

    return report_main(report_parser().parse_args(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cacovid-rl", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a policy with Ray reward actors (local debug mode by default)")
    _add_config_args(p)
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in learner.checkpoint_dir"
    )
    p.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after N more updates")
    p.add_argument("--eval-after", action="store_true", help="evaluate the final policy on data.eval_path")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy at several retentions vs baselines on data.eval_path")
    _add_config_args(p)
    p.add_argument("--policy", default="", help="policy directory (save_pretrained); omit for baselines only")
    p.add_argument("--out", default="", help="output directory for JSON + PNG (default: <output_dir>/eval)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("answer", help="answer a question about a video using only the selected tokens")
    p.add_argument("--video", required=True, help="video file")
    p.add_argument("--question", required=True)
    p.add_argument("--retention", type=float, default=0.1, help="fraction of video tokens kept, in (0, 1]")
    p.add_argument("--policy", required=True, help="trained policy directory")
    p.add_argument("--model", default="tiny", help="video LLM checkpoint path (default: shipped tiny model)")
    p.add_argument("--num-frames", type=int, default=8)
    p.set_defaults(func=cmd_answer)

    p = sub.add_parser("blind-test", help="drop questions the LLM answers without the video")
    p.add_argument("--data", required=True, help="Video-R1 JSON records")
    p.add_argument("--model", required=True, help="video LLM checkpoint path, or 'tiny'")
    p.add_argument("--out", required=True, help="filtered JSON output (resumable)")
    p.add_argument("--video-root", default="", help="video root (default: the data file's folder)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="bfloat16 on GPUs")
    p.set_defaults(func=cmd_blind_test)

    p = sub.add_parser("make-synthetic", help="generate the synthetic needle video-QA dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_synthetic)

    p = sub.add_parser("train-tiny-vlm", help="rebuild the shipped tiny video LLM from a seed")
    p.add_argument("--data", required=True, help="synthetic dataset directory")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init-from",
        default=None,
        help="a phase-1 (full-token) checkpoint of the same seed: run only phase 2 (pruned inputs) from it",
    )
    p.set_defaults(func=cmd_train_tiny_vlm)

    p = sub.add_parser(
        "convert-official", help="turn an official CaCoVID checkpoint's compression_policy into a policy directory"
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
    p.set_defaults(func=cmd_convert_official)

    # The report has its own parser (data layouts, retentions, baselines...): hand it the rest.
    p = sub.add_parser(
        "report", add_help=False, help="evaluation report (JSON + Markdown + PNG) over trained runs; see report --help"
    )
    p.add_argument("report_args", nargs=argparse.REMAINDER)  # main() hands these to the report's parser
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:  # the report owns its options (layouts, retentions, baselines, ...)
        return cmd_report(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
