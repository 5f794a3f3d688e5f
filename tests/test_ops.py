"""Operations, end to end in real processes: local servers, a scheduled deployment, concurrent runs, a SIGKILL."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from creditflow.flows import ops
from creditflow.storage.catalog import Catalog
from creditflow.storage.workspace import Workspace

CLI = [sys.executable, "-m", "creditflow.flows.cli"]


def _write_pairs(path: Path, n: int = 40, copies: int = 0) -> str:
    """``n`` distinct pairs, then ``copies`` exact repeats (quarantined as duplicates: slow curation, few pairs)."""
    rows = [
        {
            "prompt": f"Question {i}: how do I do thing {i}?",
            "chosen": f"A careful, friendly answer {i}.",
            "rejected": "No.",
        }
        for i in range(n)
    ]
    rows += [rows[i % n] for i in range(copies)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"curate.sources=[{{path: {path}}}]"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _harness_env() -> dict:
    """Subprocesses reuse the session's Prefect server instead of each starting a temporary one."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _verify_store(ws: Workspace) -> list:
    """Every manifest is complete: each output exists and matches its digest; no temporary folders remain."""
    manifests = ws.store.manifests()
    for manifest in manifests:
        for name in manifest.outputs:
            ws.store.file(manifest, name, verify=True)
        for table in manifest.row_counts:
            assert ws.store.read_table(manifest, table, verify=True).num_rows == manifest.row_counts[table]
    assert not list(ws.artifacts_dir.rglob(".tmp-*"))
    return manifests


@pytest.mark.slow
def test_up_serve_scheduler_starts_the_run_and_down(tmp_path):
    """`creditflow up` starts real servers that outlive it; `serve --interval` registers the deployment, and the
    server's scheduler, not a manual trigger, starts a pipeline run, which completes and is listed by `runs`."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ws = tmp_path / "ws"
    source = _write_pairs(tmp_path / "pairs.jsonl")
    ports = ["--prefect-port", str(_free_port()), "--mlflow-port", str(_free_port())]
    serve = None
    try:
        up = subprocess.run([*CLI, "up", "-w", str(ws), *ports], capture_output=True, text=True, timeout=150)
        assert up.returncode == 0, up.stdout + up.stderr
        env = json.loads((ws / "servers" / "env.json").read_text())
        assert set(env) == {"PREFECT_API_URL", "MLFLOW_TRACKING_URI"}
        assert all(ops.healthy(url) for url in env.values())  # still up after the `up` process exited
        assert (ws / "prefect-server").is_dir()  # the server's own PREFECT_HOME, inside the workspace
        status = subprocess.run([*CLI, "status", "-w", str(ws)], capture_output=True, text=True, timeout=60)
        assert status.stdout.count(" ok ") == 2, status.stdout

        # The first interval run is due one interval after registration; the runner looks for due runs every second.
        serve = subprocess.Popen(
            [*CLI, "serve", "-w", str(ws), "--interval", "20", "--name", "every-20s", "--set", source],
            env={**os.environ, "PREFECT_API_URL": env["PREFECT_API_URL"], "PREFECT_RUNNER_POLL_FREQUENCY": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            with get_client(sync_client=True) as client:
                deadline = time.monotonic() + 120
                while True:
                    assert serve.poll() is None, serve.stdout.read()
                    try:
                        deployment = client.read_deployment_by_name("creditflow-pipeline/every-20s")
                        break
                    except Exception:  # ObjectNotFound until serve has registered it
                        assert time.monotonic() < deadline, "deployment not registered within 120 s"
                        time.sleep(0.5)
                assert [s.schedule.interval.total_seconds() for s in deployment.schedules] == [20.0]
                assert deployment.entrypoint == "creditflow.flows.pipeline.pipeline_flow"
                assert deployment.parameters["workspace"] == str(ws.resolve())
                assert deployment.parameters["config"]["curate"]["sources"][0]["path"] == str(tmp_path / "pairs.jsonl")

                # Nobody triggers a run: the scheduler must create one and the runner must finish it.
                of_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
                deadline = time.monotonic() + 300
                while True:
                    assert serve.poll() is None, serve.stdout.read()
                    runs = client.read_flow_runs(deployment_filter=of_deployment)
                    finished = [r for r in runs if r.state and r.state.is_final()]
                    if finished:
                        _kill_group(serve)  # no further scheduled run during the checks below
                        break
                    assert time.monotonic() < deadline, (
                        f"no scheduled run finished within 300 s; runs: {[(r.name, r.state_name) for r in runs]}; "
                        f"server log:\n{(ws / 'servers' / 'prefect.log').read_text()[-3000:]}"
                    )
                    time.sleep(1)
                (flow_run,) = finished[:1]
                subflows = client.read_flow_runs()
        assert flow_run.state.is_completed(), flow_run.state
        assert flow_run.auto_scheduled  # created by the scheduler
        # Readable names in Prefect's run list: the pipeline's run name, and each stage under it.
        assert flow_run.name == "dpo seed=0"
        assert "curate: dpo seed=0" in {r.name for r in subflows if r.parent_task_run_id}
        server_log = (ws / "servers" / "prefect.log").read_text()
        assert "Traceback" not in server_log and "InvalidRequestError" not in server_log, server_log[-3000:]
        listed = subprocess.run([*CLI, "runs", "-w", str(ws)], capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0 and "dpo seed=0" in listed.stdout, listed.stdout + listed.stderr

        workspace = Workspace.resolve(ws)
        (curate,) = workspace.store.manifests("curate")
        assert curate.row_counts["pairs"] == 40
        # The flow run logged to the MLflow server (env.json), which writes the workspace's mlflow.db.
        from mlflow.tracking import MlflowClient

        server = MlflowClient(env["MLFLOW_TRACKING_URI"])
        (parent,) = server.search_runs(
            [server.get_experiment_by_name("creditflow").experiment_id],
            "tags.`creditflow.kind` = 'pipeline' and attributes.status = 'FINISHED'",
        )
        listed = next(run for run in ops.list_runs(str(ws)) if run["run_id"] == parent.info.run_id)
        assert listed["status"] == "FINISHED" and listed["name"] == flow_run.name
        assert listed["stages"][0] == {
            "stage": "curate",
            "fingerprint": curate.fingerprint,
            "cache_hit": False,
            "artifact": True,
        }

        pids = {name: int((ws / "servers" / f"{name}.pid").read_text()) for name in ("prefect", "mlflow")}
        down = subprocess.run([*CLI, "down", "-w", str(ws)], capture_output=True, text=True, timeout=60)
        assert down.returncode == 0 and down.stdout.count("stopped") == 2, down.stdout
        processes = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True).stdout.split()
        alive = {int(g) for g, stat in zip(processes[::2], processes[1::2]) if not stat.startswith("Z")}
        assert not alive & set(pids.values())  # every process of both servers is gone (zombies aside)
        assert not (ws / "servers" / "env.json").exists()
        assert [row["healthy"] for row in ops.status(str(ws))] == [False, False]
    finally:
        if serve is not None:
            _kill_group(serve)
        ops.down(str(ws), grace=2)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_concurrent_pipelines_share_one_workspace(tmp_path):
    """Three `creditflow run` processes at once, two configs: all succeed and the store stays consistent."""
    ws = tmp_path / "ws"
    source = _write_pairs(tmp_path / "pairs.jsonl")
    variants = [[], ["--set", "curate.eval_fraction=0.3"], []]
    procs = [
        subprocess.Popen(
            [*CLI, "run", "-w", str(ws), "--quiet", "--set", source, *extra],
            env=_harness_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for extra in variants
    ]
    try:
        outputs = [p.communicate(timeout=480) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]

    workspace = Workspace.resolve(ws)
    manifests = _verify_store(workspace)
    assert len([m for m in manifests if m.stage == "curate"]) == 2  # one per distinct config

    _, rows = Catalog(workspace.catalog_path, workspace.store).query(
        "SELECT pipeline_run_id, list(stage ORDER BY finished_at), list(fingerprint ORDER BY finished_at) "
        "FROM stage_runs GROUP BY 1"
    )
    assert len(rows) == 3
    stages = {tuple(r[1]) for r in rows}
    assert len(stages) == 1 and next(iter(stages))[0] == "curate"  # every run recorded every stage
    curate_fingerprints = sorted(r[2][0] for r in rows)
    assert len(set(curate_fingerprints)) == 2  # the two same-config runs agree on the fingerprint
    published = {(m.stage, m.fingerprint) for m in manifests}
    assert {(s, f) for r in rows for s, f in zip(r[1], r[2])} <= published

    runs = ops.list_runs(str(ws))
    assert sorted(r["run_id"] for r in runs) == sorted(r[0] for r in rows)
    assert {r["status"] for r in runs} == {"FINISHED"} and {r["kind"] for r in runs} == {"pipeline"}


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_sigkill_mid_stage_leaves_no_artifact_and_the_next_run_recomputes(tmp_path):
    ws = tmp_path / "ws"
    # 100k duplicate rows keep curation busy for several seconds; the 40 distinct pairs keep later stages cheap.
    command = [*CLI, "run", "-w", str(ws), "--quiet", "--set", _write_pairs(tmp_path / "big.jsonl", copies=100_000)]
    proc = subprocess.Popen(
        command, env=_harness_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not list((ws / "artifacts" / "curate").glob(".tmp-*")):  # the stage is writing
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "curation did not start within 120 s"
            time.sleep(0.1)
        time.sleep(1.0)
        assert proc.poll() is None, "curation finished before the kill: make the input larger"
    finally:
        _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL

    workspace = Workspace.resolve(ws)
    assert workspace.store.manifests() == []
    assert [p.name[:5] for p in (ws / "artifacts" / "curate").iterdir() if not p.name.endswith(".lock")] == [".tmp-"]
    assert Catalog(workspace.catalog_path, workspace.store).query("SELECT count(*) FROM stage_runs")[1] == [(0,)]

    rerun = subprocess.run(command, env=_harness_env(), capture_output=True, text=True, timeout=480)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (curate,) = [m for m in _verify_store(workspace) if m.stage == "curate"]  # the dead writer's folder was swept
    assert curate.row_counts == {"pairs": 40, "quarantine": 100_000}
    _, rows = Catalog(workspace.catalog_path, workspace.store).query(
        "SELECT cache_hit FROM stage_runs WHERE stage = 'curate'"
    )
    assert rows == [(False,)]


def _prefect_project(path: Path):
    """A Prefect project file, validated with the schema `prefect deploy` itself uses, every deployment's entrypoint
    loaded as a real flow that takes its parameters (a valid pipeline config among them)."""
    import importlib

    import yaml
    from prefect import Flow
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.client.schemas.schedules import CronSchedule

    from creditflow.flows.config import validate

    root = Path(__file__).resolve().parents[1]
    project = PrefectYamlModel.model_validate(yaml.safe_load(path.read_text()))
    for deployment in project.deployments:
        module_path, _, attr = deployment.entrypoint.partition(":")
        module = importlib.import_module("creditflow." + module_path.removesuffix(".py").replace("/", "."))
        assert Path(module.__file__).resolve() == root / module_path  # the entrypoint file is the installed module
        flow = getattr(module, attr)
        assert isinstance(flow, Flow)
        assert set(deployment.parameters) <= set(flow.parameters.properties)
        validate(deployment.parameters["config"])
        for schedule in deployment.schedules or []:
            CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
    return project


def test_infra_files_parse_and_point_at_real_flows_and_services():
    """Docker cannot run here: check the infra files' structure and that they agree with the code and each other."""
    import yaml
    from prefect.utilities.schema_tools import validate as schema_validate
    from prefect.utilities.templating import find_placeholders

    infra = Path(__file__).resolve().parents[1] / "infra"
    project = _prefect_project(infra / "prefect.yaml")
    (pull,) = project.pull
    workdir = pull["prefect.deployments.steps.set_working_directory"]["directory"]
    assert {d.name for d in project.deployments} == {"nightly", "curate"}
    nightly = next(d for d in project.deployments if d.name == "nightly")
    assert nightly.schedules[0].cron == "0 3 * * *"
    pools = {d.work_pool.name for d in project.deployments}
    workspaces = {d.parameters["workspace"] for d in project.deployments}

    compose = yaml.safe_load((infra / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"prefect-server", "prefect-db", "mlflow", "mlflow-db", "minio", "worker"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            assert (infra / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert set(service.get("depends_on", {})) <= set(services), name
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in compose["volumes"], volume
    worker = services["worker"]
    command = worker["command"]
    assert command[:3] == ["prefect", "worker", "start"] and {command[command.index("--pool") + 1]} == pools
    env = worker["environment"]
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"):
        assert env[key], key
    assert (
        env["PREFECT_API_URL"].startswith("http://prefect-server:")
        and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    )
    assert {env["CREDITFLOW_WORKSPACE"]} == workspaces
    mlflow_command = services["mlflow"]["command"]
    assert mlflow_command[:2] == ["mlflow", "server"] and "mlflow-db:5432" in " ".join(mlflow_command)
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]

    dockerfile = (infra / "Dockerfile.worker").read_text()
    assert f"WORKDIR {workdir}" in dockerfile and "pip install --constraint constraints.txt ." in dockerfile
    assert f'"--pool", "{next(iter(pools))}"' in dockerfile

    template = yaml.safe_load((infra / "k8s" / "base-job-template.yaml").read_text())
    variables = template["variables"]["properties"]
    assert {p.name for p in find_placeholders(template["job_configuration"])} <= set(variables)
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == "{{ command }}" and "nvidia.com/gpu" in container["resources"]["limits"]
    assert variables["env"]["default"]["CREDITFLOW_WORKSPACE"] in workspaces

    multinode = _prefect_project(infra / "k8s" / "prefect-policy-multinode.yaml")
    assert multinode.pull == project.pull and [d.name for d in multinode.deployments] == ["policy-multinode"]
    (deployment,) = multinode.deployments
    assert "work-pool create " + deployment.work_pool.name in (infra / "k8s" / "base-job-template.yaml").read_text()
    assert set(deployment.work_pool.job_variables) <= set(variables)
    # What the Prefect server checks job variables with when the deployment is created.
    schema_validate(deployment.work_pool.job_variables, template["variables"], raise_on_error=True)
    assert {deployment.parameters["workspace"]} == workspaces
    for name in ("policy-multinode.yaml", "policy-multinode-join.yaml", "raycluster.yaml"):
        assert f"`k8s/{name}`" in (infra / "README.md").read_text(), name  # every example is listed


def _render_job(template: dict, job_variables: dict) -> dict:
    """The Job a Kubernetes worker creates: the base job template filled as Prefect's BaseJobConfiguration does
    (variable defaults, then the deployment's job variables; a placeholder left unset drops its key)."""
    from prefect.utilities.templating import apply_values

    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if v.get("default") is not None}
    return apply_values(template["job_configuration"], {**defaults, **job_variables})


def test_the_prefect_multinode_deployment_is_node_0_and_the_indexed_job_joins_it():
    """Node 0 is the work-pool job of a flow run; nodes 1..N-1 run `creditflow join policy` with the same config,
    reach node 0 by the name the headless Service gives it, and mount the same workspace."""
    import shlex

    import typer.main
    import yaml

    from creditflow.flows.cli import app
    from creditflow.flows.cli_common import config_dict
    from creditflow.flows.config import validate
    from creditflow.tasks.train.launch import RDZV_ENV

    infra = Path(__file__).resolve().parents[1] / "infra" / "k8s"
    (deployment,) = _prefect_project(infra / "prefect-policy-multinode.yaml").deployments
    template = yaml.safe_load((infra / "base-job-template.yaml").read_text())
    service, job = yaml.safe_load_all((infra / "policy-multinode-join.yaml").read_text())
    config = validate(deployment.parameters["config"])
    nodes = config.policy.nnodes
    assert nodes > 1 and config.policy.strategy == "fsdp"

    node0 = _render_job(template, deployment.work_pool.job_variables)
    pod = node0["job_manifest"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert service["spec"]["clusterIP"] == "None" and pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()  # the Service names node 0
    (port,) = service["spec"]["ports"]
    endpoint = f"{pod['spec']['hostname']}.{service['metadata']['name']}:{port['port']}"
    assert node0["env"][RDZV_ENV] == endpoint
    assert node0["env"].items() >= template["variables"]["properties"]["env"]["default"].items()  # env is replaced
    assert container["resources"]["limits"]["nvidia.com/gpu"] == config.policy.num_processes
    plain = _render_job(template, {})["job_manifest"]["spec"]["template"]  # other deployments: no DNS name
    assert plain["metadata"] == {} and not {"hostname", "subdomain"} & set(plain["spec"])

    spec = job["spec"]["template"]["spec"]
    (joiner,) = spec["containers"]
    env = {e["name"]: e["value"] for e in joiner["env"]}
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == nodes - 1
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert env[RDZV_ENV] == endpoint and env["CREDITFLOW_WORKSPACE"] == deployment.parameters["workspace"]
    assert (
        spec["volumes"][0]["persistentVolumeClaim"]["claimName"]
        == template["variables"]["properties"]["workspace_pvc"]["default"]
    )
    assert joiner["image"] == template["variables"]["properties"]["image"]["default"]
    assert int(joiner["resources"]["limits"]["nvidia.com/gpu"]) == config.policy.num_processes
    script = joiner["args"][0]
    rank = '"$((JOB_COMPLETION_INDEX + 1))"'
    argv = shlex.split(script.replace(rank, "1"))  # pod index 0 is node 1
    assert argv[:3] == ["exec", "creditflow", "join"] and rank in script
    join = typer.main.get_command(app).commands["join"]  # the CLI's own parser: real options only
    params = join.make_context("join", argv[3:]).params
    assert params["stage_name"] == "policy" and params["node_rank"] == 1
    # The same config as the flow run's parameter: the same fingerprint, so the same launch folder.
    assert config_dict(params["config"], params["set_"]) == config.model_dump(mode="json")


def test_the_kuberay_cluster_mounts_the_workspace_of_the_job_template_and_serves_ray_clients():
    import yaml

    from creditflow.flows.config import validate

    infra = Path(__file__).resolve().parents[1] / "infra" / "k8s"
    cluster = yaml.safe_load((infra / "raycluster.yaml").read_text())
    template = yaml.safe_load((infra / "base-job-template.yaml").read_text())["variables"]["properties"]
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    workers = [group["template"]["spec"] for group in cluster["spec"]["workerGroupSpecs"]]
    assert 10001 in {port["containerPort"] for port in head["containers"][0]["ports"]}  # the Ray Client port
    for spec in [head, *workers]:
        (container,) = spec["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["CREDITFLOW_WORKSPACE"] == template["env"]["default"]["CREDITFLOW_WORKSPACE"]
        assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == template["workspace_pvc"]["default"]
        assert (
            container["volumeMounts"][0]["mountPath"] == "/data" and container["image"] == template["image"]["default"]
        )
    assert all(spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for spec in workers)
    header = (infra / "raycluster.yaml").read_text().split("apiVersion")[0]
    address = header.split("address: ")[1].split(",")[0].strip('"')
    assert address == f"ray://{cluster['metadata']['name']}-head-svc:10001"
    validate({"compute": {"backend": "ray", "address": address, "workers": 4, "gpus_per_worker": 1}})


def test_the_multinode_job_gives_node_0_a_rendezvous_name_and_the_others_join(tmp_path):
    import yaml

    infra = Path(__file__).resolve().parents[1] / "infra" / "k8s"
    service, job = yaml.safe_load_all((infra / "policy-multinode.yaml").read_text())
    template = yaml.safe_load((infra / "base-job-template.yaml").read_text())["variables"]["properties"]
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == job["spec"]["parallelism"]
    assert service["spec"]["clusterIP"] == "None" and spec["subdomain"] == service["metadata"]["name"]
    host, port = env["CREDITFLOW_RDZV_ENDPOINT"].split(":")
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}" and int(port) == 29400
    script = container["args"][0]
    nodes = job["spec"]["completions"]
    assert f"policy.nnodes={nodes}" in script and "creditflow join policy" in script and "creditflow run" in script
    assert env["CREDITFLOW_WORKSPACE"] == template["env"]["default"]["CREDITFLOW_WORKSPACE"]
    assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == template["workspace_pvc"]["default"]
    recipe = Path(__file__).resolve().parents[1] / "configs" / Path(env["CONFIG"]).name
    from creditflow.flows.config import load_config

    policy = load_config(recipe, {"policy.nnodes": nodes}).policy
    assert policy.strategy == "fsdp" and policy.num_processes == int(container["resources"]["limits"]["nvidia.com/gpu"])


def test_prefect_server_on_a_custom_port_points_its_ui_at_that_port(tmp_path):
    ws = Workspace.resolve(tmp_path / "ws")
    argv, env = ops.PREFECT.command(ws, 4321)
    assert argv[-4:] == ["--host", "127.0.0.1", "--port", "4321"]
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4321/api"  # the browser UI calls this API
    assert env["PREFECT_HOME"] == str(ws.root / "prefect-server")


def test_join_explains_a_single_node_config_and_waits_for_node_0s_upstream(tmp_path):
    from creditflow.flows import ops
    from creditflow.flows.config import PipelineConfig
    from creditflow.flows.stages import StageNotReady

    config = PipelineConfig().model_dump(mode="json")
    with pytest.raises(ValueError, match="policy.nnodes is 1: there is no run to join"):
        ops.join_stage("policy", config, str(tmp_path), node_rank=1, timeout=0)
    config["policy"]["nnodes"] = 2
    with pytest.raises(StageNotReady, match="stage 'policy' needs the 'curate' artifact"):
        ops.join_stage("policy", config, str(tmp_path), node_rank=1, timeout=0)  # node 0 has computed nothing yet
    config["reward_model"]["nnodes"] = 2
    with pytest.raises(StageNotReady, match="stage 'reward_model' needs the 'curate' artifact"):
        ops.join_stage("reward_model", config, str(tmp_path), node_rank=1, timeout=0)
    with pytest.raises(ValueError, match="only reward_model and policy run over several nodes, not 'evaluate'"):
        ops.join_stage("evaluate", config, str(tmp_path), node_rank=1, timeout=0)


def test_the_end_of_run_footer_points_at_the_mlflow_server_in_use(tmp_path, monkeypatch, capsys):
    from creditflow.flows.render import print_where_to_look

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5123")
    print_where_to_look(str(tmp_path))
    served = capsys.readouterr().out
    assert "http://127.0.0.1:5123/#/experiments" in served and ":5000" not in served
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    print_where_to_look(str(tmp_path))
    embedded = capsys.readouterr().out
    assert f"creditflow ui -w {tmp_path}" in embedded and "http://127.0.0.1:5000/" in embedded
