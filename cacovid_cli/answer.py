"""``answer``: one question about one video, answered from the tokens a trained policy keeps."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cacovid_cli.common import AddCommand, UserError, load_policy, resolve_config
from cacovid_rl.config import Config, load_config


def split_options(values: Sequence[str] | None) -> list[str]:
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


def _checked_question(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The problem type and lettered options the flags ask for, after every check that needs no model."""
    from cacovid_rl.data.prompts import letter_options

    options = split_options(args.options)
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
    return problem_type, options


def cmd_answer(args: argparse.Namespace) -> int:
    problem_type, options = _checked_question(args)
    cfg, source = answer_settings(args)
    model = args.model or cfg.model.path
    # Without a config file the device follows the machine; a run's config names where its model ran.
    device = args.device or (cfg.model.device if source != "built-in defaults" else "auto")
    imp_ratio = cfg.eval.imp_ratio if args.imp_ratio is None else args.imp_ratio
    num_frames = args.num_frames or cfg.data.num_frames
    max_new_tokens = args.max_new_tokens or cfg.model.max_new_tokens
    policy = load_policy(args.policy)

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
    """The report's heatmap (``eval.plots.plot_heatmap``) of this one answer: frames, keep probabilities, kept."""
    from cacovid_rl.eval.plots import Question, plot_heatmap

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


def register(add: AddCommand) -> None:
    """Add ``answer``."""
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
