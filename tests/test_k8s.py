"""Kubernetes: the rendered PyTorchJob / TrainJob manifests validate against the operators' published CRD schemas
(vendored in tests/k8s_schemas/), their admission rules and their Python SDK models; a pod's environment is read
as the operators set it; `distrain launch` takes torchrun's PET_* variables. The pods themselves run in
tests/test_k8s_pods.py (network namespaces, marked multinode)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
SCHEMAS = Path(__file__).parent / "k8s_schemas"
CASES = {  # id: (render flags, kind of the job document)
    "pytorchjob-2x1": (["--nodes", "2", "--gpus-per-node", "1", "--pvc", "runs"], "PyTorchJob"),
    "pytorchjob-1x0-no-pvc": (["--nodes", "1", "--gpus-per-node", "0"], "PyTorchJob"),
    "pytorchjob-4x8": (["--nodes", "4", "--gpus-per-node", "8", "--pvc", "runs", "train.micro_batch=2"], "PyTorchJob"),
    "pytorchjob-elastic-1:2x2": (["--nodes", "1:2", "--gpus-per-node", "2", "--pvc", "runs", "train.micro_batch=16"],
                                 "PyTorchJob"),
    "pytorchjob-elastic-2x1": (["--nodes", "2", "--elastic", "--gpus-per-node", "1", "--pvc", "runs"], "PyTorchJob"),
    "trainjob-2x1": (["--kind", "trainjob", "--nodes", "2", "--gpus-per-node", "1", "--pvc", "runs"], "TrainJob"),
    "trainjob-3x0": (["--kind", "trainjob", "--nodes", "3", "--gpus-per-node", "0", "--pvc", "runs",
                      "train.global_batch=63", "train.micro_batch=21"], "TrainJob"),
}


def cli(*args: str) -> tuple:
    """The real `distrain` entry point in this process: (exit code, stdout, stderr)."""
    from distrain.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def render(flags, *extra) -> list:
    code, out, err = cli("k8s", "render", QUICKSTART, "--image", "registry.example/distrain:1", *flags, *extra)
    assert code == 0, err
    return [d for d in yaml.safe_load_all(out) if d]


def strict(schema):
    """The CRD schema as kubectl's strict field validation applies it: an unknown field is an error."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and \
                not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def validate(doc: dict) -> None:
    import jsonschema

    name = {"PyTorchJob": "pytorchjob.kubeflow.org-v1.json", "TrainJob": "trainjob.trainer.kubeflow.org-v1alpha1.json"}
    schema = strict(json.loads((SCHEMAS / name[doc["kind"]]).read_text()))
    jsonschema.Draft7Validator(schema).validate(doc)


def admitted_pytorchjob(doc: dict) -> None:
    """training-operator v1.9's admission webhook (pkg/webhooks/pytorch/pytorchjob_webhook.go) and what its
    controller needs to set the pods' environment (a port named pytorchjob-port in the container pytorch)."""
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 63
    spec = doc["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) <= {"Master", "Worker"}
    if "elasticPolicy" in spec:
        assert "Worker" in replicas and "Master" not in replicas
        assert "nProcPerNode" not in spec["elasticPolicy"]  # forbidden together with spec.nprocPerNode
    else:
        assert replicas["Master"]["replicas"] == 1
    for rtype, replica in replicas.items():
        assert replica["replicas"] >= 1
        containers = replica["template"]["spec"]["containers"]
        main = [c for c in containers if c["name"] == "pytorch"]
        assert len(main) == 1 and all(c.get("image") for c in containers)
        assert any(p["name"] == "pytorchjob-port" for p in main[0]["ports"])


def admitted_trainjob(doc: dict) -> None:
    """Kubeflow Trainer v2.3's torch plugin validation: the trainer's env must not set the PET_* it injects."""
    reserved = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
    assert not reserved & {e["name"] for e in doc["spec"]["trainer"].get("env", [])}
    assert doc["spec"]["runtimeRef"]["name"] == "torch-distributed"


def sdk_round_trip(doc: dict) -> None:
    """The operators' own Python SDK models read the manifest and write back exactly the same (an unknown or
    mistyped field would be dropped or changed)."""
    if doc["kind"] == "PyTorchJob":
        pytest.importorskip("kubeflow.training")
        from kubeflow.training import ApiClient

        client = ApiClient()
        model = client.deserialize(argparse.Namespace(data=json.dumps(doc)), "KubeflowOrgV1PyTorchJob")
        assert client.sanitize_for_serialization(model) == doc
    else:
        pytest.importorskip("kubeflow_trainer_api")
        from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

        assert TrainerV1alpha1TrainJob.from_dict(doc).to_dict() == doc


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_manifests_validate(case):
    flags, kind = CASES[case]
    configmap, job = render(flags)
    assert configmap["kind"] == "ConfigMap" and configmap["apiVersion"] == "v1"
    assert set(configmap["data"]) == {"config.yaml"} and job["kind"] == kind
    validate(job)
    (admitted_pytorchjob if kind == "PyTorchJob" else admitted_trainjob)(job)
    sdk_round_trip(job)
    # The config travels in the ConfigMap, resolved, with its run directory on the mounted volume.
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    assert config["run"]["dir"] == "/mnt/distrain/runs" and config["model"]["name"] == "cnn"


def _pods(job: dict) -> list:
    if job["kind"] == "TrainJob":
        patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        return [patch["template"]["spec"]["template"]["spec"]]
    return [r["template"]["spec"] for r in job["spec"]["pytorchReplicaSpecs"].values()]


def test_render_check_reads_the_job_with_the_sdk(tmp_path, monkeypatch):
    pytest.importorskip("kubeflow.training")
    pytest.importorskip("kubeflow_trainer_api")
    for flags, _ in (CASES["pytorchjob-2x1"], CASES["trainjob-2x1"]):
        render(flags, "--check")
    # A template with a misspelled field: the SDK model drops it, and --check names it.
    template = (REPO / "launch" / "k8s" / "pytorchjob.yaml").read_text().replace("backoffLimit:", "backofLimit:")
    (tmp_path / "typo.yaml").write_text(template)
    code, _, err = cli("k8s", "render", QUICKSTART, "--image", "i", *CASES["pytorchjob-2x1"][0], "--check",
                       "--template", str(tmp_path / "typo.yaml"))
    assert code == 2 and ".spec.runPolicy.backofLimit" in " ".join(err.split())
    # Without the SDK, --check says which extra brings it.
    monkeypatch.setitem(sys.modules, "kubeflow.training", None)
    code, _, err = cli("k8s", "render", QUICKSTART, "--image", "i", *CASES["pytorchjob-2x1"][0], "--check")
    assert code == 2 and "pip install 'distrain[k8s]'" in " ".join(err.split())


def test_what_the_manifests_say():
    _, fixed = render(CASES["pytorchjob-2x1"][0])
    replicas = fixed["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 1)
    assert fixed["spec"]["nprocPerNode"] == "1" and "elasticPolicy" not in fixed["spec"]
    # One process per pod reads the operator's RANK/WORLD_SIZE itself; G > 1 and elastic jobs start torchrun.
    assert replicas["Master"]["template"]["spec"]["containers"][0]["command"] == \
        ["distrain", "train", "/mnt/config/config.yaml"]
    _, big = render(CASES["pytorchjob-4x8"][0])
    assert big["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    assert big["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["command"][1] == "launch"
    assert big["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["resources"] == \
        {"limits": {"nvidia.com/gpu": "8"}}
    _, elastic = render(CASES["pytorchjob-elastic-1:2x2"][0])
    assert elastic["spec"]["elasticPolicy"] == {"rdzvBackend": "c10d", "minReplicas": 1, "maxReplicas": 2,
                                                "maxRestarts": 3}
    assert list(elastic["spec"]["pytorchReplicaSpecs"]) == ["Worker"]
    _, trainjob = render(CASES["trainjob-2x1"][0])
    assert trainjob["spec"]["trainer"]["numNodes"] == 2 and trainjob["spec"]["trainer"]["numProcPerNode"] == 1
    assert trainjob["spec"]["trainer"]["command"] == ["distrain", "launch", "/mnt/config/config.yaml"]
    for job in (fixed, big, elastic, trainjob):
        for pod in _pods(job):
            # SIGTERM to SIGKILL: the step in flight and the preemption checkpoint (2 x dist.timeout_s + 60).
            assert pod["terminationGracePeriodSeconds"] == 2 * 300 + 60
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes["runs"]["persistentVolumeClaim"] == {"claimName": "runs"}
            assert volumes["config"]["configMap"]["name"] == "quickstart-config"
    _, custom = render(CASES["pytorchjob-2x1"][0], "--grace-period", "90", "--name", "exp-7", "--namespace", "ml")
    assert custom["metadata"] == {"name": "exp-7", "namespace": "ml"}
    assert _pods(custom)[0]["terminationGracePeriodSeconds"] == 90


@pytest.mark.parametrize("flags, message", [
    (["--nodes", "2", "--gpus-per-node", "1"], "needs --pvc CLAIM"),
    (["--kind", "trainjob", "--nodes", "1:3", "--gpus-per-node", "1", "--pvc", "r"], "no elastic mode"),
    (["--nodes", "2:3", "--gpus-per-node", "1", "--pvc", "r"], "(2, 3 ranks): it fails at 3"),  # 64 / 3 workers
    (["--nodes", "1", "--gpus-per-node", "1", "--name", "Bad_Name"], "Pass --name"),
    (["--nodes", "0", "--gpus-per-node", "1"], "at least 1"),
])
def test_render_refuses_jobs_that_cannot_work(flags, message):
    code, out, err = cli("k8s", "render", QUICKSTART, "--image", "img", *flags)
    assert code == 2, out[-500:]
    assert message in " ".join(err.split())


# --- a pod's environment, exactly as the operators set it ---------------------------------------------------------
PYTORCHJOB_WORKER = {  # training-operator v1.9, envvar.go + master.go: worker 0 of a 2-pod job, nprocPerNode "1"
    "PYTHONUNBUFFERED": "1", "MASTER_PORT": "23456", "PET_MASTER_PORT": "23456", "MASTER_ADDR": "job-master-0",
    "PET_MASTER_ADDR": "job-master-0", "WORLD_SIZE": "2", "RANK": "1", "PET_NODE_RANK": "1",
    "PET_NPROC_PER_NODE": "1", "PET_NNODES": "2", "KUBERNETES_SERVICE_HOST": "10.96.0.1"}
TRAINJOB_NODE = {  # Kubeflow Trainer v2.3, torch.go: node 2 of 3
    "PET_NNODES": "3", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "job-node-0-0.job",
    "PET_MASTER_PORT": "29500", "KUBERNETES_SERVICE_HOST": "10.96.0.1"}
ELASTIC_WORKER = {  # training-operator v1.9, elastic.go
    "PYTHONUNBUFFERED": "1", "PET_RDZV_ENDPOINT": "job-worker-0:23456", "PET_RDZV_BACKEND": "c10d",
    "PET_NNODES": "1:2", "PET_MAX_RESTARTS": "3", "PET_NPROC_PER_NODE": "2", "KUBERNETES_SERVICE_HOST": "10.96.0.1"}


def test_a_pytorchjob_pod_is_one_rank_without_local_rank():
    from distrain.env import ProcessInfo, detect

    assert detect(PYTORCHJOB_WORKER) == ProcessInfo(rank=1, local_rank=0, world_size=2, local_world_size=1,
                                                    master_addr="job-master-0", master_port=23456, source="kubeflow")
    # Older operators set no PET_* without elasticPolicy: the Kubernetes service variable marks the pod.
    plain = {k: v for k, v in PYTORCHJOB_WORKER.items() if not k.startswith("PET_")}
    assert detect(plain).source == "kubeflow"
    assert detect(TRAINJOB_NODE) == ProcessInfo(rank=2, local_rank=0, world_size=3, local_world_size=1,
                                                master_addr="job-node-0-0.job", master_port=29500, source="kubeflow")
    # torchrun inside the pod: its variables are the truth.
    under_torchrun = {**PYTORCHJOB_WORKER, "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x", "RANK": "3",
                      "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    assert detect(under_torchrun).source == "torchelastic" and detect(under_torchrun).rank == 3


@pytest.mark.parametrize("environ", [ELASTIC_WORKER, {**PYTORCHJOB_WORKER, "PET_NPROC_PER_NODE": "4",
                                                      "WORLD_SIZE": "8"}, {**TRAINJOB_NODE, "PET_NPROC_PER_NODE": "2"}],
                         ids=["elastic", "pytorchjob-4-per-pod", "trainjob-2-per-pod"])
def test_pods_that_need_torchrun_say_so(environ):
    from distrain.env import detect
    from distrain.errors import ConfigError

    with pytest.raises(ConfigError, match="distrain launch CONFIG"):
        detect(environ)


def test_a_bad_rank_from_the_operator_is_named():
    from distrain.env import detect
    from distrain.errors import ConfigError

    with pytest.raises(ConfigError, match="PET_NODE_RANK/PET_NNODES"):
        detect({**TRAINJOB_NODE, "PET_NODE_RANK": "3"})


@pytest.mark.parametrize("environ, expected", [
    (ELASTIC_WORKER, {"nnodes": "1:2", "nproc_per_node": 2, "node_rank": None,
                      "rdzv_endpoint": "job-worker-0:23456", "rdzv_id": "distrain", "max_restarts": 3}),
    (TRAINJOB_NODE, {"nnodes": "3", "nproc_per_node": 1, "node_rank": 2, "rdzv_endpoint": "job-node-0-0.job:29500",
                     "rdzv_id": "distrain", "max_restarts": 0}),
    ({}, {"nnodes": "1", "nproc_per_node": 1, "node_rank": None, "rdzv_endpoint": None, "rdzv_id": "distrain",
          "max_restarts": 0}),
], ids=["elastic", "trainjob", "no-pet"])
def test_distrain_launch_takes_torchruns_pet_variables(monkeypatch, environ, expected):
    from distrain.launch.torchrun import fill_from_environment, torchrun_args

    for name in ("PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_MASTER_ADDR", "PET_MASTER_PORT",
                 "PET_RDZV_ENDPOINT", "PET_RDZV_ID", "PET_MAX_RESTARTS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    args = argparse.Namespace(nnodes=None, nproc_per_node=None, node_rank=None, rdzv_endpoint=None, rdzv_id=None,
                              max_restarts=None, monitor_interval=1.0, local_addr=None, join_timeout=600.0, config="c.yaml",
                              overrides=[])
    fill_from_environment(args)
    assert {k: getattr(args, k) for k in expected} == expected
    if environ is TRAINJOB_NODE:  # node 0 hosts the rendezvous store; c10d assigns the ranks
        assert "is_host=false" in torchrun_args(args)[torchrun_args(args).index("--rdzv-conf") + 1].split(",")
    # A flag given on the command line wins over the operator's variable.
    args.nproc_per_node = 5
    fill_from_environment(args)
    assert args.nproc_per_node == 5


def test_an_elastic_range_is_checked_at_every_world_size_and_the_suggested_batch_fits_them_all():
    """gpt.yaml (global 32, micro 16) on 2 to 4 pods of 8: 16, 24 and 32 ranks. Each size used to be checked alone,
    so fixing the first error (16) led to the next (24); one paragraph now names every failing size and one global
    batch that fits them all, and that batch renders."""
    gpt = str(REPO / "configs" / "gpt.yaml")
    flags = ["--nodes", "2:4", "--gpus-per-node", "8", "--image", "img", "--pvc", "runs"]
    code, out, err = cli("k8s", "render", gpt, *flags)
    message = " ".join(err.split())
    assert code == 2 and out == "" and "Traceback" not in err
    assert "(16, 24, 32 ranks): it fails at 16, 24, 32" in message and "train.global_batch=1536" in message
    code, out, err = cli("k8s", "render", gpt, *flags, "train.global_batch=1536")
    assert code == 0, err
    assert list(yaml.safe_load_all(out))[1]["spec"]["elasticPolicy"]["maxReplicas"] == 4


@pytest.mark.parametrize("global_batch, micro_batch, sizes", [
    (32, 16, [16, 24, 32]), (32, None, [16, 24, 32]), (64, 32, [1, 2, 3]), (100, 7, [2, 3, 4, 5]), (5, None, [4, 6]),
])
def test_the_suggested_global_batch_is_the_smallest_that_fits_every_world_size(global_batch, micro_batch, sizes):
    from omegaconf import OmegaConf

    from distrain.config import batch_plan, load_config
    from distrain.config.validation import elastic_batch_plans
    from distrain.errors import ConfigError

    cfg = load_config(QUICKSTART, [f"train.global_batch={global_batch}", f"train.micro_batch={micro_batch or 'null'}"])
    with pytest.raises(ConfigError) as refused:
        elastic_batch_plans(cfg, sizes)
    suggested = int(re.search(r"e\.g\. train\.global_batch=(\d+)", str(refused.value)).group(1))

    def fits(g: int) -> bool:
        OmegaConf.update(cfg, "train.global_batch", g)
        try:
            return all(batch_plan(cfg, w) for w in sizes)
        except ConfigError:
            return False
    assert fits(suggested)
    assert not any(fits(g) for g in range(global_batch, suggested))  # nothing smaller (from the configured one) fits
