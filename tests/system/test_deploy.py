"""The deployment files start as written.

There is no container engine here, so docker-compose.yml's services run as the processes they describe:
each service's own command and environment (defaults interpolated as compose would), with only the
addresses of its neighbours (`redis`, `simulator`) and its mounted paths translated to this machine.
Compose itself validates the file in `./dev lint`, the Kubernetes manifests are checked against the API's
schemas there too; here, every variable either file sets must be one tokenfan reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.requests import expected_text, new_session_id, user_message
from tests.support.stack import clean_environment
from tests.support.watchers import CredentialWatcher, finished
from tokenfan.cli.embedded_redis import EmbeddedRedis
from tokenfan.cli.processes import ChildProcess
from tokenfan.runtime.settings import Settings

REPO = Path(__file__).resolve().parents[2]
_INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(:-(?P<default>[^}]*))?\}")


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return document


def interpolate(value: str) -> str:
    """``${NAME:-default}`` as compose reads it with no .env and NAME unset: the default (or empty)."""
    return _INTERPOLATION.sub(lambda match: match.group("default") or "", value)


def known_variables() -> set[str]:
    names = {str(spec.metadata["env"]) for spec in dataclasses.fields(Settings)}
    return names | {f"{name}_FILE" for name in names}


def test_every_variable_the_deployment_files_set_is_one_tokenfan_reads() -> None:
    known = known_variables()
    for name, service in compose()["services"].items():
        if str(service.get("image", "")).startswith("tokenfan"):
            unknown = set(service.get("environment", {})) - known
            assert not unknown, f"docker-compose.yml service {name}: {unknown}"
    for document in yaml.safe_load_all((REPO / "deploy/kubernetes/tokenfan.yaml").read_text()):
        if document["kind"] == "ConfigMap":
            assert not set(document["data"]) - known
        if document["kind"] == "Deployment":
            for container in document["spec"]["template"]["spec"]["containers"]:
                assert not {variable["name"] for variable in container.get("env", [])} - known


#: Where every process of the deployment files serves its metrics (inside its container or pod).
METRICS_PORT = "9090"
ROLES = ("api", "relay", "worker")


def listens_everywhere(args: list[str]) -> bool:
    """Whether a process given these arguments listens on every interface (its metrics too)."""
    return "--host" in args and args[args.index("--host") + 1] == "0.0.0.0"


def test_every_compose_process_serves_metrics_to_the_network() -> None:
    roles = set()
    for name, service in compose()["services"].items():
        role, *args = service.get("command", [""])
        if str(service.get("image", "")).startswith("tokenfan") and role in ROLES:
            roles.add(role)
            assert service["environment"]["TOKENFAN_METRICS_PORT"] == METRICS_PORT, name
            assert METRICS_PORT in service["expose"], name
            assert listens_everywhere(args), name
    assert roles == set(ROLES)


def test_every_kubernetes_pod_serves_metrics_and_asks_to_be_scraped() -> None:
    documents = list(yaml.safe_load_all((REPO / "deploy/kubernetes/tokenfan.yaml").read_text()))
    (config,) = [document for document in documents if document["kind"] == "ConfigMap"]
    assert config["data"]["TOKENFAN_METRICS_PORT"] == METRICS_PORT
    deployments = [document for document in documents if document["kind"] == "Deployment"]
    assert {deployment["metadata"]["labels"]["role"] for deployment in deployments} == set(ROLES)
    for deployment in deployments:
        pod = deployment["spec"]["template"]
        assert pod["metadata"]["annotations"] == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": METRICS_PORT,
            "prometheus.io/path": "/metrics",
        }
        (container,) = pod["spec"]["containers"]
        assert {"containerPort": int(METRICS_PORT), "name": "metrics"} in container["ports"]
        assert listens_everywhere(container["args"])


class ComposeStack:
    """The single-Redis services of docker-compose.yml, run as the processes they are."""

    def __init__(self, redis: EmbeddedRedis, root: Path) -> None:
        self.redis = redis
        self.root = root
        self.services = compose()["services"]
        self.children: list[ChildProcess] = []
        self.urls: dict[str, str] = {}

    def translate(self, value: str) -> str:
        value = interpolate(value)
        value = value.replace("redis://redis:6379/0", self.redis.url)
        value = value.replace("http://simulator:8002", self.urls.get("simulator", "http://simulator:8002"))
        for inside, here in (("/run/tokenfan/", self.root / "secrets"), ("/tmp/", self.root)):  # noqa: S108
            if value.startswith(inside):
                return f"{here}/{value.removeprefix(inside)}"
        return value

    def env(self, service: str) -> dict[str, str]:
        environment = self.services[service].get("environment", {})
        env = {**clean_environment(), **{k: self.translate(str(v)) for k, v in environment.items()}}
        if "TOKENFAN_METRICS_PORT" in env:  # one port per container there; here, processes share a host
            env["TOKENFAN_METRICS_PORT"] = "0"
        return env

    def start(self, service: str) -> ChildProcess:
        role, *args = self.services[service]["command"]
        args = [{"0.0.0.0": "127.0.0.1"}.get(arg, arg) for arg in args]
        if "--port" in args:
            args[args.index("--port") + 1] = "0"
        with (self.root / f"{service}.log").open("ab") as log:
            child = ChildProcess(role, args, env=self.env(service), stderr=log, name=service).start()
        self.children.append(child)
        self.urls[service] = child.wait_ready()
        return child

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def test_the_secrets_service_makes_credentials_once(tmp_path: Path) -> None:
    entrypoint = " ".join(compose()["services"]["secrets"]["entrypoint"])
    assert "tokenfan secrets /run/tokenfan" in entrypoint
    first = subprocess.run(
        [sys.executable, "-m", "tokenfan", "secrets", str(tmp_path)],
        env=clean_environment(),
        capture_output=True,
        text=True,
        check=True,
    )
    key = (tmp_path / "api_keys").read_text().strip().partition(":")[2]
    assert key in first.stdout
    assert oct((tmp_path / "api_keys").stat().st_mode & 0o777) == "0o600"
    again = subprocess.run(
        [sys.executable, "-m", "tokenfan", "secrets", str(tmp_path)],
        env=clean_environment(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert key not in again.stdout  # shown once; the files stay as they were
    assert (tmp_path / "api_keys").read_text().strip().endswith(key)


@pytest.mark.fault
async def test_the_compose_services_start_as_written_and_serve_a_generation(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    secrets = [sys.executable, "-m", "tokenfan", "secrets", str(tmp_path / "secrets")]
    await asyncio.to_thread(subprocess.run, secrets, env=clean_environment(), capture_output=True, check=True)
    stack = ComposeStack(redis_server, tmp_path)
    try:
        started = {service: stack.start(service) for service in ("simulator", "relay", "api", "worker")}
        key = (tmp_path / "secrets" / "api_keys").read_text().strip().partition(":")[2]
        session_id = new_session_id()
        body = user_message("as written", {"tokens": 20})
        async with httpx.AsyncClient(base_url=stack.urls["api"], timeout=30) as api:
            assert (await api.get("/readyz")).status_code == 200
            accepted = await api.post(
                f"/v1/sessions/{session_id}/generations",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
            )
            assert accepted.status_code == 202, accepted.text
            watcher = await CredentialWatcher(stack.urls["relay"], session_id).connect_with(
                header=accepted.json()["token"]
            )
            generation_id = accepted.json()["generation_id"]
            await watcher.receive_until(finished(generation_id))
            await watcher.close()
        assert watcher.transcript().generations[generation_id].text == expected_text(body)
        async with httpx.AsyncClient(timeout=10) as client:
            for service in ROLES:
                scraped = await client.get(started[service].metrics_url)
                assert scraped.status_code == 200
                assert f'tokenfan_info{{component="{service}"' in scraped.text
        alive = [stack.translate(part) for part in compose()["services"]["worker"]["healthcheck"]["test"][1:]]
        probe = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", *alive], env=clean_environment()
        )
        assert probe.returncode == 0
    finally:
        stack.stop()
