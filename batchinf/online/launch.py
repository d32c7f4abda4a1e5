"""``batchinf serve``: run the online classifier (``batchinf.online.app``) on Ray Serve until stopped.

Where it runs:
  * no ``--address``: a local Ray started here, and stopped with every process it started;
  * ``--address auto`` or ``HOST:6379`` on a cluster node, or ``ray://HEAD:10001`` from
    elsewhere: this process joins that cluster as a Ray driver. The HTTP proxy runs on the head
    node only, at ``--host``:``--port`` there. On exit the app is deleted, and Serve itself is
    shut down if this command started it.

The batch commands take ``--address`` as the Jobs API (``http://HEAD:8265``), because they
submit Ray jobs; ``serve`` must be a driver to deploy, so that form is refused with a hint.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from batchinf.errors import BatchinfError, UsageError
from batchinf.settings import Settings, variable

TOKEN_ENV = variable("serve_token")
APP_NAME = "batchinf"
LOOPBACK = ("127.0.0.1", "localhost", "::1")

log = logging.getLogger("batchinf.serve")


@dataclass(frozen=True)
class ServeOptions:
    model: str
    model_versions: tuple[int, ...] = ()  # each --model-version; none: the highest
    all_versions: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    replicas_min: int = 1
    replicas_max: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float | None = None
    max_batch_size: int = 16
    batch_wait_ms: float = 5.0
    top_k: int = 5
    address: str | None = None

    def validate(self) -> None:
        checks = [
            (1 <= self.port <= 65535, f"--port must be 1..65535, got {self.port}"),
            (self.max_batch_size >= 1, f"--max-batch-size must be at least 1, got {self.max_batch_size}"),
            (self.batch_wait_ms >= 0, f"--batch-wait-ms must be 0 or more, got {self.batch_wait_ms}"),
            (self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}"),
            (self.gpus_per_replica >= 0, "--gpus-per-replica must be 0 or more"),
            (self.cpus_per_replica is None or self.cpus_per_replica > 0,
             "--cpus-per-replica must be more than 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if self.address and self.address.startswith(("http://", "https://")):
            raise UsageError(
                f"serve joins the cluster as a Ray driver, so --address takes auto or HEAD:6379 on a "
                f"cluster node, or ray://HEAD:10001; {self.address} is the Jobs API the batch "
                "commands use")


def take_token(host: str, settings: Settings | None = None) -> str | None:
    """The bearer token (the ``serve_token`` setting), required for any host but loopback.

    ``settings``: the command's; None reads them from the environment. Either way the variable
    is then removed from this process's environment, so no Ray process started here inherits it.
    """
    settings = Settings.from_env() if settings is None else settings
    os.environ.pop(TOKEN_ENV, None)
    token = settings.serve_token
    if token is None and host not in LOOPBACK:
        raise UsageError(f"--host {host} is reachable from other machines: set {TOKEN_ENV} to a "
                         "bearer token that clients must send")
    return token


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived; unwinds to the clean-up."""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGTERM and SIGINT raise ``Stopped`` once; a second signal is handled the default way.

    Installed after ``ray.init``, which puts in a SIGTERM handler of its own.
    """
    stopping = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if stopping.is_set():
            return
        stopping.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Stopped(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stopping
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def serve(options: ServeOptions, token: str | None, say: Callable[[str], None]) -> str:
    """Serve until a signal; return the signal's name. ``say`` gets one line per step."""
    from batchinf.online.versions import served_versions
    from batchinf.raycluster import ensure_ray, session_dir
    from batchinf.signature import inspect

    options.validate()
    # A typo fails before Ray starts, and so does a model it cannot feed, or wrong labels
    sources = served_versions(options.model, options.model_versions, options.all_versions)
    for each in sources:
        inspect(each)
    source = sources[-1]  # the highest, which answers routes that name no version
    local = options.address is None
    if local:
        _check_port_free(options.host, options.port)
    say("starting a local Ray" if local else f"joining the Ray cluster at {options.address}")
    _quiet_serve_logs()
    ensure_ray("local" if local else options.address)
    import ray

    if local:
        say(f"local Ray started; its logs in {session_dir() or '/tmp/ray/session_latest'}/logs")

    started_serve = False
    try:
        with stop_on_signals():
            try:
                started_serve = _start_serve(options)
                versions = ", ".join(s.version or "-" for s in sources)
                say(f"loading {source.name} (version{'s' if len(sources) > 1 else ''} "
                    f"{versions}) on {_replicas(options)}")
                _deploy(options, tuple(sources), token)
                url = f"http://{_url_host(options.host)}:{options.port}"
                say(f"serving {source.name} at {url}/v1/models/{source.name}:classify "
                    f"(docs at {url}/docs; Ctrl-C stops)")
                threading.Event().wait()
            except Stopped as stopped:
                say(f"stopping ({stopped})")
                return str(stopped)
            finally:
                _tear_down(local, started_serve)
    finally:
        ray.shutdown()
    return ""  # not reached: the wait above ends only by a signal


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise BatchinfError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def _quiet_serve_logs() -> None:
    """Serve's own INFO lines repeat what ``say`` tells; its warnings and errors still show.

    Its replicas and proxy keep logging in full to the session's log folder.
    """
    import ray.serve  # its import sets the driver's Serve logger to INFO

    logging.getLogger(ray.serve.__name__).setLevel(logging.WARNING)


def _start_serve(options: ServeOptions) -> bool:
    """Start Serve at host:port, or check a running one listens there. True if started here."""
    from ray import serve

    from batchinf.raycluster import running_serve_address

    running = running_serve_address()
    if running is not None:
        host, port = running
        if (host, port) != (options.host, options.port):
            raise BatchinfError(
                f"Serve already runs on this cluster at {host}:{port}, not at "
                f"{options.host}:{options.port}; pass --host {host} --port {port}, "
                "or stop that Serve first")
        if APP_NAME in serve.status().applications:
            raise BatchinfError(f"a Serve app named {APP_NAME!r} already runs on this cluster "
                                "(another batchinf serve?); stop it first")
        return False
    serve.start(http_options={"host": options.host, "port": options.port},
                proxy_location="HeadOnly")
    return True


def _deploy(options: ServeOptions, sources: tuple[Any, ...], token: str | None) -> None:
    import math

    from ray import serve

    from batchinf.online.app import Classifier, Settings
    from batchinf.raycluster import root_cause

    threads = math.ceil(options.cpus_per_replica) if options.cpus_per_replica else None
    settings = Settings(
        sources=sources, top_k=options.top_k, max_batch_size=options.max_batch_size,
        batch_wait_ms=options.batch_wait_ms, threads=threads,
        token_sha256=hashlib.sha256(token.encode()).hexdigest() if token else None,
    )
    cpus = options.cpus_per_replica or 1.0
    sizing: dict[str, Any] = {"num_replicas": options.replicas_min}
    if options.replicas_max > options.replicas_min:
        sizing = {"autoscaling_config": {
            "min_replicas": options.replicas_min, "max_replicas": options.replicas_max,
            "target_ongoing_requests": options.max_batch_size}}
    app = Classifier.options(  # type: ignore[attr-defined]
        # Room for one batch in the model and the next one filling behind it, and at least 16:
        # requests beyond it wait in Serve's router, whose back-off cut an unbatched replica
        # to 6 requests/s at 32 clients (docs/performance.md).
        max_ongoing_requests=max(2 * options.max_batch_size, 16),
        ray_actor_options={"num_cpus": cpus, "num_gpus": options.gpus_per_replica},
        **sizing,
    ).bind(settings)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as exc:
        raise BatchinfError(f"the model did not start: {root_cause(exc)}") from exc


def _tear_down(local: bool, started_serve: bool) -> None:
    """Leave the cluster as it was found. A local Ray goes with ``ray.shutdown`` whole."""
    if local:
        return
    from ray import serve

    with contextlib.suppress(Exception):
        serve.delete(APP_NAME)
    with contextlib.suppress(Exception):
        if started_serve and not serve.status().applications:
            serve.shutdown()


def _replicas(options: ServeOptions) -> str:
    count = (str(options.replicas_min) if options.replicas_min == options.replicas_max
             else f"{options.replicas_min} to {options.replicas_max}")
    what = f"{options.gpus_per_replica:g} GPU" if options.gpus_per_replica else "CPU"
    return f"{count} {what} replica{'s' if options.replicas_max > 1 else ''}"


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return socket.gethostname()
    return f"[{host}]" if ":" in host else host
