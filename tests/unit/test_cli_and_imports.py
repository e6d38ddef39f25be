"""The command line's surface and the library's Ray-free import contract."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cacovid_rl.cli import main

SUBCOMMANDS = ["train", "eval", "answer", "blind-test", "make-synthetic", "train-tiny-vlm", "report"]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_has_help(sub: str, capsys):
    with pytest.raises(SystemExit) as exc:
        main([sub, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_config_errors_name_the_key_and_exit_2(capsys):
    assert main(["train", "--config", "configs/debug_local.yaml", "learner.lrr=1"]) == 2
    assert "learner.lrr" in capsys.readouterr().err


def test_library_never_imports_ray():
    code = (
        "import importlib, pkgutil, sys, cacovid_rl\n"
        "for m in pkgutil.walk_packages(cacovid_rl.__path__, 'cacovid_rl.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(k for k in sys.modules if k == 'ray' or k.startswith('ray.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
