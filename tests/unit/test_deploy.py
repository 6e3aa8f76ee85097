"""Offline checks of the deployment files: docker-compose.yml (+ deploy/compose.gpu.yml), the
Dockerfiles, deploy/redis.conf, deploy/gpu-slot.sh and the Kubernetes manifests in deploy/k8s.

Schema validation uses the validators from the `test` extra (check-jsonschema with the bundled
compose-spec schema, kubernetes-validate with its bundled Kubernetes schemas); they are run from the
same environment as this interpreter. Nothing here needs Docker, a cluster or the network."""
from __future__ import annotations

import copy
import fcntl
import functools
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install '.[test]')")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "compose.gpu.yml"
COMPOSE_AWS = DEPLOY / "compose.aws.yml"
COMPOSE_SENTINEL = DEPLOY / "compose.sentinel.yml"
BITNAMI_SENTINEL = K8S / "sentinel" / "bitnami-values.yaml"
MINIO_ENV = DEPLOY / "minio.env"
REDIS_CONF = DEPLOY / "redis.conf"
DOCKERFILE_WORKER = DEPLOY / "Dockerfile.worker"
DOCKERFILE_PRODUCER = DEPLOY / "Dockerfile.producer"
GPU_SLOT = DEPLOY / "gpu-slot.sh"
BIN = Path(sys.executable).parent

NAMESPACE = "hardnet"
QUEUE = "hardnet"
WORKER_CMD = ["hardnet", "worker"]
TORCH_HOME = "/cache/torch"

#: Every variable our containers may be given: the HARDNET_* settings, boto3's S3 chain, TORCH_HOME.
KNOWN_ENV = {
    "HARDNET_BROKER_URL", "HARDNET_MODEL", "HARDNET_WEIGHTS", "HARDNET_DEVICE",
    "HARDNET_BATCH_SIZE", "HARDNET_VISIBILITY_TIMEOUT", "HARDNET_FILE_ROOTS",
    "HARDNET_ALLOW_HTTP", "HARDNET_HTTP_ALLOW_HOSTS", "HARDNET_MAX_MEMORY_PER_CHILD_MB",
    "HARDNET_TASK_EVENTS", "HARDNET_LOG_FORMAT",
    "HARDNET_METRICS_PORT", "HARDNET_SHUTDOWN_GRACE",
    "HARDNET_SENTINEL_MASTER", "HARDNET_SENTINEL_PASSWORD",
    "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
    "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
    "TORCH_HOME",
}
#: Seconds a stopping worker needs after its grace to hand chunks back and exit (worker/shutdown.py).
EXIT_MARGIN_S = 10
#: Used only by the Redis server and KEDA, never given to a worker or the producer.
INFRA_ENV = {"REDIS_PASSWORD"}
#: Image-level variables the Dockerfiles may set besides KNOWN_ENV.
IMAGE_ENV = {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PIP_NO_CACHE_DIR",
             "PIP_DISABLE_PIP_VERSION_CHECK"}

#: Manifests not in kustomization.yaml: an example, and the Prometheus Operator monitors (they need
#: its CRDs, which not every cluster has; deploy/README.md says to apply them by hand).
K8S_EXAMPLES = {"producer-job.yaml", "monitoring.yaml"}
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")


# --------------------------------------------------------------------------------------------- helpers

def tool(name: str) -> str:
    exe = BIN / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install '.[test]')")
    return found


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@functools.lru_cache(maxsize=None)
def _k8s_docs() -> tuple[tuple[Path, dict], ...]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path, d) for d in load_all(path)]
    return tuple(out)


def k8s_docs() -> list[tuple[Path, dict]]:
    """Every document of deploy/k8s/*.yaml except kustomization.yaml (deep copies)."""
    return copy.deepcopy(list(_k8s_docs()))


def find(kind: str, name: str | None = None) -> dict:
    hits = [d for _, d in k8s_docs()
            if d["kind"] == kind and (name is None or d["metadata"].get("name") == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def compose() -> dict:
    return load_yaml(COMPOSE)


def compose_gpu() -> dict:
    return load_yaml(COMPOSE_GPU)


def env_names(env) -> set[str]:
    if env is None:
        return set()
    if isinstance(env, dict):
        return set(env)
    return {e.split("=", 1)[0] for e in env}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        lines.append(buf)
        buf = ""
    out = []
    for line in lines:
        instr, _, rest = line.partition(" ")
        out.append((instr.upper(), rest.strip()))
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instr, args in dockerfile_instructions(path):
        if instr == "FROM":
            result.append([])
        if result:
            result[-1].append((instr, args))
    return result


def json_form(args: str) -> list[str]:
    import json
    value = json.loads(args)
    assert isinstance(value, list), args
    return value


def dockerfile_env(path: Path) -> dict[str, str]:
    env = {}
    for instr, args in dockerfile_instructions(path):
        if instr == "ENV":
            for tok in shlex.split(args):
                k, _, v = tok.partition("=")
                env[k] = v
    return env


def redis_conf(text: str) -> dict[str, str]:
    conf = {}
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            k, _, v = s.partition(" ")
            conf[k.lower()] = v.strip()
    return conf


# --------------------------------------------------------------------------------------------- compose

def test_compose_files_match_the_compose_spec(tmp_path):
    exe = tool("check-jsonschema")
    r = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE), str(COMPOSE_GPU),
                        str(COMPOSE_AWS), str(COMPOSE_SENTINEL)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr

    # The validator really bites (a typo'd key is rejected), so a pass above means something.
    bad = tmp_path / "bad-compose.yml"
    bad.write_text("services:\n  x:\n    image: redis:7\n    restart_policy: always\n")
    r = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0


def test_compose_services():
    c = compose()
    svc = c["services"]
    assert {"redis", "minio", "minio-init", "worker", "producer", "flower"} <= set(svc)

    redis = svc["redis"]
    assert redis["image"] == "redis:7"
    assert "healthcheck" in redis
    mounts = redis["volumes"]
    conf_mount = next(m for m in mounts if m.startswith("./deploy/redis.conf:"))
    conf_path = conf_mount.split(":")[1]
    assert conf_path in redis["command"], "redis must be started with the mounted redis.conf"
    data_vol = next(m for m in mounts if m.endswith(":/data"))
    assert data_vol.split(":")[0] in c["volumes"], "redis data must be on a named volume"

    init = svc["minio-init"]
    assert init["image"].split(":")[0] == "minio/mc"
    script = "\n".join(init["command"]) if isinstance(init["command"], list) else init["command"]
    assert "hardnet-input" in script and "hardnet-results" in script and "--ignore-existing" in script

    worker = svc["worker"]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile.worker"
    assert worker["command"] == WORKER_CMD
    assert worker["environment"]["HARDNET_DEVICE"] in ("auto", "${HARDNET_DEVICE:-auto}")
    assert worker["environment"]["TORCH_HOME"] == TORCH_HOME
    hub = next(m for m in worker["volumes"] if m.split(":")[1] == TORCH_HOME)
    assert hub.split(":")[0] in c["volumes"], "torch hub cache must be a named (shared) volume"
    assert "deploy" not in worker, "the base file must run on CPU-only hosts (GPU is in compose.gpu.yml)"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["depends_on"]["minio-init"] == {"condition": "service_completed_successfully",
                                                  "required": False}
    assert "container_name" not in worker, "a fixed container name prevents --scale worker=N"

    producer = svc["producer"]
    assert producer["profiles"] == ["tools"]
    assert producer["build"]["dockerfile"] == "deploy/Dockerfile.producer"
    state = next(m for m in producer["volumes"] if m.endswith(":/home/hardnet/.local/state/hardnet"))
    assert state.split(":")[0] in c["volumes"], "the producer's job records must outlive `run --rm`"

    for name in ("worker", "producer"):
        env = svc[name]["environment"]
        assert env["HARDNET_BROKER_URL"].endswith("redis://redis:6379/0}") or \
            env["HARDNET_BROKER_URL"] == "redis://redis:6379/0"
        # no default may override boto3's chain: unset in the shell = empty = skipped by boto3
        for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                    "AWS_PROFILE"):
            assert env[var] == f"${{{var}:-}}", (name, var, env[var])
        assert env["HARDNET_TASK_EVENTS"] == "${HARDNET_TASK_EVENTS:-true}"


def test_compose_minio_is_a_profile_with_its_own_env_file():
    svc = compose()["services"]
    for name in ("minio", "minio-init"):
        assert svc[name]["profiles"] == ["minio"]
    env = dict(l.split("=", 1) for l in MINIO_ENV.read_text().splitlines() if l and not l.startswith("#"))
    assert env["COMPOSE_PROFILES"] == "minio"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    # MinIO's root keys come from the same variables the workers read
    assert svc["minio"]["environment"]["MINIO_ROOT_USER"] == "${AWS_ACCESS_KEY_ID:-}"
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]


def test_compose_flower_service():
    svc = compose()["services"]
    f = svc["flower"]
    assert f["build"]["dockerfile"] == "deploy/Dockerfile.producer"
    assert f["build"]["args"]["EXTRAS"] == "monitor"
    assert f["entrypoint"][-1] == "celery" and "flower" in f["command"]
    assert any(a.startswith("--broker=${HARDNET_BROKER_URL") for a in f["command"])
    assert f["ports"] == ["127.0.0.1:5555:5555"], "loopback only unless the operator adds auth"
    assert f["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_metrics():
    svc = compose()["services"]
    w = svc["worker"]
    assert w["environment"]["HARDNET_METRICS_PORT"] == "${HARDNET_METRICS_PORT:-9807}"
    assert w["expose"] == ["9807"]
    e = svc["exporter"]
    assert e["command"][0] == "exporter" and e["build"]["dockerfile"] == "deploy/Dockerfile.producer"
    assert e["ports"] == ["127.0.0.1:9808:9808"]


def test_compose_aws_override_mounts_the_config_read_only():
    a = load_yaml(COMPOSE_AWS)
    for name in ("worker", "producer"):
        assert a["services"][name]["volumes"] == ["${AWS_CONFIG_DIR:-~/.aws}:/home/hardnet/.aws:ro"]


def test_compose_gpu_override():
    g = compose_gpu()
    worker = g["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    # each replica claims one GPU through the slot script, then runs the worker command
    assert worker["entrypoint"][-1] == "hardnet-gpu-slot"
    assert worker["command"] == WORKER_CMD
    lock_vol = next(m for m in worker["volumes"] if m.endswith(":/gpu-locks"))
    assert lock_vol.split(":")[0] in g["volumes"]


def _seconds(duration: str) -> float:
    """A compose duration (``30s``, ``1m30s``, ``15m``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_shutdown_grace_agrees_with_the_platforms_kill():
    """SIGTERM -> HARDNET_SHUTDOWN_GRACE for running chunks -> hand back, exit within the margin:
    compose's stop_grace_period and the pod's terminationGracePeriodSeconds must leave both."""
    from worker.settings import WorkerSettings
    from worker.shutdown import EXIT_MARGIN_S as margin

    assert margin == EXIT_MARGIN_S
    default = WorkerSettings.model_fields["shutdown_grace"].default
    worker = compose()["services"]["worker"]
    assert worker["environment"]["HARDNET_SHUTDOWN_GRACE"] == f"${{HARDNET_SHUTDOWN_GRACE:-{default:g}}}"
    assert default + EXIT_MARGIN_S <= _seconds(worker["stop_grace_period"])
    for override in (COMPOSE_GPU, COMPOSE_AWS):
        svc = (load_yaml(override).get("services") or {}).get("worker") or {}
        assert "stop_grace_period" not in svc or default + EXIT_MARGIN_S <= _seconds(svc["stop_grace_period"])
    cm = find("ConfigMap", "hardnet-config")["data"]
    assert float(cm["HARDNET_SHUTDOWN_GRACE"]) == default
    pod = find("Deployment", "hardnet-worker")["spec"]["template"]["spec"]
    # Kubernetes' default period, which GKE and EKS node drains honour
    assert default + EXIT_MARGIN_S <= pod["terminationGracePeriodSeconds"] <= 30


def test_compose_sentinel_override():
    """A replica and three sentinels, and every Redis client of the fleet pointed at them."""
    from hnq.redis_conn import parse_sentinel

    o = load_yaml(COMPOSE_SENTINEL)["services"]
    base = compose()["services"]
    sentinels = sorted(n for n in o if n.startswith("sentinel"))
    assert sentinels == ["sentinel1", "sentinel2", "sentinel3"]
    replica = o["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1:replica.index("--replicaof") + 3] == ["redis", "6379"]
    for n in sentinels:
        conf = " ".join(o[n]["command"])
        m = re.search(r"sentinel monitor (\S+) redis 6379 (\d+)", conf)
        assert m and int(m.group(2)) == 2, conf                       # quorum: a majority of three
        assert "--sentinel" in conf and "announce-hostnames yes" in conf
    for name in ("worker", "producer", "exporter"):
        env = o[name]["environment"]
        assert name in base and env["HARDNET_SENTINEL_MASTER"] == m.group(1)
        nodes = parse_sentinel(env["HARDNET_BROKER_URL"]).nodes
        assert nodes == [(n, 26379) for n in sentinels]
        assert env_names(env) <= KNOWN_ENV


def test_bitnami_sentinel_values():
    v = load_yaml(BITNAMI_SENTINEL)
    assert v["architecture"] == "replication" and v["sentinel"]["enabled"] is True
    assert v["sentinel"]["quorum"] * 2 > v["replica"]["replicaCount"]
    text = BITNAMI_SENTINEL.read_text()
    assert f"HARDNET_SENTINEL_MASTER: \"{v['sentinel']['masterSet']}\"" in text


def test_compose_env_names_are_known():
    c, g = compose(), compose_gpu()
    for name in ("worker", "producer"):
        used = env_names(c["services"][name].get("environment"))
        assert used <= KNOWN_ENV, f"compose {name}: unknown variables {used - KNOWN_ENV}"
    used = env_names(g["services"]["worker"].get("environment"))
    assert used <= KNOWN_ENV, used - KNOWN_ENV


# --------------------------------------------------------------------------------------------- Dockerfiles

def test_dockerignore_keeps_what_the_dockerfiles_copy():
    ignore = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
              if l.strip() and not l.startswith("#")]
    assert ".venv" in ignore and ".git" in ignore
    for df in (DOCKERFILE_WORKER, DOCKERFILE_PRODUCER):
        for instr, args in dockerfile_instructions(df):
            if instr != "COPY" or "--from=" in args:
                continue
            srcs = [a for a in args.split() if not a.startswith("--")][:-1]
            for src in srcs:
                assert (ROOT / src).exists(), f"{df.name}: COPY {src}: no such path"
                top = src.split("/")[0]
                excluded = top in ignore and f"!{src}" not in ignore
                assert not excluded, f"{df.name}: COPY {src} is excluded by .dockerignore"


@pytest.mark.parametrize("dockerfile", [DOCKERFILE_WORKER, DOCKERFILE_PRODUCER], ids=lambda p: p.name)
def test_dockerfile_common(dockerfile):
    st = stages(dockerfile)
    assert len(st) >= 2, "multi-stage build expected"
    final = st[-1]
    user = [a for i, a in final if i == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root"), "the image must run as non-root"
    assert re.fullmatch(r"\d+(:\d+)?", user[-1]), "numeric USER (k8s runAsNonRoot can check it)"
    # layer cache: pyproject.toml is copied and the dependencies installed before the code
    build = [(i, a) for i, a in st[0]]
    copies = [a for i, a in build if i == "COPY"]
    first_pyproject = next(n for n, a in enumerate(copies) if "pyproject.toml" in a)
    first_code = next(n for n, a in enumerate(copies) if a.split()[0] in ("hnq", "producer", "worker"))
    assert first_pyproject < first_code
    # the final stage's K8s pod securityContext uses the same uid
    uid = user[-1].split(":")[0]
    if dockerfile is DOCKERFILE_WORKER:
        pod = find("Deployment", "hardnet-worker")["spec"]["template"]["spec"]
    else:
        pod = find("Job")["spec"]["template"]["spec"]
    assert str(pod["securityContext"]["runAsUser"]) == uid


def pip_installs(dockerfile: Path) -> list[str]:
    return [a for i, a in dockerfile_instructions(dockerfile) if i == "RUN" and "pip install" in a]


def test_worker_dockerfile():
    runs = " ".join(pip_installs(DOCKERFILE_WORKER))
    assert '".[worker]"' in runs or "'.[worker]'" in runs or " .[worker]" in runs
    final = stages(DOCKERFILE_WORKER)[-1]
    cmd = [json_form(a) for i, a in final if i == "CMD"][-1]
    assert cmd == WORKER_CMD
    entry = [json_form(a) for i, a in final if i == "ENTRYPOINT"][-1]
    assert entry[0].endswith("tini"), "an init as PID 1 forwards SIGTERM (warm shutdown)"
    health = [a for i, a in final if i == "HEALTHCHECK"]
    assert health and "inspect ping" in health[-1] and "worker.app" in health[-1]
    copies = [a for i, a in final if i == "COPY"]
    assert any("deploy/gpu-slot.sh" in a and "/usr/local/bin/hardnet-gpu-slot" in a for a in copies)
    env = dockerfile_env(DOCKERFILE_WORKER)
    assert env["TORCH_HOME"] == TORCH_HOME
    assert env.get("HARDNET_DEVICE", "auto") == "auto"


def test_producer_dockerfile_has_no_torch():
    text = DOCKERFILE_PRODUCER.read_text()
    installs = pip_installs(DOCKERFILE_PRODUCER)
    assert installs
    for cmd in installs:
        target = cmd.split("pip install", 1)[1].split("&&")[0]
        # the only extras: the build arg EXTRAS (empty by default), which refuses `worker`
        assert "[" not in target.replace("${EXTRAS:+[$EXTRAS]}", ""), f"extras installed: {cmd}"
        assert "torch" not in cmd.split("&&")[0]
    assert 'ARG EXTRAS=\n' in text and "*,worker,*)" in text
    assert "[worker]" not in text
    final = stages(DOCKERFILE_PRODUCER)[-1]
    entry = [json_form(a) for i, a in final if i == "ENTRYPOINT"][-1]
    assert entry[-1] == "hardnet", "`docker compose run producer submit ...` needs ENTRYPOINT hardnet"


def test_dockerfiles_pass_hadolint(tmp_path):
    """The Dockerfiles as written (no engine here to build them): hadolint, warnings failing,
    with the two ignored rules and their reasons in .hadolint.yaml."""
    exe = tool("hadolint")
    r = subprocess.run([exe, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(DOCKERFILE_WORKER),
                        str(DOCKERFILE_PRODUCER)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && echo hi\nCMD python -m x\n")
    r = subprocess.run([exe, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DL3006" in r.stdout  # the linter bites: untagged base image


def test_dockerfile_env_names_are_known():
    for df in (DOCKERFILE_WORKER, DOCKERFILE_PRODUCER):
        names = set(dockerfile_env(df))
        assert names <= KNOWN_ENV | IMAGE_ENV, f"{df.name}: {names - KNOWN_ENV - IMAGE_ENV}"


# --------------------------------------------------------------------------------------------- redis

def test_redis_conf_persistence_and_no_eviction():
    conf = redis_conf(REDIS_CONF.read_text())
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction"
    # the k8s ConfigMap carries the same file
    cm = find("ConfigMap", "redis-config")
    assert cm["data"]["redis.conf"] == REDIS_CONF.read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_server_accepts_the_config(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    redis = pytest.importorskip("redis")
    port = _free_port()
    proc = subprocess.Popen(["redis-server", str(REDIS_CONF), "--port", str(port), "--bind", "127.0.0.1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(port=port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("redis-server refused deploy/redis.conf:\n"
                                         + proc.stdout.read().decode(errors="replace"))
                time.sleep(0.05)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "everysec"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        client.close()
    finally:
        proc.terminate()  # SIGTERM: redis-server's clean shutdown
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_k8s_redis_statefulset():
    sts = find("StatefulSet", "redis")
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = c["args"]
    assert "--requirepass" in args
    assert "--maxmemory" in args
    cfg_mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert any(a.startswith(cfg_mount["mountPath"] + "/") and a.endswith("redis.conf") for a in args)
    data = next(m for m in c["volumeMounts"] if m["mountPath"] == "/data")
    assert data["name"] in {v["metadata"]["name"] for v in sts["spec"]["volumeClaimTemplates"]}
    svc = find("Service", "redis")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert find("Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"


# --------------------------------------------------------------------------------------------- gpu-slot

@pytest.fixture
def fake_gpus(tmp_path):
    if shutil.which("flock") is None or shutil.which("sh") is None:
        pytest.skip("flock(1) or sh not available")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho GPU-aaa\necho GPU-bbb\n")
    smi.chmod(0o755)
    locks = tmp_path / "locks"
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", HARDNET_GPU_LOCK_DIR=str(locks),
               HARDNET_GPU_WAIT="0.1")
    return env, locks


def run_slot(env, timeout=10):
    return subprocess.run(["sh", str(GPU_SLOT), "sh", "-c", 'echo "GOT=$CUDA_VISIBLE_DEVICES"'],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_gpu_slot_claims_a_free_gpu(fake_gpus):
    env, locks = fake_gpus
    r = run_slot(env)
    assert r.returncode == 0, r.stderr
    assert "GOT=GPU-aaa" in r.stdout
    # GPU-aaa held by another worker -> the next one gets GPU-bbb
    locks.mkdir(exist_ok=True)
    with open(locks / "GPU-aaa.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run_slot(env)
        assert "GOT=GPU-bbb" in r.stdout, r.stdout + r.stderr
        # both held -> it waits instead of sharing a GPU
        with open(locks / "GPU-bbb.lock", "a") as held2:
            fcntl.flock(held2, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(subprocess.TimeoutExpired):
                run_slot(env, timeout=1)


def test_gpu_slot_fails_without_gpus(tmp_path):
    if shutil.which("flock") is None:
        pytest.skip("flock(1) not available")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    (bindir / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", HARDNET_GPU_LOCK_DIR=str(tmp_path / "l"))
    r = run_slot(env)
    assert r.returncode == 1 and "GOT=" not in r.stdout


# --------------------------------------------------------------------------------------------- kubernetes

def test_k8s_manifests_validate_strict(tmp_path):
    exe = tool("kubernetes-validate")
    files, expected = [], []
    for n, (path, doc) in enumerate(k8s_docs()):
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue  # CRDs kubernetes-validate has no schema for: checked by hand below
        f = tmp_path / f"{n:02d}-{path.stem}.yaml"
        f.write_text(yaml.safe_dump(doc))
        files.append(str(f))
        expected.append(f"{doc['kind'].lower()}/{doc['metadata']['name']}")
    r = subprocess.run([exe, "--strict", *files], capture_output=True, text=True, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "ERROR" not in out and "Couldn't find schema" not in out, out
    for res in expected:
        assert f"passed for resource {res}" in out, f"{res} not validated:\n{out}"

    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n"
                   "spec: {replica: 1, selector: {matchLabels: {a: b}}, template: "
                   "{metadata: {labels: {a: b}}, spec: {containers: [{name: c, image: i}]}}}\n")
    r = subprocess.run([exe, "--strict", str(bad)], capture_output=True, text=True, timeout=180)
    assert r.returncode != 0, "kubernetes-validate --strict should reject an unknown field"


def test_k8s_everything_in_one_namespace():
    ns = find("Namespace")
    assert ns["metadata"]["name"] == NAMESPACE
    for path, doc in k8s_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{path.name}: {doc['kind']}"


def test_k8s_kustomization():
    kz = load_yaml(K8S / "kustomization.yaml")
    assert kz["namespace"] == NAMESPACE
    listed = set(kz["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present - K8S_EXAMPLES
    image_names = {i["name"] for i in kz.get("images", [])}
    assert find("Deployment", "hardnet-worker")["spec"]["template"]["spec"]["containers"][0]["image"] \
        in image_names


def test_k8s_kustomize_builds():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (optional: checks that `kubectl apply -k` would build)")
    r = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "ScaledObject", "Secret", "ConfigMap"} <= kinds
    worker = next(d for d in docs if d["kind"] == "Deployment")
    assert "/" in worker["spec"]["template"]["spec"]["containers"][0]["image"]


def secret_keys() -> set[str]:
    s = find("Secret", "hardnet-secrets")
    return set(s.get("stringData", {})) | set(s.get("data", {}))


def container_env(container: dict) -> set[str]:
    names = {e["name"] for e in container.get("env", [])}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            names |= set(find("ConfigMap", src["configMapRef"]["name"])["data"])
        if "secretRef" in src:
            names |= secret_keys()
    return names


def test_k8s_env_names_are_known_and_refs_resolve():
    cm = find("ConfigMap", "hardnet-config")
    assert set(cm["data"]) <= KNOWN_ENV, set(cm["data"]) - KNOWN_ENV
    assert secret_keys() <= KNOWN_ENV | INFRA_ENV
    for kind, name in (("Deployment", "hardnet-worker"), ("Job", None), ("Deployment", "hardnet-exporter")):
        pod = find(kind, name)["spec"]["template"]["spec"]
        for c in pod["containers"]:
            used = container_env(c)
            assert used <= KNOWN_ENV, f"{kind} {c['name']}: {used - KNOWN_ENV}"
            assert "HARDNET_BROKER_URL" in used
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "hardnet-secrets" and ref["key"] in secret_keys()
                    assert ref["key"] == e["name"]
    assert cm["data"]["HARDNET_DEVICE"] == "cuda"
    assert cm["data"]["TORCH_HOME"] == TORCH_HOME


def test_k8s_worker_deployment():
    dep = find("Deployment", "hardnet-worker")
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    (c,) = pod["containers"]
    assert c["args"] == WORKER_CMD and "command" not in c, "keep the image's tini entrypoint"
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1", "one pod per GPU"
    assert str(c["resources"]["requests"]["nvidia.com/gpu"]) == "1"
    vt = int(find("ConfigMap", "hardnet-config")["data"]["HARDNET_VISIBILITY_TIMEOUT"])
    grace = pod["terminationGracePeriodSeconds"]
    shutdown_grace = float(find("ConfigMap", "hardnet-config")["data"]["HARDNET_SHUTDOWN_GRACE"])
    assert "preStop" not in c.get("lifecycle", {}), "a preStop hook delays SIGTERM inside the same period"
    assert shutdown_grace + EXIT_MARGIN_S <= grace < vt, \
        "the pod's kill must leave HARDNET_SHUTDOWN_GRACE + the exit margin (docs/reliability.md, Preemption)"
    probe = " ".join(c["livenessProbe"]["exec"]["command"])
    assert "inspect ping" in probe
    lp = c["livenessProbe"]
    assert lp["periodSeconds"] * lp["failureThreshold"] >= vt, \
        "a solo-pool worker is silent during a chunk; the probe must tolerate a whole chunk"
    hub = next(m for m in c["volumeMounts"] if m["mountPath"] == TORCH_HOME)
    assert hub["name"] in {v["name"] for v in pod["volumes"]}
    assert pod["securityContext"]["runAsNonRoot"] is True

    pdb = find("PodDisruptionBudget", "hardnet-worker")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()

    # the metrics endpoint: HARDNET_METRICS_PORT is the container's `metrics` port
    (port,) = [p for p in c["ports"] if p["name"] == "metrics"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert int(env["HARDNET_METRICS_PORT"]) == port["containerPort"]


def _labels_select(selector: dict, labels: dict) -> bool:
    return bool(selector["matchLabels"]) and selector["matchLabels"].items() <= labels.items()


def test_k8s_exporter_deployment_and_service():
    dep = find("Deployment", "hardnet-exporter")
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["image"] == "hardnet-producer", "torch-free: the producer image"
    assert c["args"][0] == "exporter" and "command" not in c, "the image's ENTRYPOINT is `hardnet`"
    port = int(c["args"][c["args"].index("--port") + 1])
    (cport,) = [p for p in c["ports"] if p["name"] == "metrics"]
    assert cport["containerPort"] == port
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert dep["spec"]["replicas"] == 1
    svc = find("Service", "hardnet-exporter")
    assert _labels_select({"matchLabels": svc["spec"]["selector"]}, pod["metadata"]["labels"])
    (sport,) = svc["spec"]["ports"]
    assert sport["name"] == "metrics" and sport["targetPort"] in ("metrics", port)
    kz = load_yaml(K8S / "kustomization.yaml")
    assert "hardnet-producer" in {i["name"] for i in kz["images"]}


MONITOR_SPEC_KEYS = {"PodMonitor": {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel",
                                    "podTargetLabels", "sampleLimit"},
                     "ServiceMonitor": {"selector", "endpoints", "namespaceSelector", "jobLabel",
                                        "targetLabels", "podTargetLabels", "sampleLimit"}}
ENDPOINT_KEYS = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings",
                 "metricRelabelings"}


def test_k8s_monitors_scrape_the_metrics_ports():
    """The Prometheus Operator objects (no schema in kubernetes-validate): each selects the pods or
    Service it is meant for, by a port name that exists there."""
    pm = find("PodMonitor", "hardnet-worker")
    sm = find("ServiceMonitor", "hardnet-exporter")
    for mon in (pm, sm):
        assert mon["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(mon["spec"]) <= MONITOR_SPEC_KEYS[mon["kind"]], set(mon["spec"])
    worker = find("Deployment", "hardnet-worker")["spec"]["template"]
    assert _labels_select(pm["spec"]["selector"], worker["metadata"]["labels"])
    worker_ports = {p["name"] for c in worker["spec"]["containers"] for p in c.get("ports", [])}
    for ep in pm["spec"]["podMetricsEndpoints"]:
        assert set(ep) <= ENDPOINT_KEYS and ep["port"] in worker_ports and ep["path"] == "/metrics"
    svc = find("Service", "hardnet-exporter")
    assert _labels_select(sm["spec"]["selector"], svc["metadata"]["labels"])
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= ENDPOINT_KEYS and ep["port"] in {p["name"] for p in svc["spec"]["ports"]}


SCALEDOBJECT_SPEC_KEYS = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "idleReplicaCount",
                          "initialCooldownPeriod", "minReplicaCount", "maxReplicaCount", "fallback",
                          "advanced", "triggers"}
REDIS_TRIGGER_KEYS = {"address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
                      "usernameFromEnv", "passwordFromEnv", "listName", "listLength",
                      "activationListLength", "enableTLS", "unsafeSsl", "databaseIndex"}


def test_keda_scaledobject():
    so = find("ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    assert set(spec) <= SCALEDOBJECT_SPEC_KEYS, set(spec) - SCALEDOBJECT_SPEC_KEYS
    target = spec["scaleTargetRef"]
    dep = find("Deployment", "hardnet-worker")
    assert target["name"] == dep["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target.get("apiVersion", "apps/v1") == "apps/v1"
    assert 0 <= spec["minReplicaCount"] <= 1 < spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] > 0

    by_type = {t["type"]: t for t in spec["triggers"]}
    assert set(by_type) == {"redis", "prometheus"} and len(spec["triggers"]) == 2
    trig = by_type["redis"]
    md = trig["metadata"]
    assert set(md) <= REDIS_TRIGGER_KEYS, set(md) - REDIS_TRIGGER_KEYS
    assert md["listName"] == QUEUE
    assert isinstance(md["listLength"], str) and int(md["listLength"]) >= 1
    assert md.get("databaseIndex", "0") == "0"
    host, port = md["address"].rsplit(":", 1)
    svc = find("Service", "redis")
    assert host in (svc["metadata"]["name"], f"redis.{NAMESPACE}.svc", f"redis.{NAMESPACE}.svc.cluster.local")
    assert int(port) == svc["spec"]["ports"][0]["port"]

    auth = find("TriggerAuthentication", trig["authenticationRef"]["name"])
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "password"
    assert ref["name"] == "hardnet-secrets" and ref["key"] in secret_keys()
    # the same secret key is what the Redis server requires
    redis_env = find("StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert any(e["name"] == "REDIS_PASSWORD" and e["valueFrom"]["secretKeyRef"]["key"] == ref["key"]
               for e in redis_env)


PROMETHEUS_TRIGGER_KEYS = {"serverAddress", "query", "threshold", "activationThreshold", "namespace",
                           "customHeaders", "ignoreNullValues", "queryParameters", "unsafeSsl", "authModes"}


def test_keda_prometheus_trigger_counts_queued_and_in_flight_chunks():
    from metric_names import exported_series, promql_metric_names

    from worker.settings import WorkerSettings

    (trig,) = [t for t in find("ScaledObject")["spec"]["triggers"] if t["type"] == "prometheus"]
    md = trig["metadata"]
    assert set(md) <= PROMETHEUS_TRIGGER_KEYS, set(md) - PROMETHEUS_TRIGGER_KEYS
    assert re.fullmatch(r"https?://[^/\s]+(:\d+)?/?", md["serverAddress"]), md["serverAddress"]
    names = promql_metric_names(md["query"])
    # the backlog: the list plus every job's ready list (fair share, hnq.jobs.dispatch)
    assert names == {"hardnet_queue_backlog_chunks", "hardnet_queue_unacked_messages"}, names
    assert names <= exported_series(), "the query must use what `hardnet exporter` exports"
    assert f'queue="{QUEUE}"' in md["query"] and f'namespace="{NAMESPACE}"' in md["query"]
    # one worker keeps HARDNET_CHUNKS_IN_FLIGHT chunks busy: that is the target per replica
    cm = find("ConfigMap", "hardnet-config")["data"]
    in_flight = int(cm.get("HARDNET_CHUNKS_IN_FLIGHT", WorkerSettings.model_fields["chunks_in_flight"].default))
    assert isinstance(md["threshold"], str) and int(md["threshold"]) == in_flight
    assert md["ignoreNullValues"] == "false", "a blind exporter must not read as an empty queue"
    # the list alone stays as the Prometheus-free trigger, with the same target per worker
    (redis_trig,) = [t for t in find("ScaledObject")["spec"]["triggers"] if t["type"] == "redis"]
    assert int(redis_trig["metadata"]["listLength"]) == in_flight


def test_k8s_producer_job_example():
    job = find("Job")
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"][0] == "submit" and "--out" in c["args"]
    assert pod["restartPolicy"] == "Never"
    assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})


# --------------------------------------------------------------------------------------------- settings

def test_hardnet_env_names_are_real_settings():
    """Each HARDNET_* name used by the deployment is a field of the worker's settings."""
    try:
        from worker.settings import WorkerSettings
    except Exception as e:  # pragma: no cover - depends on the package being importable
        pytest.skip(f"worker.settings not importable: {e}")
    fields = set(WorkerSettings.model_fields)
    for name in sorted(n for n in KNOWN_ENV if n.startswith("HARDNET_")):
        assert name.removeprefix("HARDNET_").lower() in fields, name


# --------------------------------------------------------------------------------------------- docs

def test_docs_cover_the_essentials():
    readme = (DEPLOY / "README.md").read_text()
    for s in ("--scale worker=", "deploy/compose.gpu.yml", "kubectl apply -k deploy/k8s", "KEDA",
              "docker compose run --rm producer submit"):
        assert s in readme, s
    scaling = (ROOT / "docs" / "scaling.md").read_text()
    for s in ("3,500", "5,500", "HARDNET_VISIBILITY_TIMEOUT", "prefetch", "appendonly", "one process per GPU"):
        assert s.lower() in scaling.lower(), s
