"""What every subcommand shares: the user-error type, config presets and ``--config``, policy loading, help text.

Light on purpose: ``cacovid-rl --help`` imports this module, so torch, transformers and Ray wait for the
subcommand that needs them.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import cacovid_rl
from cacovid_rl.config import Config, ConfigError, load_config

PROG = "cacovid-rl"
DEFAULT_CONFIG = "debug_local"
"""The preset ``train`` and ``eval`` use without ``--config``: CPU, the shipped tiny model, generated data."""
LIBRARY_DIR = Path(cacovid_rl.__file__).resolve().parent
"""The installed library: a wheel carries the presets inside it (``cacovid_rl/configs``)."""


class UserError(Exception):
    """A mistake in what the user asked for (a missing file, a wrong flag combination): one line, exit 2."""


Command = Callable[[argparse.Namespace], int]


class AddCommand(Protocol):
    """``main.build_parser``'s way to add a subcommand: its parser, with help, examples and ``--debug``."""

    def __call__(
        self, name: str, help_text: str, func: Command, *examples: str, **kw: Any
    ) -> argparse.ArgumentParser: ...


# ----------------------------------------------------------------------------------------------------------------------
# configs: named presets shipped with the package, or paths


def preset_dirs() -> list[Path]:
    """Where the shipped configs are: inside the installed package, else the source checkout's ``configs/``.

    A wheel carries ``configs/*.yaml`` as ``cacovid_rl/configs/`` (package data); an editable install or a
    plain checkout reads the repository's ``configs/``, which stays the one copy that is edited and
    documented. The checkout is only trusted beside its ``pyproject.toml``, so a stray ``configs`` folder in
    ``site-packages`` is never mistaken for the presets.
    """
    dirs = [LIBRARY_DIR / "configs"]
    if (LIBRARY_DIR.parent / "pyproject.toml").is_file():
        dirs.append(LIBRARY_DIR.parent / "configs")
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


def config_from_args(args: argparse.Namespace, extra: Sequence[str] = ()) -> Config:
    """The config of ``--config``; ``extra`` overrides (from flags such as ``--device``) come before the dotted
    ones on the command line, so an explicit ``model.device=...`` still wins."""
    return load_config(resolve_config(args.config), [*extra, *args.overrides])


def device_overrides(device: str | None, keys: Sequence[str]) -> list[str]:
    """``--device D`` as the dotted overrides ``key=D`` of ``keys`` (none without the flag)."""
    return [f"{k}={device}" for k in keys] if device else []


def load_policy(path: str) -> Any:
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


# ----------------------------------------------------------------------------------------------------------------------
# help text and shared flags


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


def examples(*lines: str) -> str:
    """A help epilog listing command lines, indented under ``examples:``."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def common_flags() -> argparse.ArgumentParser:
    """``--debug`` / ``--verbose`` accepted after the subcommand too (``cacovid-rl answer ... --debug``).

    Their defaults are SUPPRESS so a subcommand that does not see the flag leaves the top-level value alone.
    """
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return p


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config`` (preset or YAML, ``debug_local`` by default) and the dotted overrides after it."""
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="a shipped preset (debug_local: CPU, shipped tiny model, generated data; llava_ov_7b, "
        "llava_ov_7b_reference, qwen2_5_vl_7b, qwen2_5_vl_3b) or a YAML file (default: %(default)s)",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.total_steps=20 model.device=cuda")
