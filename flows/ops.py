"""Operations: local Prefect and MLflow servers for a workspace, scheduled serving, and the pipeline-run listing.

``creditflow up`` starts both servers detached, with PID files and logs in ``<workspace>/servers/`` and an
``env.json`` holding ``PREFECT_API_URL`` and ``MLFLOW_TRACKING_URI``; :func:`use_servers` applies it, so every
later ``creditflow`` command talks to the servers instead of a temporary Prefect server and MLflow on SQLite.
Both servers keep their state in the workspace (Prefect's DB under ``prefect-server/``, MLflow's the same
``mlflow.db`` the embedded mode uses), so runs made with and without the servers end up in the same place.

Why not ``prefect server start --background``: in Prefect 3.8 it hands the server's stdout and stderr to a pipe that
nobody reads (no log file, and once the pipe buffer fills the server blocks on its next log line), keeps the server
in the caller's session (a Ctrl-C in that terminal stops it), and ``prefect server stop`` signals only the uvicorn
process. Both servers therefore run under the same small supervisor: own session, log file, PID file, health check.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from creditflow.storage.workspace import Workspace

HOST = "127.0.0.1"
ENV_FILE = "env.json"
# urllib would send even 127.0.0.1 through $http_proxy; health checks must reach the local server directly.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Server:
    name: str  # "prefect" or "mlflow": names the PID and log files
    env_var: str  # the client setting that selects this server
    api_suffix: str  # base URL -> the env var's value

    def url(self, port: int) -> str:
        return f"http://{HOST}:{port}{self.api_suffix}"

    def command(self, ws: Workspace, port: int) -> tuple[list[str], dict[str, str]]:
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
        if self.name == "prefect":
            env["PREFECT_HOME"] = str(ws.root / "prefect-server")  # the server's SQLite DB lives there
            env["PREFECT_UI_API_URL"] = self.url(port)  # else the UI in the browser calls :4200
            argv = ["prefect", "server", "start", "--host", HOST, "--port", str(port)]
        else:
            # MLflow's job runner (8 processes, ~600 MB) only serves GenAI features CreditFlow does not use.
            env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
            # New experiments get a file: artifact root (not the mlflow-artifacts: proxy), so runs logged
            # without the server, straight to mlflow.db, can still write artifacts to the same experiments.
            argv = [
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{ws.mlflow_db}",
                "--artifacts-destination",
                str(ws.mlflow_artifacts_dir),
                "--default-artifact-root",
                ws.mlflow_artifacts_dir.as_uri(),
                "--host",
                HOST,
                "--port",
                str(port),
                "--workers",
                "1",
            ]
        return [sys.executable, "-m", *argv], env


PREFECT = Server("prefect", "PREFECT_API_URL", "/api")
MLFLOW = Server("mlflow", "MLFLOW_TRACKING_URI", "")
SERVERS = (PREFECT, MLFLOW)


def servers_dir(ws: Workspace) -> Path:
    return ws.root / "servers"


def healthy(url: str, timeout: float = 2.0) -> bool:
    """Prefect answers ``<api>/health``, MLflow ``<root>/health``: both are ``<env value>/health``."""
    try:
        with _DIRECT.open(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):  # ValueError: not a URL at all
        return False


def _read_env(ws: Workspace) -> dict[str, str]:
    path = servers_dir(ws) / ENV_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_pid(ws: Workspace, server: Server) -> int | None:
    path = servers_dir(ws) / f"{server.name}.pid"
    return int(path.read_text()) if path.is_file() else None


def _group_alive(pgid: int) -> bool:
    """Does any process of the group still run? Zombies don't count (a reparented leader may wait to be reaped)."""
    for process in psutil.process_iter(["status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(process.pid) == pgid:
                return True
        except (OSError, psutil.Error):  # exited while we looked
            continue
    return False


def _running(pid: int | None, server: Server) -> bool:
    """Does the process group we started still run? (The server leads its own session, so its pid is the pgid.)"""
    if not pid:
        return False
    try:
        leader = psutil.Process(pid).cmdline()
    except psutil.ZombieProcess:
        leader = []  # exited; its children may still serve
    except psutil.Error:
        return False
    if leader and not ("-m" in leader and server.name in leader):
        return False  # a stale PID file: that number now belongs to another program, which we must not signal
    return _group_alive(pid)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) != 0


def _log_tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def up(workspace: str | None, ports: dict[str, int], timeout: float = 120.0) -> dict[str, str]:
    """Start the servers that are not already running and wait until both answer; returns ``env.json``."""
    ws = Workspace.resolve(workspace)
    folder = servers_dir(ws)
    folder.mkdir(exist_ok=True)
    current = _read_env(ws)
    env: dict[str, str] = {}
    started: list[Server] = []
    procs: dict[str, subprocess.Popen] = {}
    try:
        for server in SERVERS:
            pid = _read_pid(ws, server)
            if _running(pid, server) and healthy(current.get(server.env_var, "")):
                env[server.env_var] = current[server.env_var]
                continue
            port = ports[server.name]
            if not _port_free(port):
                raise RuntimeError(
                    f"{server.name}: port {port} on {HOST} is in use (another port, or `creditflow down` first)"
                )
            argv, proc_env = server.command(ws, port)
            log = open(folder / f"{server.name}.log", "ab")
            # A new session: the server survives this command and its whole process tree stops with one killpg.
            procs[server.name] = subprocess.Popen(
                argv,
                cwd=ws.root,
                env=proc_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
            started.append(server)
            (folder / f"{server.name}.pid").write_text(str(procs[server.name].pid))
            env[server.env_var] = server.url(port)
        deadline = time.monotonic() + timeout
        for server in started:
            while not healthy(env[server.env_var]):
                if procs[server.name].poll() is not None:
                    raise RuntimeError(
                        f"{server.name} server exited with code {procs[server.name].returncode}; "
                        f"log {folder / server.name}.log:\n{_log_tail(folder / f'{server.name}.log')}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{server.name} not healthy after {timeout:.0f}s; see {folder}/{server.name}.log"
                    )
                time.sleep(0.5)
    except BaseException:
        for server in started:
            _stop(ws, server, grace=5.0)
        raise
    (folder / ENV_FILE).write_text(json.dumps(env, indent=2) + "\n")
    return env


def _stop(ws: Workspace, server: Server, grace: float) -> str:
    pid_file = servers_dir(ws) / f"{server.name}.pid"
    pid = _read_pid(ws, server)
    outcome = "not running"
    if _running(pid, server):
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _running(pid, server) and time.monotonic() < deadline:
            time.sleep(0.2)
        outcome = f"stopped (pid {pid})"
        if _running(pid, server):
            os.killpg(pid, signal.SIGKILL)
            outcome = f"killed after {grace:.0f}s (pid {pid})"
    pid_file.unlink(missing_ok=True)
    return outcome


def down(workspace: str | None, grace: float = 10.0) -> dict[str, str]:
    """SIGTERM each server's process group, SIGKILL what is left after ``grace`` seconds; forget ``env.json``."""
    ws = Workspace.resolve(workspace)
    (servers_dir(ws) / ENV_FILE).unlink(missing_ok=True)  # first, so no new command picks a stopping server
    return {server.name: _stop(ws, server, grace) for server in SERVERS}


def status(workspace: str | None) -> list[dict[str, Any]]:
    ws = Workspace.resolve(workspace)
    env = _read_env(ws)
    rows = []
    for server in SERVERS:
        pid = _read_pid(ws, server)
        url = env.get(server.env_var)
        rows.append(
            {
                "server": server.name,
                "pid": pid if _running(pid, server) else None,
                "url": url,
                "healthy": bool(url) and healthy(url),
                "log": str(servers_dir(ws) / f"{server.name}.log"),
            }
        )
    return rows


def use_servers(workspace: str | None) -> dict[str, str]:
    """Point this process at the workspace's servers when ``creditflow up`` started them and they answer.

    Variables already set win (``setdefault``). Call it before Prefect is imported: Prefect reads its settings
    once, at import. Without servers nothing changes and the embedded defaults apply.
    """
    ws = Workspace.resolve(workspace)
    env = _read_env(ws)
    if not env:
        return {}
    if not all(healthy(url) for url in env.values()):
        print(
            f"note: the servers in {servers_dir(ws)} do not answer; using the embedded defaults "
            f"(`creditflow up -w {ws.root}` restarts them)",
            file=sys.stderr,
        )
        return {}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return env


def serve(
    config: dict[str, Any],
    workspace: str | None,
    name: str,
    cron: str | None = None,
    interval: float | None = None,
    limit: int = 1,
) -> None:
    """Register ``creditflow-pipeline/<name>`` with its schedule and run its flow runs until interrupted.

    ``limit`` runs at most that many pipeline runs at once: a run still going when the next one is due delays it,
    instead of two runs competing for the same cores and workspace."""
    from prefect.settings import PREFECT_API_URL
    from prefect.types.entrypoint import EntrypointType

    from creditflow.flows.pipeline import pipeline_flow

    if not PREFECT_API_URL.value():
        # The temporary server would vanish with this process, and with it the schedule.
        raise RuntimeError("serving needs a Prefect server: run `creditflow up` first, or set PREFECT_API_URL")
    ws = Workspace.resolve(workspace)
    pipeline_flow.serve(
        name=name,
        cron=cron,
        interval=interval,
        parameters={"config": config, "workspace": str(ws.root), "progress": False},
        tags=["creditflow"],
        limit=limit,
        # A module path, not this checkout's file path: runs resolve the flow from the installed package.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def list_runs(workspace: str | None, limit: int = 10) -> list[dict[str, Any]]:
    """The most recent pipeline runs from the catalog's ``stage_runs``, newest first, with MLflow name/status.

    A stage run outside a pipeline counts as a run of its own. ``stages`` lists each stage's fingerprint,
    cache hit, and whether its artifact is still in the store (``creditflow artifacts gc`` removes old ones).
    """
    from creditflow.storage.catalog import Catalog
    from creditflow.storage.tracking import client_for

    ws = Workspace.resolve(workspace)
    rows = Catalog(ws.catalog_path, ws.store).recent_runs(limit)
    runs: dict[str, dict[str, Any]] = {}
    for run_id, finished_at, in_pipeline, stage, fingerprint, cache_hit in rows:
        run = runs.setdefault(
            run_id,
            {"run_id": run_id, "kind": "pipeline" if in_pipeline else "stage", "finished_at": finished_at},
        )
        run.setdefault("stages", []).append(
            {
                "stage": stage,
                "fingerprint": fingerprint,
                "cache_hit": cache_hit,
                "artifact": ws.store.exists(stage, fingerprint),
            }
        )
    if runs:
        from mlflow.exceptions import MlflowException

        client = client_for(ws)
        for run in runs.values():
            try:
                info = client.get_run(run["run_id"]).info
                run["name"], run["status"] = info.run_name, info.status
            except MlflowException:  # deleted in MLflow, or logged to another tracking server
                run["name"], run["status"] = None, None
    return list(runs.values())


MULTI_NODE_STAGES = ("reward_model", "policy")  # the stages that train under torchrun


def join_stage(
    stage: str, config: dict[str, Any], workspace: str | None, node_rank: int, timeout: float = 86400.0
) -> int:
    """Node ``node_rank`` > 0 of a multi-node run of ``stage`` (its ``nnodes`` > 1): wait until node 0 has the
    stage's upstream artifacts on the shared workspace and has launched, then run this node's torchrun share.
    Same config, same workspace, so the same fingerprint and launch folder as node 0."""
    from creditflow.flows.registry import pin_hub_revisions
    from creditflow.flows.stages import StageNotReady, plan_stage, resolve_upstream
    from creditflow.tasks.train.launch import join_torchrun, launch_folder

    if stage not in MULTI_NODE_STAGES:
        raise ValueError(f"only {' and '.join(MULTI_NODE_STAGES)} run over several nodes, not {stage!r}")
    _, cfg = pin_hub_revisions(config)
    if getattr(cfg, stage).nnodes < 2:
        raise ValueError(f"{stage}.nnodes is 1: there is no run to join (set it to the number of nodes)")
    ws = Workspace.resolve(workspace)
    deadline = time.monotonic() + timeout
    while True:  # node 0 computes the upstream stages first
        try:
            upstream = resolve_upstream(stage, cfg, ws)
            break
        except StageNotReady:
            if time.monotonic() > deadline:
                raise
            time.sleep(5.0)
    plan = plan_stage(stage, cfg, upstream)
    launch = launch_folder(ws.root / "checkpoints" / stage / plan.fingerprint)
    return join_torchrun(launch, node_rank, timeout=max(1.0, deadline - time.monotonic()))
