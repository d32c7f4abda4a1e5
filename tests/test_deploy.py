"""The deployment files, checked as far as a machine with no container engine, no cluster and no
GPU allows (docs/deploy.md lists what is and is not run).

* Dockerfile, Dockerfile.gpu: hadolint; the CPU image's steps replayed in a fresh venv, its own
  ``pip check`` included; the GPU image's steps replayed with every ``pip install`` resolved by
  ``pip install --dry-run --report`` instead (the CUDA wheels are about 3 GB) and ``pip check``'s
  rule applied to the resolved set.
* ray-cluster.yaml: Ray's own config validator (what ``ray up`` runs before it calls AWS), and the
  node types as batchinf's planner reads them; the dispatcher's restart loop is run.
* compose.yaml: the Compose Specification's JSON schema, and the services' wiring.
* deploy/k8s: Kubernetes' own schemas (kubernetes-validate) for the built-in kinds, and Ray's
  KubeRay translator for the RayCluster.
* Python, Ray and TensorFlow versions agree with pyproject.toml in every file.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import venv
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.imagebuild import DockerIgnore, read_dockerfile, replay, unmet_requirements

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
BIN = Path(sys.executable).parent
IMAGE_TAG = re.compile(r"batchinf:(?P<version>[^-\s]+)-ray(?P<ray>[\d.]+)-py(?P<py>\d+)-(?P<kind>cpu|gpu)")
RAY_BASE = re.compile(r"rayproject/ray:(?P<ray>[\d.]+)-py(?P<py>\d+)-(?P<kind>cpu|gpu)")


def tool(name: str) -> str:
    """A checker installed by ``pip install -e '.[test]'``; missing, the test fails (no skip)."""
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN}: run pip install -e '.[test]'")
    return str(path)


def pins() -> dict[str, str]:
    """The versions pyproject.toml pins: package, Python (major.minor), Ray and TensorFlow."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.split(r"[\[=<>~!]", d)[0]: d for d in project["dependencies"]}
    python = re.fullmatch(r">=(3\.\d+),<3\.\d+", project["requires-python"])
    ray = re.search(r"==(\d+\.\d+)\.\*", deps["ray"])
    tensorflow = re.search(r"==(\d+\.\d+)\.\*", deps["tensorflow-cpu"])
    assert python and ray and tensorflow, "pyproject.toml's pins changed form: update this test"
    return {"version": project["version"], "python": python[1], "ray": ray[1],
            "tensorflow": tensorflow[1], "tensorflow_pin": deps["tensorflow-cpu"]}


def k8s_docs() -> dict[str, dict[str, Any]]:
    """Every manifest under deploy/k8s by ``kind/name`` (the kustomization apart)."""
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] != "Kustomization":
                docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def in_fresh_python(code: str, env: dict[str, str] | None = None) -> Any:
    """Run ``code`` in a new interpreter of this venv; what it prints last, as JSON.

    Ray's checkers run apart because Ray reads RAY_AUTH_MODE once, when it is first imported:
    imported here, it would fix that mode for every later test of the session.
    """
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


@functools.cache
def _ray_cluster_config() -> str:
    return json.dumps(in_fresh_python(
        "import json, yaml; from ray.autoscaler._private.util import prepare_config; "
        "print(json.dumps(prepare_config(yaml.safe_load(open('ray-cluster.yaml')))))"))


def ray_cluster_config() -> dict[str, Any]:
    """ray-cluster.yaml as ``ray up`` prepares it (defaults filled in), before validating it."""
    return json.loads(_ray_cluster_config())


@functools.cache
def _kuberay_autoscaling_config() -> str:
    return json.dumps(in_fresh_python(
        "import json, yaml\n"
        "from ray.autoscaler._private.kuberay.autoscaling_config import "
        "_derive_autoscaling_config_from_ray_cr as derive\n"
        "from ray.autoscaler._private.util import prepare_config, validate_config\n"
        "docs = yaml.safe_load_all(open('deploy/k8s/raycluster.yaml'))\n"
        "(cluster,) = [d for d in docs if d and d['kind'] == 'RayCluster']\n"
        "cluster['metadata']['namespace'] = 'default'  # the API server fills it in\n"
        "derived = derive(cluster)\n"
        "validate_config(prepare_config(derived))\n"
        "print(json.dumps(derived))"))


def kuberay_autoscaling_config() -> dict[str, Any]:
    """What Ray's autoscaler makes of the RayCluster on KubeRay (validated by Ray)."""
    return json.loads(_kuberay_autoscaling_config())


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


# --- Dockerfiles -------------------------------------------------------------------------------


def test_hadolint_passes_both_dockerfiles_at_its_strictest(tmp_path: Path) -> None:
    config = ["--config", str(ROOT / ".hadolint.yaml")] if (ROOT / ".hadolint.yaml").exists() else []
    home = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}  # no user config loosens it
    done = subprocess.run([tool("hadolint"), "--failure-threshold", "style", "--no-color", *config,
                           "Dockerfile", "Dockerfile.gpu"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **home})
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_image_steps_and_containers_run_as_the_non_root_ray_user(name: str) -> None:
    instructions = read_dockerfile(ROOT / name)
    users = [i for i in instructions if i.keyword == "USER"]
    first_run = next(i.line for i in instructions if i.keyword == "RUN")
    assert users and users[0].line < first_run  # nothing runs as the base image's user by chance
    uid, _, gid = users[-1].value.partition(":")
    assert uid == "1000" and gid == "100"  # ray:users in Ray's images; numeric for runAsNonRoot
    chowns = {re.search(r"--chown=(\S+)", i.value)[1] for i in instructions
              if i.keyword == "COPY" and "--chown=" in i.value}
    assert chowns == {users[-1].value}


def test_build_context_is_the_package_and_the_job_specs() -> None:
    files = DockerIgnore(ROOT / ".dockerignore").context(ROOT)
    assert {"pyproject.toml", "README.md", "batchinf/cli.py", "jobs/nightly.yaml"} <= set(files)
    assert not [f for f in files if f.split("/")[0] in {".git", ".venv", "tests", "bench", "docs"}
                or "__pycache__" in f or f.startswith(".env")]


@pytest.fixture(scope="module")
def gpu_resolution(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Future[dict[str, Any]]]:
    """The GPU image's steps replayed with installs resolved, not run, in a background thread.

    It starts when the CPU image's (slower) replay asks for it, so the two overlap.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(_resolve_gpu_image, tmp_path_factory.mktemp("gpu-image"))


def _resolve_gpu_image(tmp: Path) -> dict[str, Any]:
    shim, reports = tmp / "bin", tmp / "reports"
    shim.mkdir()
    reports.mkdir()
    # `pip install ...` becomes a dry run that writes pip's installation report; `pip check`
    # is recorded and applied to the reports afterwards. --no-cache-dir is dropped, as for the
    # CPU image: pip's cache then answers what it can (the same packages, resolved the same way).
    (shim / "pip").write_text(
        '#!/bin/sh\nset -e\ncase "$1" in\n'
        '  install) shift; n=$(ls "$REPORTS" | wc -l)\n'
        '    for arg do shift; [ "$arg" = --no-cache-dir ] || set -- "$@" "$arg"; done\n'
        '    exec "$PYTHON" -m pip install --dry-run --ignore-installed --quiet '
        '--use-feature=fast-deps --report "$REPORTS/install-$n.json" "$@" ;;\n'
        '  check) touch "$REPORTS/check"; exit 0 ;;\n'
        '  *) echo "pip $1: not expected in the image build" >&2; exit 2 ;;\nesac\n'
    )
    (shim / "python").write_text('#!/bin/sh\nexec "$PYTHON" "$@"\n')
    for script in shim.iterdir():
        script.chmod(0o755)
    done = replay(ROOT / "Dockerfile.gpu", ROOT, tmp / "image", [shim],
                  {"PYTHON": sys.executable, "REPORTS": str(reports)})
    installs = [json.loads(p.read_text()) for p in sorted(reports.glob("install-*.json"))]
    return {"replay": done, "reports": installs, "checked": (reports / "check").exists(),
            "pyproject": (tmp / "image" / "app" / "pyproject.toml").read_text()}


def cached_pip(tmp: Path) -> Path:
    """A folder whose ``pip`` is the fresh venv's (``$VENV_PYTHON -m pip``) without --no-cache-dir."""
    shim = tmp / "cached-pip"
    shim.mkdir()
    (shim / "pip").write_text(
        '#!/bin/sh\nfor arg do shift; [ "$arg" = --no-cache-dir ] || set -- "$@" "$arg"; done\n'
        'exec "$VENV_PYTHON" -m pip "$@"\n'
    )
    (shim / "pip").chmod(0o755)
    return shim


def test_cpu_image_installs_in_a_fresh_venv_and_passes_pip_check(
    tmp_path: Path, gpu_resolution: Future[dict[str, Any]]
) -> None:
    """The CPU Dockerfile's own steps, run as written; pip check is one of them."""
    assert sys.version_info[:2] == tuple(map(int, pins()["python"].split(".")))
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    # PIP_COMPILE=0 only skips writing .pyc files: tens of seconds saved, no package changed.
    # The pip shim drops the Dockerfile's --no-cache-dir (it keeps the image small), so the
    # same packages, resolved the same way, come from pip's cache instead of ~700 MB of
    # downloads on every run.
    done = replay(ROOT / "Dockerfile", ROOT, tmp_path / "image", [cached_pip(tmp_path), python.parent],
                  {"VIRTUAL_ENV": str(python.parent.parent), "PIP_COMPILE": "0",
                   "VENV_PYTHON": str(python)})
    assert any("pip check" in run for run in done.runs)
    versions = json.loads(subprocess.run(
        [python, "-c", "import json, importlib.metadata as m; print(json.dumps({d: m.version(d) "
         "for d in ('batchinf', 'ray', 'tensorflow-cpu')}))"],
        capture_output=True, text=True, check=True).stdout)
    assert versions["batchinf"] == pins()["version"]
    assert versions["ray"].startswith(pins()["ray"] + ".")
    assert versions["tensorflow-cpu"].startswith(pins()["tensorflow"] + ".")
    subprocess.run([python.parent / "batchinf", "--help"], capture_output=True, check=True)
    assert (tmp_path / "image" / "app" / "jobs" / "nightly.yaml").is_file()


def test_gpu_image_resolves_cuda_tensorflow_without_tensorflow_cpu(
    gpu_resolution: Future[dict[str, Any]]
) -> None:
    result = gpu_resolution.result(timeout=600)
    deps, package = result["reports"]
    resolved = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in deps["install"]}
    assert "tensorflow-cpu" not in resolved
    assert resolved["tensorflow"].startswith(pins()["tensorflow"] + ".")
    assert resolved["ray"].startswith(pins()["ray"] + ".")
    assert {"nvidia-cudnn-cu12", "nvidia-cublas-cu12"} <= set(resolved)
    (batchinf,) = package["install"]
    requires = batchinf["metadata"]["requires_dist"]
    assert f"tensorflow[and-cuda]=={pins()['tensorflow']}.*" in requires
    assert not [r for r in requires if r.startswith("tensorflow-cpu")]
    assert result["checked"]
    assert '"tensorflow[and-cuda]==' in result["pyproject"] and "tensorflow-cpu" not in result["pyproject"]
    assert unmet_requirements(deps["install"] + package["install"], deps["environment"]) == []
    assert result["replay"].env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"


# --- ray-cluster.yaml --------------------------------------------------------------------------


def test_ray_cluster_passes_rays_own_validator() -> None:
    assert in_fresh_python(
        "import yaml; from ray.autoscaler._private.util import prepare_config, validate_config; "
        "validate_config(prepare_config(yaml.safe_load(open('ray-cluster.yaml')))); print('true')")


def test_ray_cluster_head_takes_no_work_and_runs_the_dispatcher() -> None:
    config = ray_cluster_config()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and head["max_workers"] == 0
    start = " ".join(config["head_start_ray_commands"])
    assert "ray start --head --num-cpus=0" in start
    assert re.search(r"while true; do batchinf dispatcher --address http://127\.0\.0\.1:8265\b",
                     start)


def test_ray_cluster_gpu_runs_only_on_the_gpu_type_with_its_own_image() -> None:
    config = ray_cluster_config()
    docker, types = config["docker"], config["available_node_types"]
    assert IMAGE_TAG.search(docker["head_image"])["kind"] == "cpu"
    assert IMAGE_TAG.search(types["cpu"]["docker"]["worker_image"])["kind"] == "cpu"
    assert IMAGE_TAG.search(types["gpu"]["docker"]["worker_image"])["kind"] == "gpu"
    shared = docker.get("run_options", []) + docker.get("head_run_options", [])
    assert not [o for o in shared + types["cpu"]["docker"].get("worker_run_options", [])
                if "--gpus" in o]
    assert types["gpu"]["docker"]["worker_run_options"] == ["--gpus all"]
    assert types["gpu"]["resources"]["GPU"] == 1 and types["gpu"]["resources"]["gpu_node"] == 1
    assert types["gpu"]["min_workers"] == 0 < types["gpu"]["max_workers"]
    assert types["cpu"]["min_workers"] >= 1


def test_ray_cluster_token_and_store_come_from_outside_the_file() -> None:
    config = ray_cluster_config()
    options = dict(o.removeprefix("--env ").split("=", 1) for o in config["docker"]["run_options"]
                   if o.startswith("--env "))
    assert options["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in options
    mounted = [remote for remote, local in config["file_mounts"].items()
               if options["RAY_AUTH_TOKEN_PATH"].startswith(remote + "/")]
    assert mounted and config["file_mounts"][mounted[0]].startswith("~/")  # kept outside the repo
    assert options["BATCHINF_STORE"].startswith("s3://")


def test_ray_cluster_node_types_are_what_batchinf_plans_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(ray_cluster_config()))
    monkeypatch.delenv("BATCHINF_NODE_TYPES", raising=False)
    types = in_fresh_python("import json; from batchinf.pool import autoscaler_node_types; "
                            "print(json.dumps(autoscaler_node_types()))", {"HOME": str(tmp_path)})
    assert types == [{"CPU": 16.0}, {"CPU": 8.0, "GPU": 1.0, "gpu_node": 1.0}]


def test_dispatcher_loop_restarts_it_and_a_rerun_replaces_the_loop(tmp_path: Path) -> None:
    """The head's dispatcher command, run with a stand-in `batchinf` that exits at once."""
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "batchinf"
    fake.write_text('#!/bin/sh\necho "started: $*"\nexit 3\n')
    fake.chmod(0o755)
    command = next(c for c in ray_cluster_config()["head_start_ray_commands"] if "dispatcher" in c)
    env = {**os.environ, "HOME": str(tmp_path), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    pgid_file, log = tmp_path / "batchinf-dispatcher.pgid", tmp_path / "batchinf-dispatcher.log"
    groups = []
    try:
        for _ in range(2):
            subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
            deadline = time.monotonic() + 10
            while not (pgid_file.exists() and pgid_file.read_text().strip().isdigit()
                       and int(pgid_file.read_text()) not in groups):
                assert time.monotonic() < deadline, "the loop did not start"
                time.sleep(0.1)
            groups.append(int(pgid_file.read_text()))
        deadline = time.monotonic() + 10
        while log.read_text().count("exited with status 3; restarting in 5 s") < 2:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert _alive(groups[1])
        deadline = time.monotonic() + 10
        while _alive(groups[0]):  # the rerun stopped the first loop
            assert time.monotonic() < deadline, "the first loop still runs"
            time.sleep(0.1)
    finally:
        for group in groups:
            if _alive(group):
                os.killpg(group, signal.SIGTERM)


def _alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` runs (zombies waiting to be reaped do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rpartition(")")[2].split()[:3]
        except (OSError, ValueError):
            continue  # exited meanwhile
        if int(group) == pgid and state != "Z":
            return True
    return False


# --- compose.yaml ------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    done = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                           "compose.yaml"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_stack_minio_buckets_head_with_dispatcher_and_worker() -> None:
    services = compose()["services"]
    assert set(services) == {"minio", "minio-buckets", "ray-head", "ray-worker"}
    assert services["minio-buckets"]["depends_on"]["minio"]["condition"] == "service_healthy"
    buckets = re.findall(r"local/([a-z0-9-]+)", services["minio-buckets"]["command"][0])
    assert set(buckets) == {"batchinf", "images", "models", "predictions"}
    head, worker = services["ray-head"], services["ray-worker"]
    assert head["depends_on"]["minio-buckets"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert head["build"]["dockerfile"] == "Dockerfile" and head["image"] == worker["image"]
    script = head["command"][-1]
    assert "ray start --head --num-cpus=0" in script and "--block" in script
    assert re.search(r"while true; do\s+batchinf dispatcher --address http://127\.0\.0\.1:8265", script)
    assert "--address=ray-head:6379" in worker["command"]


def test_compose_env_ports_and_credentials_are_local_only() -> None:
    services = compose()["services"]
    for name in ("ray-head", "ray-worker"):
        env = services[name]["environment"]
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert env["BATCHINF_STORE"].startswith("s3://batchinf/")  # a bucket minio-buckets makes
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")  # no default token
        assert env["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
    ports = [p for s in services.values() for p in s.get("ports", [])]
    assert "127.0.0.1:8265:8265" in ports
    assert all(p.startswith("127.0.0.1:") for p in ports)
    assert "local-only" in (ROOT / "compose.yaml").read_text().lower()


# --- deploy/k8s --------------------------------------------------------------------------------


def test_kubernetes_manifests_pass_kubernetes_schemas_strictly() -> None:
    import kubernetes_validate

    native = {k: d for k, d in k8s_docs().items() if "." not in d["apiVersion"].split("/")[0]}
    assert set(native) == {"ServiceAccount/batchinf", "Deployment/batchinf-dispatcher",
                           "CronJob/batchinf-nightly"}
    for doc in native.values():
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_applies_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_raycluster_node_types_through_rays_kuberay_translator() -> None:
    derived = kuberay_autoscaling_config()
    types = {k: v["resources"] for k, v in derived["available_node_types"].items()}
    assert types["headgroup"]["CPU"] == 0 and "GPU" not in types["headgroup"]
    assert types["cpu"]["CPU"] == 8 and "GPU" not in types["cpu"]
    assert types["gpu"]["GPU"] == 1 and types["gpu"]["gpu_node"] == 1


def test_raycluster_gpu_limits_and_image_only_on_the_gpu_group() -> None:
    spec = k8s_docs()["RayCluster/batchinf"]["spec"]
    assert spec["rayVersion"].startswith(pins()["ray"] + ".")
    groups = {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"
    for name, group in groups.items():
        (container,) = group["template"]["spec"]["containers"]
        kind = IMAGE_TAG.search(container["image"])["kind"]
        gpus = {k: v for part in container["resources"].values() for k, v in part.items()
                if k == "nvidia.com/gpu"}
        assert (kind, bool(gpus)) == (("gpu", True) if name == "gpu" else ("cpu", False)), name
        assert container["resources"]["requests"] == container["resources"]["limits"], name
    (gpu_container,) = groups["gpu"]["template"]["spec"]["containers"]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert groups["gpu"]["minReplicas"] == 0 < groups["gpu"]["maxReplicas"]


def test_ray_token_comes_from_a_secret_that_is_not_in_the_repo() -> None:
    docs = k8s_docs()
    assert not [k for k in docs if k.startswith("Secret/")]
    auth = docs["RayCluster/batchinf"]["spec"]["authOptions"]
    assert auth == {"mode": "token", "secretName": "ray-auth-token"}
    env = env_of(docs["Deployment/batchinf-dispatcher"]["spec"]["template"]["spec"]["containers"][0])
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN"] == {"secretKeyRef": {"name": "ray-auth-token", "key": "auth_token"}}


def test_dispatcher_knows_the_worker_groups_the_autoscaler_can_add() -> None:
    docs = k8s_docs()
    cluster = docs["RayCluster/batchinf"]
    derived = kuberay_autoscaling_config()["available_node_types"]
    addable = [{k: v for k, v in t["resources"].items() if k != "memory"}
               for t in derived.values() if t["max_workers"] > 0]
    (dispatcher,) = docs["Deployment/batchinf-dispatcher"]["spec"]["template"]["spec"]["containers"]
    assert json.loads(env_of(dispatcher)["BATCHINF_NODE_TYPES"]) == addable
    assert dispatcher["image"] == cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    head_service = f"http://{cluster['metadata']['name']}-head-svc:8265"
    assert dispatcher["command"][:4] == ["batchinf", "dispatcher", "--address", head_service]


def test_cronjob_submits_the_nightly_spec_for_the_schedules_date() -> None:
    docs = k8s_docs()
    cron = docs["CronJob/batchinf-nightly"]["spec"]
    (container,) = cron["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    head_service = f"http://{docs['RayCluster/batchinf']['metadata']['name']}-head-svc:8265"
    assert container["command"][:2] == ["bash", "-c"]
    assert container["command"][2] == (
        f'exec batchinf submit /app/jobs/nightly.yaml --date "$(date +%F)" --address {head_service}'
    )
    assert (ROOT / "jobs" / "nightly.yaml").is_file()  # in the image at /app/jobs (WORKDIR /app)
    assert env_of(container)["TZ"] == cron["timeZone"]  # $(date +%F) is the schedule's date
    dispatcher = docs["Deployment/batchinf-dispatcher"]["spec"]["template"]["spec"]["containers"][0]
    assert env_of(container)["BATCHINF_STORE"] == env_of(dispatcher)["BATCHINF_STORE"]
    assert cron["concurrencyPolicy"] == "Forbid"


# --- versions ----------------------------------------------------------------------------------


def test_python_ray_and_tensorflow_versions_agree_everywhere() -> None:
    want = pins()
    py = want["python"].replace(".", "")
    bases = {}
    for name in ("Dockerfile", "Dockerfile.gpu"):
        (base,) = [i.value for i in read_dockerfile(ROOT / name) if i.keyword == "FROM"]
        match = RAY_BASE.fullmatch(base)
        assert match and match["py"] == py and match["ray"].startswith(want["ray"] + "."), base
        bases[match["kind"]] = match["ray"]
    assert bases.keys() == {"cpu", "gpu"} and bases["cpu"] == bases["gpu"]
    # TensorFlow: the CPU image takes pyproject's pin as it is; the GPU image swaps exactly it.
    assert not [i for i in read_dockerfile(ROOT / "Dockerfile") if "tensorflow" in i.value.lower()]
    gpu_file = (ROOT / "Dockerfile.gpu").read_text().replace("\\", "")
    assert f'"{want["tensorflow_pin"]}"' in gpu_file
    assert f'"tensorflow[and-cuda]=={want["tensorflow"]}.*"' in gpu_file
    files = [ROOT / "ray-cluster.yaml", ROOT / "compose.yaml", *sorted(K8S.glob("*.yaml"))]
    tags = {p.name: list(IMAGE_TAG.finditer(p.read_text())) for p in files}
    assert {n for n, found in tags.items() if found} == {
        "ray-cluster.yaml", "compose.yaml", "raycluster.yaml", "dispatcher.yaml", "cronjob.yaml"}
    for name, found in tags.items():
        for tag in found:
            assert (tag["version"], tag["ray"], tag["py"]) == (
                want["version"], bases[tag["kind"]], py), (name, tag[0])
    assert k8s_docs()["RayCluster/batchinf"]["spec"]["rayVersion"] == bases["cpu"]


def test_no_token_or_secret_key_is_written_in_a_deployment_file() -> None:
    for path in [ROOT / "ray-cluster.yaml", ROOT / "compose.yaml", *K8S.glob("*.yaml")]:
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_TOKEN[=:]\s*['\"]?[0-9A-Za-z]{16,}", text), path.name
        assert not re.search(r"auth_token:\s*\S", text), path.name
        assert not re.search(r"AWS_SECRET_ACCESS_KEY[=:]\s*[A-Za-z0-9/+]{30,}", text), path.name


def test_every_deployment_limits_what_manifest_rows_may_read_locally() -> None:
    cluster = yaml.safe_load((ROOT / "ray-cluster.yaml").read_text())
    assert "--env BATCHINF_LOCAL_ROOTS=/data" in cluster["docker"]["run_options"]
    assert compose()["services"]["ray-head"]["environment"]["BATCHINF_LOCAL_ROOTS"] == "/data"
    dispatcher = k8s_docs()["Deployment/batchinf-dispatcher"]
    assert env_of(dispatcher["spec"]["template"]["spec"]["containers"][0])["BATCHINF_LOCAL_ROOTS"] == "/data"
