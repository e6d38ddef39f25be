"""The ``cacovid-rl`` command: train, evaluate and serve CaCoVID video-token compression policies.

Conventions every subcommand follows (issue 16): ``--config`` takes a shipped preset name (``debug_local``,
``llava_ov_7b``, ...) or a YAML path, followed by dotted overrides; ``--device`` wherever a model runs;
``--data`` is always a records JSON file (a directory is ``--data-dir`` or ``--out``); a user error (missing
file, bad config, unusable policy or video) prints one ``error:`` line and exits 2, with the traceback only
under ``--debug``.

Subcommands that need Ray (``train``, ``eval``) import the driver lazily, so the library itself
never imports Ray; the heavy imports (torch, transformers) wait for the subcommand too, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cacovid_rl.config import Config, ConfigError, load_config

PROG = "cacovid-rl"
DEFAULT_CONFIG = "debug_local"
"""The preset ``train`` and ``eval`` use without ``--config``: CPU, the shipped tiny model, generated data."""
PACKAGE_DIR = Path(__file__).resolve().parent


class UserError(Exception):
    """A mistake in what the user asked for (a missing file, a wrong flag combination): one line, exit 2."""


# ----------------------------------------------------------------------------------------------------------------------
# configs: named presets shipped with the package, or paths


def preset_dirs() -> list[Path]:
    """Where the shipped configs are: inside the installed package, else the source checkout's ``configs/``.

    A wheel carries ``configs/*.yaml`` as ``cacovid_rl/configs/`` (package data); an editable install or a
    plain checkout reads the repository's ``configs/``, which stays the one copy that is edited and
    documented. The checkout is only trusted beside its ``pyproject.toml``, so a stray ``configs`` folder in
    ``site-packages`` is never mistaken for the presets.
    """
    dirs = [PACKAGE_DIR / "configs"]
    if (PACKAGE_DIR.parent / "pyproject.toml").is_file():
        dirs.append(PACKAGE_DIR.parent / "configs")
    return [d for d in dirs if d.is_dir()]


def presets() -> dict[str, Path]:
    """Shipped config names (file stems) and their files; the package copy wins over the checkout's."""
    found: dict[str, Path] = {}
    for d in reversed(preset_dirs()):
        found.update({p.stem: p for p in sorted(d.glob("*.yaml"))})
    return dict(sorted(found.items()))


def resolve_config(value: str | Path) -> Path:
    """The YAML file for ``--config``: an existing path, else a shipped preset (``debug_local``).

    A relative ``configs/<preset>.yaml`` that does not exist here (the documented spelling, run outside a
    clone) falls back to the preset of that name, with a warning saying which file is read.
    """
    path = Path(value).expanduser()
    if path.is_file():
        return path
    shipped = presets()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    bare = len(path.parts) == 1
    in_configs = not path.is_absolute() and path.parent == Path("configs")
    if name in shipped and (bare or in_configs):
        if in_configs:
            logging.getLogger("cacovid_rl").warning(
                "%s does not exist in %s: using the shipped preset '%s' (%s)", value, Path.cwd(), name, shipped[name]
            )
        return shipped[name]
    listed = ", ".join(shipped) or "none found"
    raise ConfigError(f"config '{value}' is neither a YAML file nor a shipped preset (presets: {listed})")


def _config(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    """The config of ``--config``; ``extra`` overrides (from flags such as ``--device``) come before the dotted
    ones on the command line, so an explicit ``model.device=...`` still wins."""
    return load_config(resolve_config(args.config), [*extra, *args.overrides])


def _device_overrides(device: str | None, keys: Sequence[str]) -> list[str]:
    return [f"{k}={device}" for k in keys] if device else []


# ----------------------------------------------------------------------------------------------------------------------
# training data preparation (shared with the report and tests)


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


EXIT_CHECKPOINT_FAILED = 3
"""``train`` exit code when the final or the stop checkpoint could not be written (the run's state is not saved)."""


def cmd_train(args: argparse.Namespace) -> int:
    """Train; exits 0 when done, 2 on a user error, 3 when the final/stop checkpoint failed, 128 + N when stopped by
    signal N (after writing its stop checkpoint), so a supervisor can tell a finished run from an interrupted one."""
    if args.resume and args.resume_or_start:
        raise UserError("--resume and --resume-or-start exclude each other (the second also starts a new run)")
    if args.allow_config_change and not (args.resume or args.resume_or_start):
        raise UserError("--allow-config-change only applies with --resume or --resume-or-start")
    cfg = _config(args, _device_overrides(args.device, ("model.device", "learner.device")))
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


def _load_policy(path: str) -> Any:
    """The saved policy at ``path``; anything that makes it unloadable is the directory's fault (a user error)."""
    if not Path(path).is_dir():
        raise UserError(f"policy directory '{path}' does not exist (a `save_pretrained` dir, e.g. runs/<run>/policy)")
    from cacovid_rl.policy.network import CacovidPolicy  # torch: only once there is something to load

    try:
        return CacovidPolicy.from_pretrained(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # bad JSON, missing keys, mismatched safetensors: all say "not a usable policy"
        raise UserError(f"'{path}' is not a usable policy directory: {type(exc).__name__}: {exc}") from exc


def cmd_eval(args: argparse.Namespace) -> int:
    extra = _device_overrides(args.device, ("model.device",))
    if args.data:
        if not Path(args.data).is_file():
            raise UserError(f"--data '{args.data}' is not a file (a records JSON file)")
        extra.append(f"data.eval_path={args.data}")
    cfg = _config(args, extra)
    policy = _load_policy(args.policy) if args.policy else None
    from actors.evaluation import run_evaluation
    from cacovid_rl.eval.evaluate import write_eval_outputs

    result = run_evaluation(cfg, policy, version=0, progress=True)
    json_path, png_path, _, _ = write_eval_outputs(result, Path(args.out or Path(cfg.output_dir) / "eval"))
    _print_eval(result)
    print(f"wrote {json_path} and {png_path}")
    return 0


def _split_options(values: Sequence[str] | None) -> list[str]:
    """``--options`` as a list: several arguments, or one argument holding one option per line."""
    if not values:
        return []
    if len(values) == 1 and "\n" in values[0]:
        return [line for line in values[0].splitlines() if line.strip()]
    return list(values)


def _chosen_option(text: str, options: Sequence[str]) -> str | None:
    """The option a multiple-choice answer names (``"B"`` -> ``"B. green"``), if it names one."""
    from cacovid_rl.answers import extract_answer

    letter = extract_answer(text).strip().rstrip(".)").strip()
    return next((o for o in options if len(letter) == 1 and o.startswith(letter.upper())), None)


def answer_settings(args: argparse.Namespace) -> tuple[Config, str]:
    """The config ``answer`` reads its defaults from, and where it came from.

    ``--config`` when given; else the ``config.yaml`` the training run wrote beside ``--policy``
    (``runs/<run>/config.yaml``), so the model, frame count and selection the policy was trained and
    evaluated with are used without repeating them; else the built-in defaults. Dotted overrides apply to
    whichever it is; explicit flags (``--model``, ``--num-frames`` ...) win over all of them.
    """
    beside = Path(args.policy).parent / "config.yaml"
    if args.config:
        path: Path | None = resolve_config(args.config)
    elif beside.is_file():
        path = beside
    else:
        path = None
    return load_config(path, args.overrides), str(path) if path else "built-in defaults"


def cmd_answer(args: argparse.Namespace) -> int:
    from cacovid_rl.data.prompts import letter_options

    options = _split_options(args.options)
    problem_type = args.problem_type
    if problem_type == "auto":
        problem_type = "multiple choice" if options else "free-form"
    if problem_type == "multiple choice" and not options:
        raise UserError("--problem-type 'multiple choice' needs --options (e.g. --options 'A. red' 'B. green')")
    if options and problem_type != "multiple choice":
        raise UserError(f"--options go with --problem-type 'multiple choice', not '{problem_type}'")
    if options:
        try:
            options = letter_options(options)
        except ValueError as exc:
            raise UserError(f"--options: {exc}") from exc
    if not 0.0 < args.retention <= 1.0:
        raise UserError(f"--retention must be in (0, 1], got {args.retention}")
    if not Path(args.video).is_file():
        raise UserError(f"video file '{args.video}' does not exist")
    if args.heatmap and not Path(args.heatmap).parent.is_dir():
        raise UserError(f"--heatmap: directory '{Path(args.heatmap).parent}' does not exist")
    cfg, source = answer_settings(args)
    model = args.model or cfg.model.path
    # Without a config file the device follows the machine; a run's config names where its model ran.
    device = args.device or (cfg.model.device if source != "built-in defaults" else "auto")
    imp_ratio = cfg.eval.imp_ratio if args.imp_ratio is None else args.imp_ratio
    num_frames = args.num_frames or cfg.data.num_frames
    max_new_tokens = args.max_new_tokens or cfg.model.max_new_tokens
    policy = _load_policy(args.policy)

    from cacovid_rl.inference import CacovidPruner

    if not args.verbose:  # transformers' per-load weight progress bar is noise around a one-line answer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    pruner = CacovidPruner(policy, device=None if device == "auto" else device, imp_ratio=imp_ratio)
    out = pruner.answer(
        model,
        args.video,
        args.question,
        retention=args.retention,
        num_frames=num_frames,
        max_new_tokens=max_new_tokens,
        problem_type=problem_type,
        options=options or None,
        keep_frames=bool(args.heatmap),
    )
    answer = out.text.strip()
    chosen = _chosen_option(answer, options) if options else None
    if args.heatmap:
        _draw_answer_heatmap(out, args, problem_type, answer)
    if args.json:
        print(
            json.dumps(
                {
                    "answer": answer,
                    "option": chosen,
                    "problem_type": problem_type,
                    "prompt": out.prompt,
                    "retention": args.retention,
                    "kept_tokens": len(out.kept_indices),
                    "total_tokens": out.num_video_tokens,
                    "kept_indices": [int(i) for i in out.kept_indices],
                    "timings_s": {k: round(v, 6) for k, v in out.timings.items()},
                    "policy": args.policy,
                    "model": model,
                    "device": str(pruner.device),
                    "max_frames": num_frames,
                    "token_frames": int(out.token_scores.shape[0]) if out.token_scores is not None else None,
                    "imp_ratio": imp_ratio,
                    "config": source,
                    "heatmap": args.heatmap or None,
                },
            )
        )
    else:
        print(f"answer: {chosen or answer}")
        print(
            f"kept {len(out.kept_indices)} of {out.num_video_tokens} video tokens "
            f"({out.kept_ratio:.1%}); {out.timings['total']:.2f} s on {pruner.device}"
            + (f"; heatmap: {args.heatmap}" if args.heatmap else "")
        )
    return 0


def _draw_answer_heatmap(out: Any, args: argparse.Namespace, problem_type: str, answer: str) -> None:
    """The report's heatmap (``eval.report.plot_heatmap``) of this one answer: frames, keep probabilities, kept."""
    from cacovid_rl.eval.report import Question, plot_heatmap

    q = Question(
        sample_id=Path(args.video).name,
        kind=problem_type,
        question=args.question,
        answer=answer,
        frames=out.frames,
        token_scores=out.token_scores,
        frame_scores=out.frame_scores,
        kept=[int(i) for i in out.kept_indices],
        oracle=None,
        answers={"kept": f"{len(out.kept_indices)} of {out.num_video_tokens} tokens"},
    )
    plot_heatmap(q, Path(args.heatmap), retention=args.retention)


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


def cmd_train_tiny_vlm(args: argparse.Namespace) -> int:
    from cacovid_rl.models.tiny_vlm import train_tiny_vlm

    train_tiny_vlm(args.data_dir, args.out, seed=args.seed, init_from=args.init_from)
    return 0


def cmd_convert_official(args: argparse.Namespace) -> int:
    from cacovid_rl.policy.official import convert_official

    # OfficialCheckpointError is a ValueError: main() prints it as one line and exits 2.
    summary = convert_official(
        args.ckpt_dir, args.out, attention=args.attention, dtype=args.dtype, overwrite=args.force
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "eval_defaults"}, indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cacovid_rl.eval.report import main as report_main

    if args.config:  # the report's fallback config takes presets too
        args.config = str(resolve_config(args.config))
    return report_main(args)


# ----------------------------------------------------------------------------------------------------------------------
# parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with every real default shown (``(default: 0.1)``) and examples kept as written.

    argparse's ``ArgumentDefaultsHelpFormatter`` would also print ``(default: None)`` / ``(default: False)``
    for flags without a value, which says nothing; those are left out. A help text that already names its
    default (``%(default)s`` or "default") is left as written.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default" in text.lower()
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == ""
            or default == []
            or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cacovid-rl")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _common_flags() -> argparse.ArgumentParser:
    """``--debug`` / ``--verbose`` accepted after the subcommand too (``cacovid-rl answer ... --debug``).

    Their defaults are SUPPRESS so a subcommand that does not see the flag leaves the top-level value alone.
    """
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return p


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="a shipped preset (debug_local: CPU, shipped tiny model, generated data; llava_ov_7b, "
        "llava_ov_7b_reference, qwen2_5_vl_7b, qwen2_5_vl_3b) or a YAML file (default: %(default)s)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.total_steps=20 model.device=cuda")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=HelpFormatter,
        epilog=_examples(
            "cacovid-rl train                      # local debug training (preset debug_local)",
            "cacovid-rl train --help               # every subcommand has examples",
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_flags()

    def add(name: str, help_text: str, func: Callable[[argparse.Namespace], int], *examples: str, **kw: Any):
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            parents=[common],
            formatter_class=HelpFormatter,
            epilog=_examples(*examples),
            **kw,
        )
        p.set_defaults(func=func)
        return p

    p = add(
        "train",
        "train a policy with Ray reward actors (local debug mode by default)",
        cmd_train,
        "cacovid-rl train --config debug_local --eval-after",
        "cacovid-rl train --config debug_local learner.total_steps=50 sampling.rate=0.25",
        "cacovid-rl train --config configs/llava_ov_7b.yaml --device cuda --resume",
    )
    _add_config_args(p)
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
    _add_config_args(p)
    p.add_argument("--policy", default="", help="policy directory (save_pretrained); omit for baselines only")
    p.add_argument("--data", default="", help="records JSON file to evaluate (default: the config's data.eval_path)")
    p.add_argument("--device", default=None, help="shorthand for model.device=D (cpu, cuda)")
    p.add_argument("--out", default="", help="output directory for JSON + PNG (default: <output_dir>/eval)")

    from cacovid_rl.answers import PROBLEM_TYPES  # light: no torch

    p = add(
        "answer",
        "answer a question about a video using only the tokens the policy keeps",
        cmd_answer,
        "cacovid-rl make-synthetic --out data/clips --n 10 --seed 1    # 10 clips; questions in data/clips/*.json",
        "cacovid-rl answer --policy runs/debug_local/policy --video data/clips/videos/test_000009.mp4 \\\n"
        '    --question "What colour are the dots in the cyan box ?" '
        '--options "A. red" "B. green" "C. blue" "D. yellow" --retention 0.1',
        "cacovid-rl answer --policy runs/debug_local/policy --video data/clips/videos/train_000007.mp4 \\\n"
        '    --question "How many dots are in the grey box ?" --problem-type numerical --json --heatmap kept.png',
    )
    p.add_argument("--policy", required=True, help="trained policy directory (e.g. runs/debug_local/policy)")
    p.add_argument("--video", required=True, help="video file")
    p.add_argument("--question", required=True, help="the question, without its options")
    p.add_argument(
        "--options",
        nargs="+",
        default=None,
        metavar="OPTION",
        help="multiple-choice options, as 'A. red' 'B. green' ... or bare 'red' 'green' (lettered A, B, ...), "
        "or one argument with one option per line; they are added to the question as the training records do",
    )
    p.add_argument(
        "--problem-type",
        default="auto",
        choices=["auto", *PROBLEM_TYPES],
        help="the instruction added to the prompt, as in training; auto: 'multiple choice' with --options, "
        "else 'free-form'",
    )
    p.add_argument("--retention", type=float, default=0.1, help="fraction of video tokens kept, in (0, 1]")
    p.add_argument(
        "--config",
        default=None,
        help="preset or YAML whose model.path, model.device, data.num_frames, eval.imp_ratio and "
        "model.max_new_tokens set the defaults below (default: the config.yaml the training run wrote beside "
        "--policy, else the built-in defaults)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides of that config, e.g. eval.imp_ratio=1.0 (before --options, which takes every "
        "argument after it)",
    )
    p.add_argument("--model", default=None, help="video LLM checkpoint directory, or tiny (default: model.path)")
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 or auto (default: model.device of a config file, else auto)"
    )
    p.add_argument(
        "--num-frames", type=int, default=None, help="frames read, at most 1 per second (default: data.num_frames)"
    )
    p.add_argument(
        "--imp-ratio",
        type=float,
        default=None,
        help="share of the kept tokens taken in the policy's ranking, the rest spread evenly (default: eval.imp_ratio)",
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer budget (default: model.max_new_tokens)")
    p.add_argument("--json", action="store_true", help="print answer, prompt, kept indices, token counts, timings")
    p.add_argument("--heatmap", default="", metavar="PNG", help="draw the frames with the kept tokens to this file")

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

    p = add(
        "train-tiny-vlm",
        "rebuild the shipped tiny video LLM from a seed (CPU)",
        cmd_train_tiny_vlm,
        "cacovid-rl train-tiny-vlm --data-dir /tmp/tiny_vlm_data --out cacovid_rl/assets/tiny_vlm --seed 0",
    )
    p.add_argument(
        "--data-dir",
        required=True,
        help="synthetic dataset directory (an empty or missing one is filled with its 10,000 videos first)",
    )
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0, help="model and data seed")
    p.add_argument(
        "--init-from",
        default=None,
        help="a phase-1 (full-token) checkpoint of the same seed: run only phase 2 (pruned inputs) from it",
    )

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

    # The report's options live in cacovid_rl.eval.report (it imports torch): its parser is only built when the
    # report runs or shows its help; here it is a placeholder that takes the rest of the line.
    p = sub.add_parser(
        "report", add_help=False, help="evaluation report (JSON + Markdown + PNG) over trained runs; see report --help"
    )
    p.add_argument("report_args", nargs=argparse.REMAINDER)
    return parser


def report_parser() -> argparse.ArgumentParser:
    """The report's own parser, presented as ``cacovid-rl report`` (usage, defaults, examples, --debug)."""
    from cacovid_rl.eval.report import build_parser as build_report_parser

    p = build_report_parser()
    p.prog = f"{PROG} report"
    p.formatter_class = HelpFormatter
    p.epilog = _examples(
        "cacovid-rl report --run runs/debug_local",
        "cacovid-rl report --run runs/report --out docs/report            # every seed under runs/report",
        "cacovid-rl report --run runs/qwen7b --data /mnt/data/videomme/test.parquet --layout videomme --device cuda",
    )
    for action in _common_flags()._actions:
        p._add_action(action)
    return p


def _is_user_error(exc: BaseException) -> bool:
    """Errors that mean "what you asked for cannot be done as asked", as opposed to a bug in this code.

    Value and file errors are how the library reports bad input (configs, records, policies, videos, model
    directories); the model-loading and video errors are ``RuntimeError``s, matched by type only where their
    module was imported (so this check imports nothing).
    """
    if isinstance(exc, (UserError, ValueError, OSError)):
        return True
    for module, name in (
        ("cacovid_rl.data.video", "VideoDecodeError"),
        ("cacovid_rl.models.loading", "ModelLoadError"),
        ("cacovid_rl.models.preprocessing", "VideoProcessorError"),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse the command line; ``report`` hands everything after its name to the report's own parser."""
    n_global = 0
    while n_global < len(argv) and argv[n_global].startswith("-"):
        n_global += 1
    if argv[n_global : n_global + 1] == ["report"]:
        top = build_parser().parse_args([*argv[:n_global], "report"])  # global flags, --version, --help
        args = report_parser().parse_args(argv[n_global + 1 :], namespace=top)
        args.func = cmd_report
        return args
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except Exception as exc:
        if args.debug or not _is_user_error(exc):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the message holds
        hint = "" if isinstance(exc, UserError) else " (--debug shows the traceback)"
        print(f"error: {message}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
