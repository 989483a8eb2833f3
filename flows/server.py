"""Local Prefect and MLflow servers on 127.0.0.1, their state in the project folder.

    shomin server                 # both, in the foreground; Ctrl-C stops them
    shomin server --detach        # both in the background; `shomin server --stop` stops them

State: Prefect in ./.prefect (its SQLite database, logs), MLflow in ./mlflow.db
with artifacts in ./mlartifacts -- the same places `shomin run` writes to
without servers, so the UIs show every run made before they were started.
Each server runs in its own process group: stopping kills the server and any
workers it forked. The pids and ports of detached servers are kept in
./.prefect/shomin-servers.json.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
STATE_FILE = "shomin-servers.json"


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def prefect_env(home: Path, port: int, host: str = HOST) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_SERVER_API_HOST=host, PREFECT_SERVER_API_PORT=str(port),
               PREFECT_UI_API_URL=f"http://{host}:{port}/api")
    return env


def prefect_command(port: int, host: str = HOST) -> list[str]:
    return [_bin("prefect"), "server", "start", "--host", host, "--port", str(port)]


def mlflow_command(workdir: Path, port: int, host: str = HOST) -> list[str]:
    return [_bin("mlflow"), "server", "--host", host, "--port", str(port),
            "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination", str(workdir / "mlartifacts"),
            # new experiments keep their artifacts at a plain path (as `shomin run` without a server
            # makes them), not at mlflow-artifacts:/ which only a running server can resolve: a run
            # made after the server stopped still logs to an experiment the server created
            "--default-artifact-root", (workdir / "mlartifacts").resolve().as_uri(), "--workers", "1"]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Until `url` answers 200, the process dies, or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s ({last})")


def stop_process_group(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the group led by pid, then SIGKILL what is left after `grace` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        try:  # reap it if it is our child
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class Server:
    name: str
    url: str
    health: str
    proc: subprocess.Popen | None = None
    pid: int | None = None
    log: str | None = None

    def stop(self, grace: float = 10.0) -> None:
        pid = self.proc.pid if self.proc is not None else self.pid
        if pid:
            stop_process_group(pid, grace)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


@dataclass
class Servers:
    workdir: Path
    servers: list[Server] = field(default_factory=list)

    def get(self, name: str) -> Server | None:
        return next((s for s in self.servers if s.name == name), None)

    @property
    def prefect_api_url(self) -> str | None:
        s = self.get("prefect")
        return f"{s.url}/api" if s else None

    def stop(self) -> None:
        for s in reversed(self.servers):
            s.stop()
        state = self.workdir / ".prefect" / STATE_FILE
        if state.exists():
            state.unlink()

    def save(self) -> Path:
        state = self.workdir / ".prefect" / STATE_FILE
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps([{"name": s.name, "url": s.url, "health": s.health, "log": s.log,
                                      "pid": s.proc.pid if s.proc else s.pid} for s in self.servers], indent=2))
        return state

    def __enter__(self) -> "Servers":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_prefect(workdir: str | Path = ".", port: int | None = None, host: str = HOST,
                  timeout: float = 120.0, extra_env: dict[str, str] | None = None) -> Server:
    workdir = Path(workdir).resolve()
    port = port or free_port(host)
    home = workdir / ".prefect"
    home.mkdir(parents=True, exist_ok=True)
    logf = home / "server.log"
    env = {**prefect_env(home, port, host), **(extra_env or {})}
    return _launch("prefect", prefect_command(port, host), workdir, env, logf,
                   f"http://{host}:{port}", f"http://{host}:{port}/api/health", timeout)


def start_mlflow(workdir: str | Path = ".", port: int | None = None, host: str = HOST,
                 timeout: float = 120.0) -> Server:
    workdir = Path(workdir).resolve()
    port = port or free_port(host)
    (workdir / "mlartifacts").mkdir(parents=True, exist_ok=True)
    logf = workdir / ".prefect" / "mlflow-server.log"
    logf.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
    return _launch("mlflow", mlflow_command(workdir, port, host), workdir, env, logf,
                   f"http://{host}:{port}", f"http://{host}:{port}/health", timeout)


def _launch(name: str, command: list[str], workdir: Path, env: dict, logf: Path, url: str, health: str,
            timeout: float) -> Server:
    """Start a server in its own session (so stopping it stops its children) and wait until healthy."""
    with open(logf, "ab") as out:
        proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = Server(name, url, health, proc, log=str(logf))
    try:
        wait_http(server.health, timeout, proc)
    except BaseException:
        server.stop()
        raise
    return server


def start(workdir: str | Path = ".", prefect_port: int | None = 4200, mlflow_port: int | None = 5000,
          prefect: bool = True, mlflow: bool = True, host: str = HOST, timeout: float = 120.0) -> Servers:
    """Start the servers asked for; if one fails to come up, the others are stopped too."""
    servers = Servers(Path(workdir).resolve())
    try:
        for name, wanted, port, fn in (("prefect", prefect, prefect_port, start_prefect),
                                       ("mlflow", mlflow, mlflow_port, start_mlflow)):
            if not wanted:
                continue
            if port and port_in_use(port, host):
                raise RuntimeError(f"{name}: port {host}:{port} is taken (another server running? "
                                   f"`shomin server --stop`, or pick a port with --{name}-port)")
            servers.servers.append(fn(servers.workdir, port, host, timeout))
    except BaseException:
        servers.stop()
        raise
    return servers


def load(workdir: str | Path = ".") -> Servers | None:
    """Detached servers recorded in ./.prefect/shomin-servers.json, if any."""
    workdir = Path(workdir).resolve()
    state = workdir / ".prefect" / STATE_FILE
    if not state.exists():
        return None
    entries = json.loads(state.read_text())
    return Servers(workdir, [Server(e["name"], e["url"], e["health"], pid=e.get("pid"), log=e.get("log"))
                             for e in entries])


def alive(server: Server) -> bool:
    try:
        wait_http(server.health, 2)
        return True
    except Exception:  # noqa: BLE001
        return False
