"""The Docker engine behind one small blocking interface, for the Docker provider.

Design rule: this is the only module that touches the Docker SDK, and `engine_errors` is the one place
its exceptions become turnout's (EngineUnavailableError 503, NotFoundError, ConflictError), so the
provider reasons about three outcomes instead of the SDK's many. Every method blocks: the provider calls
them through asyncio.to_thread.

Digest pins: an image given as `repo@sha256:<hex>` is looked up as a registry digest first; when the
engine knows no such RepoDigest (a locally built or imported image has none) the hex is taken as the
image ID, which is itself a content hash, so the pin is just as immutable.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.errors import ConflictError, FieldError, NotFoundError, TurnoutError, ValidationError
from proxy.model import Version
from proxy.parse import DIGEST_RE

LABEL_MANAGED = "turnout.managed"
LABEL_STATE = "turnout.state"
LABEL_VERSION = "turnout.version"
LABEL_REPLICA = "turnout.replica"
LABEL_IMAGE = "turnout.image"  # the pinned reference the container was made from
LABEL_PORT = "turnout.port"  # host network: the loopback port the replica was told to listen on
LABEL_CONTAINER_PORT = "turnout.container-port"  # bridge network: the port published on 127.0.0.1

# Timeout for each blocking engine call; long enough for a slow `docker create`, short enough to notice
# an engine that hangs.
ENGINE_TIMEOUT = 30


class EngineUnavailableError(TurnoutError):
    """The Docker engine cannot be reached; nothing was changed there."""

    status_hint = 503


@dataclass(frozen=True, slots=True)
class ResolvedImage:
    pinned: str  # repo@sha256:<hex>, what the store records
    image_id: str  # sha256:<hex>, what containers are created from
    tag: str | None = None  # the tag it was resolved from, if any


@dataclass(frozen=True, slots=True)
class Container:
    """One managed container as the engine describes it."""

    id: str
    name: str
    version: str
    replica: int
    image: str  # LABEL_IMAGE
    running: bool
    status: str  # engine state: created, running, exited, dead, ...
    started_at: str
    exit_code: int
    health: str | None  # the image's own HEALTHCHECK status, when it has one
    endpoint: str | None  # http://127.0.0.1:<port> when known


def repo_of(ref: str) -> str:
    """`registry:5000/team/app:tag` -> `registry:5000/team/app` (a ':' after the last '/' starts the tag)."""
    ref = ref.split("@", 1)[0]
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    return ref[:colon] if colon > slash else ref


def container_endpoint(attrs: Mapping[str, Any], port: int | None) -> str | None:
    labels = attrs.get("Config", {}).get("Labels") or {}
    if labels.get(LABEL_PORT):
        return f"http://127.0.0.1:{labels[LABEL_PORT]}"
    if port is None:
        return None
    bindings = (attrs.get("NetworkSettings", {}).get("Ports") or {}).get(f"{port}/tcp") or []
    for b in bindings:
        if b.get("HostPort"):
            return f"http://{b.get('HostIp') or '127.0.0.1'}:{b['HostPort']}"
    return None


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The engine, behind one translation of foreign exceptions


def sdk(module: str = "docker") -> Any:
    """The Docker SDK, imported on first use (it pulls in requests) and untyped.

    importlib also keeps type checkers from taking the repository's docker/ folder of build scripts for it.
    """
    return importlib.import_module(module)


@contextlib.contextmanager
def engine_errors(what: str) -> Iterator[None]:
    errors = sdk("docker.errors")
    requests_errors = sdk("requests.exceptions")
    try:
        yield
    except errors.NotFound as e:
        raise NotFoundError(f"{what}: {e.explanation or e}") from e
    except errors.APIError as e:
        if e.status_code is not None and e.status_code >= 500:
            raise EngineUnavailableError(f"{what}: the Docker engine failed: {e.explanation or e}") from e
        raise ConflictError(f"{what}: {e.explanation or e}") from e
    except (errors.DockerException, requests_errors.RequestException, OSError) as e:
        raise EngineUnavailableError(f"{what}: the Docker engine is unreachable ({e})") from e


class Engine:
    """Blocking calls to the Docker engine; callers run them in threads."""

    def __init__(self, base_url: str | None = None) -> None:
        self.base_url = base_url
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Engine {self.base_url or 'from environment'} [{'connected' if self._client else 'not connected'}]>"

    def socket_path(self) -> str | None:
        url = self.base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        return url.removeprefix("unix://") if url.startswith("unix://") else None

    def _check_socket(self) -> None:
        """Fail fast, with the socket named, when nothing listens on it.

        The SDK leaks its socket when a connect fails; checking first keeps failed attempts clean.
        """
        path = self.socket_path()
        if path is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2.0)
                s.connect(path)
        except OSError as e:
            raise EngineUnavailableError(f"the Docker engine is unreachable at unix://{path} "
                                         f"({e.strerror or e})") from None

    def client(self) -> Any:
        self._check_socket()
        with self._lock:
            if self._client is None:
                docker = sdk()
                with engine_errors("connect"):
                    if self.base_url:
                        self._client = docker.DockerClient(base_url=self.base_url, version="auto",
                                                           timeout=ENGINE_TIMEOUT)
                    else:
                        self._client = docker.from_env(version="auto", timeout=ENGINE_TIMEOUT)
            return self._client

    def reset(self) -> None:
        """Forget the connection, so the API version is negotiated again with a restarted engine."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def ping(self) -> None:
        with engine_errors("ping"):
            self.client().ping()

    def resolve(self, ref: str) -> ResolvedImage:
        with engine_errors(f"image {ref}"):
            images = self.client().images
            errors = sdk("docker.errors")

            if DIGEST_RE.search(ref):
                repo, digest = ref.rsplit("@", 1)
                try:
                    img = images.get(ref)
                except errors.NotFound:
                    img = None
                if img is None:
                    try:
                        img = images.get(digest)
                    except errors.NotFound:
                        img = None
                    tags = [] if img is None else list(img.attrs.get("RepoTags") or [])
                    if img is None or img.id != digest or (tags and repo not in {repo_of(t) for t in tags}):
                        raise ValidationError([FieldError("image", (
                            f"no image {ref} in the Docker engine (nothing is pulled: build, load or import it "
                            "first; a local image is pinned as name@<its image ID>)"))])
                return ResolvedImage(pinned=ref, image_id=str(img.id))
            try:
                img = images.get(ref)
            except errors.NotFound:
                raise ValidationError([FieldError("image", (
                    f"no image {ref} in the Docker engine (nothing is pulled: build, load or import it first)"
                ))]) from None
            repo = repo_of(ref)
            digests = [d for d in (img.attrs.get("RepoDigests") or []) if d.split("@", 1)[0] == repo]
            pinned = digests[0] if digests else f"{repo}@{img.id}"
            return ResolvedImage(pinned=pinned, image_id=str(img.id), tag=ref)

    def list_managed(self, state_id: str) -> list[Container]:
        with engine_errors("list containers"):
            found = self.client().containers.list(
                all=True, filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_STATE}={state_id}"]})
            out = []
            for c in found:
                attrs = c.attrs
                out.append(_container_of(attrs, _port_label(attrs)))
            return out

    def inspect(self, container_id: str) -> Container:
        with engine_errors(f"container {container_id[:12]}"):
            attrs = self.client().api.inspect_container(container_id)
            return _container_of(attrs, _port_label(attrs))

    def create(self, *, state_id: str, version: Version, replica: int, image: ResolvedImage) -> Container:
        spec = version.spec
        labels = {
            LABEL_MANAGED: "true", LABEL_STATE: state_id, LABEL_VERSION: version.name, LABEL_REPLICA: str(replica),
            LABEL_IMAGE: image.pinned, **dict(spec.labels),
        }
        env = dict(spec.env)
        kwargs: dict[str, Any] = {}
        if spec.network == "host":
            port = free_loopback_port()
            labels[LABEL_PORT] = str(port)
            env["PORT"] = str(port)
            kwargs["network_mode"] = "host"
        else:
            if spec.port is None:
                raise ValidationError([FieldError("port", "required with network bridge: the port the "
                                                  "container listens on")])
            env.setdefault("PORT", str(spec.port))
            labels[LABEL_CONTAINER_PORT] = str(spec.port)
            # Published on loopback only: the proxy is the way in, never the container port itself.
            kwargs["ports"] = {f"{spec.port}/tcp": ("127.0.0.1", None)}
        name = f"turnout-{state_id[:6]}-{version.name}-{replica}-{uuid.uuid4().hex[:6]}"
        with engine_errors(f"create {name}"):
            c = self.client().containers.create(
                image.image_id, name=name, labels=labels, environment=env, detach=True,
                restart_policy={"Name": "no"}, **kwargs)
            try:
                c.start()
            except Exception:
                with contextlib.suppress(Exception):
                    c.remove(force=True)
                raise
            c.reload()
            return _container_of(c.attrs, spec.port)

    def remove(self, container_id: str) -> None:
        errors = sdk("docker.errors")
        # Already gone is what we wanted.
        with engine_errors(f"remove {container_id[:12]}"), contextlib.suppress(errors.NotFound):
            self.client().api.remove_container(container_id, force=True)

    def logs(self, container_id: str, tail: int = 20) -> tuple[str, ...]:
        with engine_errors(f"logs of {container_id[:12]}"):
            raw = self.client().api.logs(container_id, stdout=True, stderr=True, tail=tail)
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            return tuple(text.splitlines()[-tail:])

    def events(self, state_id: str) -> Any:
        with engine_errors("events"):
            return self.client().events(decode=True, filters={
                "type": "container", "label": [f"{LABEL_MANAGED}=true", f"{LABEL_STATE}={state_id}"]})


def _port_label(attrs: Mapping[str, Any]) -> int | None:
    labels = attrs.get("Config", {}).get("Labels") or {}
    raw = str(labels.get(LABEL_CONTAINER_PORT, ""))
    return int(raw) if raw.isdigit() else None


def _container_of(attrs: Mapping[str, Any], port: int | None) -> Container:
    labels = attrs.get("Config", {}).get("Labels") or {}
    st = attrs.get("State") or {}
    health = (st.get("Health") or {}).get("Status")
    try:
        replica = int(labels.get(LABEL_REPLICA, "-1"))
    except ValueError:
        replica = -1
    return Container(
        id=str(attrs.get("Id", "")), name=str(attrs.get("Name", "")).lstrip("/"),
        version=str(labels.get(LABEL_VERSION, "")), replica=replica, image=str(labels.get(LABEL_IMAGE, "")),
        running=bool(st.get("Running")), status=str(st.get("Status", "")), started_at=str(st.get("StartedAt", "")),
        exit_code=int(st.get("ExitCode") or 0), health=str(health) if health else None,
        endpoint=container_endpoint(attrs, port),
    )
