"""The deployment files, checked without a Docker engine.

- Dockerfile: parsed by Docker's own parser (the `dockerfile` package); stages, user, entry
  point, health check, build context and the install step.
- compose/*.yml: validated against the Compose Specification schema (vendored in
  check-jsonschema), then checked against the project: mounted files exist (against a site folder
  made by the real `imu-fleet pki`), published ports are the ones the configurations listen on,
  `IMU_NODE_*` variables are node settings, secrets are files, profiles mean something.
- compose/imu-node.service: `systemd-analyze verify` and `security`, and the hardening it must
  keep.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

import dockerfile
import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from common.http import is_loopback, parse_listen
from common.signing import generate_keys
from fleet.pki.site import add_client, init_site
from helpers.processes import stop_process
from helpers.programs import require_program
from node.config import ENV_PREFIX, NodeConfig
from node.tools.local_broker import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose"
COMPOSE_FILES = sorted(COMPOSE.glob("*.yml"))
UNIT = COMPOSE / "imu-node.service"
UNITS = sorted(COMPOSE.glob("*.service"))
"""Every shipped unit: the node's and the rollout controller's."""
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NODE_ID = "pi-0042"
DASHBOARD = "ops"
KNOWN_PROFILES = {"monitoring": "Prometheus and Grafana, on top of the broker and the dashboard"}


# --- Dockerfile ---------------------------------------------------------------------------------


@dataclass
class Stage:
    """One build stage: its base image (ARGs resolved), name and instructions."""

    image: str
    name: str | None
    commands: list[dockerfile.Command]
    args: dict[str, str]

    def all(self, cmd: str) -> list[dockerfile.Command]:
        return [c for c in self.commands if c.cmd == cmd]

    def last(self, cmd: str) -> dockerfile.Command:
        found = self.all(cmd)
        assert found, f"stage {self.name or self.image} has no {cmd}"
        return found[-1]


def substitute(text: str, args: dict[str, str]) -> str:
    """`$VAR` and `${VAR}` replaced by build-arg defaults (unknown ones left as they are)."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return args.get(name, match.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def stages() -> list[Stage]:
    """The Dockerfile's stages, parsed by Docker's parser, with ARG defaults substituted."""
    commands = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for command in commands:
        if command.cmd == "FROM":
            image = substitute(command.value[0], global_args)
            name = command.value[2] if len(command.value) == 3 else None
            result.append(Stage(image, name, [], {}))
        elif command.cmd == "ARG":
            target = result[-1].args if result else global_args
            key, _, default = command.value[0].partition("=")
            # a stage's bare ARG re-declares a global one with its default
            target[key] = default if default else global_args.get(key, "")
        elif result:
            result[-1].commands.append(command)
    return result


def flag(command: dockerfile.Command, name: str) -> str | None:
    for item in command.flags:
        key, _, value = item.partition("=")
        if key == f"--{name}":
            return value
    return None


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (exclude?, regex) in file order, with Docker's `*`, `?`, `**` meaning."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        body = str(PurePosixPath(line.lstrip("!").strip("/")))
        regex = ""
        i = 0
        while i < len(body):
            if body.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif body.startswith("**", i):
                regex += ".*"
                i += 2
            elif body[i] == "*":
                regex += "[^/]*"
                i += 1
            elif body[i] == "?":
                regex += "[^/]"
                i += 1
            elif body[i] == "[":
                end = body.index("]", i)
                regex += body[i : end + 1]
                i = end + 1
            else:
                regex += re.escape(body[i])
                i += 1
        patterns.append((not negated, re.compile(regex + r"\Z")))
    return patterns


def ignored(path: str) -> bool:
    """Whether Docker leaves `path` (relative to the repo) out of the build context: the last
    pattern that matches the path or one of its parents decides (moby's patternmatcher)."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for exclude, regex in dockerignore_patterns():
        if any(regex.match(candidate) for candidate in candidates):
            excluded = exclude
    return excluded


def test_dockerfile_has_a_builder_and_a_runtime_that_copies_only_the_venv() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2, "the Dockerfile needs a build stage and a runtime stage"
    runtime = all_stages[-1]
    builders = {stage.name for stage in all_stages[:-1]}
    copies = runtime.all("COPY") + runtime.all("ADD")
    assert copies, "the runtime stage copies nothing: where does the venv come from?"
    for command in copies:
        source = flag(command, "from")
        assert source in builders, (
            f"runtime stage copies from the build context: {command.original}"
        )
    assert not any("pip install" in " ".join(c.value) for c in runtime.all("RUN")), (
        "the runtime stage installs packages; install them in the builder and copy the venv"
    )


def test_final_stage_runs_as_a_fixed_non_root_user() -> None:
    runtime = stages()[-1]
    user = substitute(runtime.last("USER").value[0], runtime.args)
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), f"USER {user}: use a fixed numeric uid (files on volumes keep an owner)"
    assert int(uid) >= 1000, f"USER {user} is root or a system account"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"USER {user}: group must not be root"
    later = [c for c in runtime.commands if c.start_line > runtime.last("USER").start_line]
    assert not any(c.cmd == "RUN" for c in later), "RUN after USER would run as the service user"


def test_entrypoint_runs_imu_node_with_a_config() -> None:
    runtime = stages()[-1]
    entrypoint = runtime.last("ENTRYPOINT")
    assert entrypoint.json, "ENTRYPOINT must be exec form (JSON), so SIGTERM reaches the node"
    assert list(entrypoint.value) == ["imu-node"]
    assert "imu-node" in PYPROJECT["project"]["scripts"]
    cmd = list(runtime.last("CMD").value)
    assert cmd[0] == "run", cmd
    assert "--config" in cmd, cmd


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/livez" else 404
        self.send_response(code)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[ThreadingHTTPServer, type[_Health]]]:
    handler = type("Handler", (_Health,), {"status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="health-server", daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def test_image_healthcheck_asks_livez_and_fails_when_it_does_not_answer(
    health_server: tuple[ThreadingHTTPServer, type[_Health]],
) -> None:
    runtime = stages()[-1]
    check = runtime.last("HEALTHCHECK")
    assert check.json, "HEALTHCHECK CMD [...] in exec form"
    assert check.value[0] == "CMD", check.original
    argv = list(check.value[1:])
    assert argv[:2] == ["python", "-c"], f"slim images have no curl; use python -c: {argv}"
    assert "/livez" in argv[2], "liveness, not /healthz: that is 503 while a model is awaited"
    server, handler = health_server
    env = {**os.environ, "IMU_NODE_HTTP_LISTEN": f"0.0.0.0:{server.server_address[1]}"}
    probe = [sys.executable, "-c", argv[2]]
    ok = subprocess.run(probe, env=env, timeout=20, check=False)
    assert ok.returncode == 0, "a 200 from /livez must pass"
    handler.status = 503
    failing = subprocess.run(probe, env=env, timeout=20, stderr=-1, check=False)
    assert failing.returncode != 0, "a 503 from /livez must fail the health check"
    env["IMU_NODE_HTTP_LISTEN"] = f"127.0.0.1:{free_port()}"
    down = subprocess.run(probe, env=env, timeout=20, stderr=-1, check=False)
    assert down.returncode != 0, "a node that does not answer must fail the health check"


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    for stage in stages():
        for command in stage.all("COPY") + stage.all("ADD"):
            if flag(command, "from"):
                continue
            for source in command.value[:-1]:
                path = ROOT / source
                assert path.exists(), f"{command.original}: {source} is not in the repository"
                # a folder reaches the builder when a file in it does (`*` then `!hailo/x`)
                files = [f.relative_to(ROOT) for f in path.rglob("*") if f.is_file()]
                assert not ignored(source.rstrip("/")) or any(not ignored(str(f)) for f in files), (
                    f"{source} is left out by .dockerignore"
                )
        for command in stage.all("RUN"):
            for item in command.flags:
                if not item.startswith("--mount=") or "type=bind" not in item or "from=" in item:
                    continue
                options = dict(o.partition("=")[::2] for o in item[len("--mount=") :].split(","))
                source = options.get("source", ".")
                assert (ROOT / source).exists(), f"{item}: {source} is not in the repository"


BUILDER_NEUTRAL_FLAGS = {"COPY": {"--from", "--chown"}, "ADD": {"--chown"}, "RUN": set()}
"""Instruction flags every builder takes: Docker's legacy builder refuses `RUN --mount`,
`COPY --chmod` and `--link` (BuildKit only)."""


def test_dockerfile_builds_with_every_builder() -> None:
    """No `# syntax=` line (BuildKit would fetch its frontend from Docker Hub) and no BuildKit-only
    flag: `docker build` with or without BuildKit, `podman build` and `buildah` all take it
    (scripts/test-image builds it with podman)."""
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE | re.IGNORECASE), (
        "a syntax directive makes BuildKit pull a frontend image from Docker Hub"
    )
    for stage in stages():
        for command in stage.commands:
            allowed = BUILDER_NEUTRAL_FLAGS.get(command.cmd)
            if allowed is None:
                continue
            for item in command.flags:
                name = item.partition("=")[0]
                assert name in allowed, f"{command.original}: {name} needs BuildKit"


def test_dockerignore_keeps_secrets_and_clutter_out_but_the_project_in() -> None:
    for path in ["site/ca/ca.key", "site/clients/node-pi-0042.key", "keys/fleet.key", ".venv/x",
                 "node/__pycache__/app.cpython-311.pyc", "tests/test_http.py", ".git/HEAD",
                 "fleet/x.egg-info/PKG-INFO", "hailo/notes.txt"]:  # fmt: skip
        assert ignored(path), f"{path} would be sent to the builder"
    for path in ["pyproject.toml", "README.md", "node/app.py", "common/bundle.py",
                 "hailo/hailort-4.20.0-cp311-cp311-linux_aarch64.whl"]:  # fmt: skip
        assert not ignored(path), f"{path} is needed in the build context"


def test_builder_copies_every_package_pyproject_installs() -> None:
    builder = stages()[0]
    copied = {
        source.rstrip("/")
        for command in builder.all("COPY")
        if not flag(command, "from")
        for source in command.value[:-1]
    }
    patterns = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").is_file() and any(re.fullmatch(pat.replace("*", ".*"), p.name)
                                                  for pat in patterns)
    }  # fmt: skip
    assert packages, patterns
    assert packages <= copied, f"not copied into the builder: {sorted(packages - copied)}"
    readme = PYPROJECT["project"].get("readme")
    assert {"pyproject.toml", *([readme] if readme else [])} <= copied


def test_install_step_installs_the_project_with_pyproject_dependencies_only() -> None:
    builder = stages()[0]
    workdir = builder.last("WORKDIR").value[0]
    installs = [
        " ".join(c.value)
        for c in builder.all("RUN")
        if re.search(r"pip\s+install", " ".join(c.value))
    ]
    assert len(installs) == 1, f"one pip install of the project, not {len(installs)}"
    words = shlex.split(installs[0].split("pip install", 1)[1].split(";")[0])
    assert words, "pip install of what?"
    targets = [w for w in words if not w.startswith("-")]
    options = [w for w in words if w.startswith("-")]
    assert workdir in targets or "." in targets, f"the project ({workdir}) is not installed"
    assert not {"-r", "--requirement", "-c", "--constraint", "--no-deps", "-e"} & set(options), (
        f"{options}: dependencies must come from pyproject.toml, resolved by pip"
    )
    for target in targets:
        assert target in {workdir, "."} or target.startswith("$"), (
            f"pip install {target}: a package named in the Dockerfile drifts from pyproject.toml"
        )
        assert "[" not in target, f"{target}: no extras (dev/test) in the image"
    assert not list(ROOT.glob("requirements*.txt")), "a requirements file would be a second list"


def test_base_images_pin_a_python_that_pyproject_accepts() -> None:
    spec = SpecifierSet(PYPROJECT["project"]["requires-python"])
    names = {stage.name for stage in stages()}
    bases = [stage.image for stage in stages() if stage.image not in names]
    assert bases
    for image in bases:
        match = re.fullmatch(
            r"python:(\d+\.\d+)(?:\.\d+)?-slim-(\w+)(?:@sha256:[0-9a-f]{64})?", image
        )
        assert match, f"{image}: pin a python:X.Y-slim-DEBIAN image"
        assert Version(match.group(1)) in spec, f"{image} does not satisfy {spec}"
        assert match.group(2) == "bookworm", f"{image}: Debian bookworm, like Raspberry Pi OS"
    assert len(set(bases)) == 1, f"builder and runtime must share one base (the venv): {bases}"


# --- Compose ------------------------------------------------------------------------------------


_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: `${V}`, `${V:-d}`, `${V-d}`, `${V:?e}`, `${V?e}`, `$$`."""

    def value(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3) or ""
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in {":?", "?"} and unset:
            pytest.fail(f"${{{name}}} is required: {arg}")
        if op in {":-", "-"} and unset:
            return arg
        return current or ""

    return _VAR.sub(value, text)


def variables(text: str) -> set[str]:
    return {m.group(1) or m.group(4) for m in _VAR.finditer(text) if m.group(0) != "$$"}


@dataclass
class Service:
    """A service after `extends`, with the folder its relative paths are relative to."""

    name: str
    spec: dict[str, Any]
    base: Path
    project: dict[str, Any]


def load(path: Path, env: dict[str, str]) -> dict[str, Any]:
    return yaml.safe_load(interpolate(path.read_text(), env)) or {}


def services(path: Path, env: dict[str, str]) -> list[Service]:
    """The services `path` runs: its own (with `extends` merged) and those of `include`d files."""
    project = load(path, env)
    result: list[Service] = []
    for included in project.get("include", []):
        file = included if isinstance(included, str) else included["path"]
        result += services(path.parent / file, env)
    for name, written in (project.get("services") or {}).items():
        spec, base = written, path.parent
        if "extends" in written:
            parent_file = path.parent / written["extends"]["file"]
            parent = load(parent_file, env)["services"][written["extends"]["service"]]
            spec = copy.deepcopy(parent)
            spec.update({k: v for k, v in written.items() if k != "extends"})
            base = parent_file.parent
        result.append(Service(name, spec, base, project))
    return result


@pytest.fixture(scope="module")
def site_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The folders the compose files' headers ask for, made the documented way: a site by the
    real `imu-fleet pki`, the node's and the fleet host's folders from its files."""
    root = tmp_path_factory.mktemp("deploy")
    site = root / "site"
    init_site(site, site="test", hosts=["localhost", "mosquitto"])
    add_client(site, "node", NODE_ID, use_tool=False)
    add_client(site, "dashboard", DASHBOARD, use_tool=False)
    node_dir = root / "etc-imu-node"
    (node_dir / "models").mkdir(parents=True)
    for name in ["ca.crt", f"node-{NODE_ID}.crt", f"node-{NODE_ID}.key"]:
        shutil.copy(site / "clients" / name, node_dir / name)
    (node_dir / "http-token").write_text("token\n")
    (node_dir / "metrics-token").write_text("scrape\n")
    keys = generate_keys(root / "keys")
    (node_dir / "fleet-keys").mkdir()
    shutil.copy(keys.public, node_dir / "fleet-keys" / "fleet.pub")
    (node_dir / "models" / "tcn-vae-1.0.0.tar").write_bytes(b"")
    secrets = root / "etc-imu-fleet"
    secrets.mkdir()
    shutil.copy(
        site / "clients" / f"dashboard-{DASHBOARD}.password", secrets / "dashboard-password"
    )
    for name in ["dashboard-token", "dashboard-metrics-token", "imu-node-token",
                 "grafana-admin-password"]:  # fmt: skip
        (secrets / name).write_text("x\n")
    return {
        "IMU_SITE_DIR": str(site),
        "IMU_SITE_SECRETS_DIR": str(secrets),
        "IMU_EDGE_NODE_DIR": str(node_dir),
        "IMU_EDGE_NODE_ID": NODE_ID,
        "IMU_EDGE_MODEL": "tcn-vae-1.0.0.tar",
    }


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text())
    return schema


def test_compose_files_use_only_what_docker_compose_and_podman_compose_both_run() -> None:
    """podman-compose (1.6) has no `configs:` (public files are read-only bind mounts instead),
    and resolves an `extends` file from the working folder as well as from the file: a broker
    service shared through `extends` stays next to the files that use it, in compose/. The
    differences that remain are in docs/operations.md ("Containers")."""
    for path in COMPOSE_FILES:
        project = yaml.safe_load(path.read_text()) or {}
        assert "configs" not in project, f"{path.name}: podman-compose does not support configs"
        for name, service in (project.get("services") or {}).items():
            assert "configs" not in service, f"{path.name} {name}: use a read-only bind mount"
            extends = service.get("extends") or {}
            if "file" in extends:
                assert "/" not in extends["file"], f"{path.name} {name}: keep {extends} in compose/"
                assert (COMPOSE / extends["file"]).is_file()


def test_there_are_compose_files() -> None:
    names = {path.name for path in COMPOSE_FILES}
    assert {"edge.yml", "fleet.yml", "docker-compose.yml"} <= names, names


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_the_compose_specification(
    path: Path, compose_schema: dict[str, Any], site_env: dict[str, str]
) -> None:
    validator_class = jsonschema.validators.validator_for(compose_schema)
    validator_class.check_schema(compose_schema)
    validator = validator_class(compose_schema)
    # as written (what `docker compose config` reads) and after interpolation
    for document in (yaml.safe_load(path.read_text()), load(path, site_env)):
        errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(
            f"{path.name}: {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
        )
    assert services(path, site_env), f"{path.name} runs nothing"


def _bind_sources(service: Service) -> list[tuple[Path, str]]:
    found = []
    for volume in service.spec.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            if source.startswith((".", "/", "~")):
                found.append((service.base / source, rest.split(":")[0]))
        elif volume.get("type") == "bind":
            found.append((service.base / volume["source"], volume["target"]))
    return found


def _named_volumes(service: Service) -> list[str]:
    names = []
    for volume in service.spec.get("volumes", []):
        if isinstance(volume, str):
            source = volume.partition(":")[0]
            if source and not source.startswith((".", "/", "~")) and ":" in volume:
                names.append(source)
        elif volume.get("type") == "volume" and volume.get("source"):
            names.append(volume["source"])
    return names


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_mounted_file_exists_and_every_reference_is_declared(
    path: Path, site_env: dict[str, str]
) -> None:
    for service in services(path, site_env):
        where = f"{path.name}: {service.name}"
        for source, target in _bind_sources(service):
            assert source.exists(), f"{where}: bind mount {source} -> {target} does not exist"
        for volume in service.spec.get("volumes", []):
            if isinstance(volume, dict) and volume.get("type") == "bind":
                assert volume.get("bind", {}).get("create_host_path") is False, (
                    f"{where}: {volume['source']}: set bind.create_host_path: false, or a missing "
                    "file becomes an empty folder instead of an error"
                )
        for name in _named_volumes(service):
            assert name in (service.project.get("volumes") or {}), (
                f"{where}: volume {name} is not declared under volumes:"
            )
        for kind in ("secrets", "configs"):
            declared = service.project.get(kind) or {}
            for ref in service.spec.get(kind, []):
                name = ref if isinstance(ref, str) else ref["source"]
                assert name in declared, f"{where}: {kind[:-1]} {name} is not declared"
                file = declared[name].get("file")
                assert file, f"{where}: {kind[:-1]} {name} must come from a file"
                assert (service.base / file).is_file(), f"{where}: {kind[:-1]} {name}: {file}"


def _published(service: Service) -> set[int]:
    ports = set()
    for port in service.spec.get("ports", []):
        if isinstance(port, dict):
            ports.add(int(port["target"]))
        else:
            ports.add(int(str(port).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def _mosquitto_listeners(conf: str) -> dict[int, str | None]:
    listeners: dict[int, str | None] = {}
    for line in conf.splitlines():
        words = line.split("#")[0].split()
        if words[:1] == ["listener"]:
            listeners[int(words[1])] = words[2] if len(words) > 2 else None
    return listeners


def _healthcheck_text(service: Service) -> str:
    test = service.spec.get("healthcheck", {}).get("test")
    assert test, f"{service.name} has no health check"
    return test if isinstance(test, str) else " ".join(test)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_published_ports_are_the_ones_the_configurations_listen_on(
    path: Path, site_env: dict[str, str]
) -> None:
    seen = set()
    for service in services(path, site_env):
        ports = _published(service)
        image = service.spec.get("image", "")
        if image.startswith("eclipse-mosquitto"):
            command = service.spec["command"]
            conf_target = command[command.index("-c") + 1]
            sources = {target: source for source, target in _bind_sources(service)}
            conf_file = sources[conf_target]
            assert conf_file.resolve() == (COMPOSE / "mosquitto-secure.conf").resolve(), (
                f"{service.name} must run compose/mosquitto-secure.conf, not {conf_file}"
            )
            listeners = _mosquitto_listeners(conf_file.read_text())
            public = {port for port, host in listeners.items() if host is None or not
                      is_loopback(host)}  # fmt: skip
            assert ports == public, (
                f"{service.name} publishes {ports}, the conf listens on {public}"
            )
            seen.add("mosquitto")
        env = service.spec.get("environment") or {}
        if "IMU_NODE_HTTP_LISTEN" in env:
            host, port = parse_listen(str(env["IMU_NODE_HTTP_LISTEN"]))
            assert ports == {port}, f"{service.name}: http_listen port {port}, publishes {ports}"
            assert not is_loopback(host), f"{service.name}: http_listen {host} is unreachable"
            assert f":{port}/livez" in _healthcheck_text(service)
            seen.add("node")
        command = service.spec.get("command") or []
        if service.spec.get("entrypoint") == ["imu-fleet"] and command[:1] == ["dashboard"]:
            host, port = parse_listen(command[command.index("--listen") + 1])
            assert ports == {port}, f"{service.name}: --listen port {port}, publishes {ports}"
            assert "--token-file" in command, "a dashboard beyond loopback needs --token-file"
            assert f":{port}/healthz" in _healthcheck_text(service)
            seen.add("dashboard")
    assert seen, f"{path.name}: no service whose ports could be checked"


def _node_environments(path: Path, env: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    found = []
    for service in services(path, env):
        environment = service.spec.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        found.append((service.name, {k: str(v) for k, v in environment.items()}))
    return found


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_environment_names_real_settings_and_holds_no_secret(
    path: Path, site_env: dict[str, str]
) -> None:
    for name in variables(path.read_text()):
        assert not name.startswith((ENV_PREFIX, "IMU_FLEET_")), (
            f"{path.name}: interpolation variable {name} looks like a setting of the tools; "
            "operators' shells set those for the CLI"
        )
    for service, environment in _node_environments(path, site_env):
        settings = {}
        for key, value in environment.items():
            assert not re.search(r"PASSWORD|TOKEN|SECRET", key) or key.endswith("FILE"), (
                f"{path.name}: {service}: {key} holds a secret in the environment; use a file"
            )
            if "KEY" in key:  # a key (or a folder of keys) is named by path, never inlined
                assert value.startswith("/"), f"{path.name}: {service}: {key}={value[:8]}..."
            if key.startswith(ENV_PREFIX):
                field = key[len(ENV_PREFIX) :].lower()
                assert field in NodeConfig.model_fields, (
                    f"{path.name}: {service}: {key} is not a node setting (docs/configuration.md)"
                )
                settings[field] = value
        if settings:
            # the environment alone must make a valid node configuration
            NodeConfig(**settings)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_profiles_are_known_and_leave_a_default_stack(path: Path, site_env: dict[str, str]) -> None:
    all_services = services(path, site_env)
    by_name = {service.name: service for service in all_services}
    default = {s.name for s in all_services if not s.spec.get("profiles")}
    assert default, f"{path.name}: `docker compose up` without a profile would start nothing"
    for service in all_services:
        profiles = set(service.spec.get("profiles", []))
        assert profiles <= set(KNOWN_PROFILES), f"{service.name}: unknown profiles {profiles}"
        for dependency in service.spec.get("depends_on", {}):
            assert dependency in by_name, f"{service.name} depends on unknown {dependency}"
            theirs = set(by_name[dependency].spec.get("profiles", []))
            assert not theirs or theirs & profiles, (
                f"{service.name} depends on {dependency}, which only runs with {theirs}"
            )
        assert service.spec.get("healthcheck"), f"{path.name}: {service.name} has no health check"
        assert service.spec.get("restart") in {"always", "unless-stopped"}, service.name
        assert service.spec.get("read_only") is True, f"{service.name}: read_only root"
        assert service.spec.get("cap_drop") == ["ALL"], f"{service.name}: cap_drop ALL"
        assert not service.spec.get("privileged"), f"{service.name} must not be privileged"
    used = {p for s in all_services for p in s.spec.get("profiles", [])}
    for profile in used:
        members = {s.name for s in all_services if profile in s.spec.get("profiles", [])}
        assert members, profile
        assert members != {s.name for s in all_services}, f"{profile} holds every service"


def test_edge_node_gets_the_hailo_device_state_volume_and_limits(site_env: dict[str, str]) -> None:
    node = next(s for s in services(COMPOSE / "edge.yml", site_env) if s.name == "node")
    assert node.spec["build"]["dockerfile"] == "Dockerfile"
    assert (node.base / node.spec["build"]["context"] / "Dockerfile").is_file()
    assert any(d.split(":")[0] == "/dev/hailo0" for d in node.spec["devices"])
    assert any(t.startswith("/tmp") for t in node.spec["tmpfs"])
    state = [v for v in node.spec["volumes"] if isinstance(v, dict) and v["type"] == "volume"]
    runtime = stages()[-1]
    image_env = dict(
        item for c in runtime.all("ENV") for item in zip(c.value[::2], c.value[1::2], strict=True)
    )
    assert [v["target"] for v in state] == [image_env["XDG_STATE_HOME"]]
    assert image_env["XDG_CACHE_HOME"].startswith(image_env["XDG_STATE_HOME"] + "/")
    assert _memory(node.spec["mem_limit"]) == _memory(_unit_values()["MemoryMax"][-1])


def test_monitoring_mounts_what_prometheus_and_grafana_configurations_name(
    site_env: dict[str, str],
) -> None:
    by_name = {s.name: s for s in services(COMPOSE / "fleet.yml", site_env)}
    prometheus, grafana = by_name["prometheus"], by_name["grafana"]
    mounted = {target: source for source, target in _bind_sources(prometheus)}
    config = yaml.safe_load(mounted["/etc/prometheus/prometheus.yml"].read_text())
    assert "alerts.yml" in " ".join(config["rule_files"])
    for rule_file in config["rule_files"]:
        assert str(PurePosixPath("/etc/prometheus") / rule_file) in mounted, rule_file
    secret_targets = {s["target"] for s in prometheus.spec["secrets"] if isinstance(s, dict)}
    home = PurePosixPath("/etc/prometheus")  # relative paths resolve against the config's folder
    for job in config["scrape_configs"]:
        credentials = job.get("authorization", {}).get("credentials_file")
        if credentials:
            credentials = str(home / credentials)
            assert credentials in secret_targets, f"{job['job_name']}: {credentials} not mounted"
        for sd in job.get("file_sd_configs", []):
            for file in (str(home / name) for name in sd["files"]):
                assert file in mounted, f"{job['job_name']}: {file} not mounted"
                for group in yaml.safe_load(mounted[file].read_text()) or []:
                    for target in group["targets"]:
                        host, _, port = target.rpartition(":")
                        if host in by_name:
                            assert int(port) in _published(by_name[host]), target
    grafana_mounts = {target: source for source, target in _bind_sources(grafana)}
    provisioning = grafana_mounts["/etc/grafana/provisioning"]
    assert (provisioning / "datasources").is_dir()
    assert (provisioning / "dashboards").is_dir()
    for provider_file in (provisioning / "dashboards").glob("*.yml"):
        for provider in yaml.safe_load(provider_file.read_text())["providers"]:
            path = provider["options"]["path"]
            assert path in grafana_mounts, f"dashboards provider path {path} is not mounted"
            assert list(grafana_mounts[path].glob("*.json")), f"no dashboard in {path}"
    for datasource_file in (provisioning / "datasources").glob("*.yml"):
        for datasource in yaml.safe_load(datasource_file.read_text())["datasources"]:
            host, port = re.fullmatch(r"https?://([^:/]+):(\d+)", datasource["url"]).groups()
            assert host in by_name, f"datasource {datasource['url']}: no service {host}"
            assert f":{port}/" in _healthcheck_text(by_name[host])


def test_broker_healthcheck_passes_only_for_a_broker_that_refuses_anonymous_clients(
    tmp_path: Path, site_env: dict[str, str]
) -> None:
    require_program("mosquitto")
    broker = next(s for s in services(COMPOSE / "edge.yml", site_env) if s.name == "mosquitto")
    kind, script = broker.spec["healthcheck"]["test"]
    assert kind == "CMD-SHELL"

    def check(port: int) -> int:
        local = script.replace("-p 1883", f"-p {port}")
        assert local != script, "the health check must name the loopback listener -p 1883"
        return subprocess.run(["sh", "-c", local], timeout=30, check=False).returncode

    def run_broker(anonymous: bool) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        (tmp_path / "passwd").write_text("")
        (tmp_path / "passwd").chmod(0o600)
        conf = tmp_path / f"m{port}.conf"
        conf.write_text(
            f"user root\nlistener {port} 127.0.0.1\nallow_anonymous {str(anonymous).lower()}\n"
            + ("" if anonymous else f"password_file {tmp_path / 'passwd'}\n")
        )
        process = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
        wait_for_port(port, timeout=10)
        return process, port

    for anonymous, healthy in [(False, True), (True, False)]:
        process, port = run_broker(anonymous)
        try:
            assert (check(port) == 0) is healthy, f"anonymous={anonymous}"
        finally:
            stop_process(process, timeout=10)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    assert check(dead) != 0, "no broker: the health check must fail"


# --- systemd ------------------------------------------------------------------------------------


def _unit_values() -> dict[str, list[str]]:
    """Every `Key=value` of the unit, per key, in order (keys may repeat)."""
    values: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def _memory(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)\s*([KMGkmg]?)[Bb]?", text.strip()).groups()
    return int(number) * 1024 ** " KMG".index(unit.upper() or " ")


def _unit_for_analysis(tmp_path: Path, unit: Path) -> Path:
    """The unit with ExecStart pointed at a program that exists here; all else untouched."""
    program = shutil.which("true") or sys.executable
    text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={program}", unit.read_text())
    assert text != unit.read_text()
    copy_path = tmp_path / unit.name
    copy_path.write_text(text)
    return copy_path


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, unit: Path) -> None:
    analyze = require_program("systemd-analyze", "systemd")
    copy = _unit_for_analysis(tmp_path, unit)
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if unit.name in line
    ]
    assert result.returncode == 0, result.stdout + result.stderr
    assert not complaints, result.stdout + result.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_sandbox_exposure_stays_low(tmp_path: Path, unit: Path) -> None:
    analyze = require_program("systemd-analyze", "systemd")
    copy = _unit_for_analysis(tmp_path, unit)
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(copy)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.5, result.stdout
    print(f"{unit.name}: exposure {match.group(1)}")


def test_the_controller_unit_runs_the_service_the_cli_has() -> None:
    from fleet.cli import build_parser

    unit = COMPOSE / "imu-fleet-controller.service"
    (exec_start,) = [line.partition("=")[2] for line in unit.read_text().splitlines()
                     if line.startswith("ExecStart=")]  # fmt: skip
    argv = exec_start.split()[1:]
    args = build_parser().parse_args(argv)
    assert args.command == "controller"
    assert args.sign_key is not None
    assert args.token_file is not None


def test_unit_keeps_its_hardening_and_limits() -> None:
    values = _unit_values()

    def one(key: str) -> str:
        assert key in values, f"{UNIT.name} lost {key}="
        return values[key][-1]

    expected = {
        "Type": "notify",
        "WatchdogSec": "30",
        "Restart": "always",
        "RestartPreventExitStatus": "76",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "DevicePolicy": "closed",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "CapabilityBoundingSet": "",
        "User": "imu",
        "StateDirectory": "imu-node",
    }
    for key, value in expected.items():
        assert one(key) == value, f"{key}={one(key)}, expected {value!r}"
    assert "/var/lib/imu-node" in one("ReadWritePaths").split()
    assert "/dev/hailo0 rw" in values.get("DeviceAllow", []), "the node must open /dev/hailo0"
    assert values.get("PrivateDevices", ["no"])[-1] != "yes", "PrivateDevices hides /dev/hailo0"
    assert "XDG_STATE_HOME=/var/lib/imu-node" in one("Environment").split()
    assert one("ExecStart").split()[1:] == ["run", "--config", "/etc/imu-node.toml"]
    target = 512 * 1024**2  # the node's RSS target (imu-node check --max-rss-mb 512)
    assert _memory(one("MemoryHigh")) <= target < _memory(one("MemoryMax"))
    assert 0 < int(one("CPUQuota").rstrip("%")) <= 400, "the Pi 5 has four cores"


# --- the broker on Debian's package -------------------------------------------------------------

DEBIAN_OWNS = ("persistence ", "persistence_location ", "log_dest ", "pid_file ")
"""What Debian's /etc/mosquitto/mosquitto.conf sets already (mosquitto refuses a second value)."""


def _settings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_debian_drop_in_is_the_secure_configuration_without_what_debian_sets() -> None:
    """compose/mosquitto-debian.conf cannot drift from compose/mosquitto-secure.conf."""
    secure = _settings((COMPOSE / "mosquitto-secure.conf").read_text())
    expected = [
        line.replace("/mosquitto/config/", "/etc/mosquitto/imu/").replace(
            "/mosquitto/certs/", "/etc/mosquitto/imu/"
        )
        for line in secure
        if not line.startswith(DEBIAN_OWNS)
    ]
    assert _settings((COMPOSE / "mosquitto-debian.conf").read_text()) == expected
