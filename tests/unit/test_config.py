from pathlib import Path

import pytest

from cacovid_rl.config import Config, ConfigError, load_config


def test_defaults_follow_the_published_recipe():
    cfg = load_config()
    assert cfg.sampling.num_samples == 32
    assert (cfg.sampling.num_content, cfg.sampling.num_token, cfg.sampling.num_frame) == (1, 23, 8)
    assert cfg.sampling.rate == 0.02 and cfg.rollout.iterations == 5
    assert cfg.learner.lr == 1e-6 and cfg.learner.decoder_lr_scale == 0.1 and cfg.seed == 42


def test_yaml_and_dotted_overrides(tmp_path: Path):
    p = tmp_path / "c.yaml"
    p.write_text("learner:\n  lr: 1e-4\n  total_steps: 7\neval:\n  retentions: [0.1, 0.25]\n")
    cfg = load_config(p, ["learner.total_steps=9", "model.device=cuda"])
    assert cfg.learner.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string; the loader accepts it as a float
    assert cfg.learner.total_steps == 9 and cfg.model.device == "cuda"
    assert cfg.eval.retentions == (0.1, 0.25)
    assert cfg.replace(**{"sampling.rate": 0.05}).sampling.rate == 0.05


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("learner.lrr=1", "learner.lrr"),
        ("bogus.x=1", "bogus"),
        ("learner.total_steps=abc", "learner.total_steps"),
        ("eval.retentions=[0.1, 1.5]", "eval.retentions"),
        ("sampling.rate=0", "sampling.rate"),
        ("model.dtype=float8", "model.dtype"),
        ("policy.bidirectional=maybe", "policy.bidirectional"),
        ("cluster.min_actors=5", "cluster.min_actors"),
    ],
)
def test_bad_values_name_the_key(override: str, needle: str):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_round_trip_through_dict():
    cfg = load_config(None, ["learner.lr=0.001"])
    from cacovid_rl.config import from_dict

    assert from_dict(cfg.to_dict()) == cfg
    assert isinstance(cfg, Config)


def test_every_shipped_config_loads():
    root = Path(__file__).resolve().parents[2] / "configs"
    paths = sorted(root.glob("*.yaml"))
    for path in paths:
        load_config(path)


def test_every_config_field_has_a_docstring():
    """A field without a docstring is a knob nobody can use: each one says what it does (and the why)."""
    import ast
    import dataclasses

    import cacovid_rl.config as config_module

    tree = ast.parse(Path(config_module.__file__).read_text())
    documented: set[tuple[str, str]] = set()
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for node, nxt in zip(cls.body, [*cls.body[1:], None], strict=True):
            value = nxt.value if isinstance(nxt, ast.Expr) else None
            is_doc = isinstance(value, ast.Constant) and isinstance(value.value, str)
            if isinstance(node, ast.AnnAssign) and is_doc:
                documented.add((cls.name, node.target.id))
    fields = {
        (cls.__name__, f.name)
        for cls in vars(config_module).values()
        if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == config_module.__name__
        for f in dataclasses.fields(cls)
    }
    assert fields and not fields - documented, sorted(fields - documented)
