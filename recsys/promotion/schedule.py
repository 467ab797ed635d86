"""The loop on a schedule, rendered (pure: config + options → documents, validated before writing):

- `recurring_run`: the request body of Kubeflow Pipelines' recurring-run API (POST
  /apis/v2beta1/recurringruns; the UI's "Create recurring run"), built with kfp_server_api's
  V2beta1RecurringRun model around the compiled continuous pipeline (pipelines/continuous_pipeline.yaml).
- `cronjob_documents`: for clusters without Kubeflow Pipelines, a Kubernetes CronJob whose pod runs
  `recsys daily` in the trainer image (the turn of recsys.promotion.daily: prepare the window, submit
  the training job through the launcher, gate, recommend), with the ServiceAccount and Role the
  launcher needs to create PyTorchJobs/TrainJobs, and the resolved config in a ConfigMap.

Cron expressions are the usual five fields (minute hour day month weekday) for both; KFP's scheduler
wants six (seconds first), so the recurring run gets "0 " in front.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config

#: Where the daily turn keeps its windows (on the data PVC, mounted at /data).
DAILY_DATA_ROOT = "/data/continuous"
CONTINUOUS_PIPELINE_YAML = "pipelines/continuous_pipeline.yaml"
#: What the CronJob's launcher may do in the job namespace: what recsys.launch's Kubernetes client does.
LAUNCHER_RULES = [
    {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
    {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "get", "list", "watch", "delete", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
]  # fmt: skip


def check_cron(cron: str) -> str:
    """A five-field cron expression, stripped; anything else is one line saying the format."""
    fields = cron.split()
    if len(fields) != 5:
        raise UserError(
            f"--cron {cron!r}: expected five fields 'minute hour day-of-month month day-of-week', "
            "e.g. '0 3 * * *' (every day at 03:00 UTC)"
        )
    return " ".join(fields)


# ------------------------------------------------------------------------------------- recurring run
def pipeline_spec(path: str | Path) -> dict[str, Any]:
    """The compiled pipeline as the API takes it inline: its PipelineSpec (+ PlatformSpec), checked by
    parsing into kfp's protobuf messages (an unknown field or a broken file fails here)."""
    import yaml
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    if not Path(path).is_file():
        raise UserError(
            f"{path}: no compiled pipeline; run `python pipelines/continuous_pipeline.py --compile`"
        )
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    platform = pipeline_spec_pb2.PlatformSpec()
    for d in docs[1:]:
        json_format.ParseDict(d, platform)
    out = json_format.MessageToDict(spec)
    if platform == pipeline_spec_pb2.PlatformSpec():
        return out
    return {"pipeline_spec": out, "platform_spec": json_format.MessageToDict(platform)}


def recurring_run(
    cron: str,
    spec: dict[str, Any],
    parameters: dict[str, Any],
    display_name: str,
    experiment_id: str | None = None,
    service_account: str | None = None,
) -> dict[str, Any]:
    """The V2beta1RecurringRun request body: one run at a time, no catch-up of missed turns."""
    import kfp_server_api as api

    body = api.V2beta1RecurringRun(
        display_name=display_name,
        description="recsys continuous training: prepare window → warm-start train → gate → recommend",
        pipeline_spec=spec,
        runtime_config=api.V2beta1RuntimeConfig(parameters=parameters),
        trigger=api.V2beta1Trigger(cron_schedule=api.V2beta1CronSchedule(cron="0 " + check_cron(cron))),
        mode=api.RecurringRunMode.ENABLE,
        max_concurrency="1",  # a turn moves the champion alias: never two at once
        no_catchup=True,
        experiment_id=experiment_id,
        service_account=service_account,
    )
    return api.ApiClient().sanitize_for_serialization(body)


# ------------------------------------------------------------------------------------------- cronjob
def daily_command(cfg: Config, backend: str, model_name: str | None) -> list[str]:
    """The CronJob container's command: one turn of the loop on the config in the ConfigMap."""
    from recsys.launch.jobspec import CONFIG_FILE

    cmd = ["recsys", "daily", "--config", f"/etc/recsys/{CONFIG_FILE}", "--backend", backend]
    cmd += ["--data-root", f"{DAILY_DATA_ROOT}/{cfg.name}"]
    return [*cmd, "--model", model_name] if model_name else cmd


def cronjob_documents(
    cfg: Config, cron: str, backend: str, model_name: str | None = None
) -> list[dict[str, Any]]:
    """ServiceAccount + Role + RoleBinding + ConfigMap + CronJob running `recsys daily` on `cron`."""
    from recsys.config import dump_config
    from recsys.launch.jobspec import CONFIG_FILE
    from recsys.launch.kube import _container_security, _pod_security

    name, ns = f"{cfg.job.name}-daily"[:52], cfg.job.namespace
    labels = {
        "app.kubernetes.io/name": "recsys",
        "app.kubernetes.io/component": "continuous",
        "app.kubernetes.io/instance": name,
    }
    meta = {"name": name, "namespace": ns, "labels": labels}
    env: list[dict[str, Any]] = [{"name": "MLFLOW_TRACKING_URI", "value": cfg.job.mlflow_tracking_uri}]
    env_from = (
        [{"secretRef": {"name": cfg.job.mlflow_secret, "optional": True}}] if cfg.job.mlflow_secret else []
    )
    container = {
        "name": "daily",
        "image": cfg.job.image,
        "command": daily_command(cfg, backend, model_name),
        "env": env,
        "envFrom": env_from,
        "resources": {
            "requests": {"cpu": cfg.job.cpu, "memory": cfg.job.memory},
            "limits": {"memory": cfg.job.memory},
        },
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/recsys", "readOnly": True},
            {"name": "data", "mountPath": "/data"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    pod = {
        "serviceAccountName": name,
        "restartPolicy": "Never",
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": name}},
            {"name": "data", "persistentVolumeClaim": {"claimName": cfg.job.data_pvc}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "8Gi"}},
        ],
    }
    cronjob = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": meta,
        "spec": {
            "schedule": check_cron(cron),
            "timeZone": "Etc/UTC",
            "concurrencyPolicy": "Forbid",  # a turn moves the champion alias: never two at once
            "startingDeadlineSeconds": 3600,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": labels, "annotations": {"sidecar.istio.io/inject": "false"}},
                "spec": {
                    "backoffLimit": 1,
                    "template": {
                        "metadata": {"labels": labels, "annotations": {"sidecar.istio.io/inject": "false"}},
                        "spec": pod,
                    },
                },
            },
        },
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": LAUNCHER_RULES,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {CONFIG_FILE: dump_config(cfg)}},
        cronjob,
    ]


def render_cronjob(
    cfg: Config, cron: str, backend: str, model_name: str | None, generated_by: str, path: str
) -> str:
    """The CronJob file: generated-by line, header with Apply/Check/Logs/Clean, validated documents."""
    from recsys.launch.kube import to_yaml
    from recsys.launch.kubeschema import validate_documents

    docs = cronjob_documents(cfg, cron, backend, model_name)
    validate_documents(docs, origin=f"CronJob of {cfg.name}")
    name, ns = docs[-1]["metadata"]["name"], cfg.job.namespace
    lines = [
        f"# generated by {generated_by} — do not edit",
        f"# CronJob {name} ({check_cron(cron)}, UTC): one turn of continuous training per run — prepare the",
        f"# newest window under {DAILY_DATA_ROOT}/{cfg.name}, train ({backend}) on the one before it warm-started",
        "# from the champion, gate it on the newest (recsys promote), recommend with the champion.",
        f"# Needs manifests/base applied (namespace, PVC {cfg.job.data_pvc}, MLflow) and the {backend} operator.",
        f"# Apply: kubectl apply -f {path}",
        f"# Check: kubectl -n {ns} get cronjob {name}; kubectl -n {ns} create job --from=cronjob/{name} {name}-now",
        f"# Logs:  kubectl -n {ns} logs -l app.kubernetes.io/instance={name} --tail=50",
        f"# Clean: kubectl delete -f {path}",
    ]
    return "\n".join(lines) + "\n---\n" + to_yaml(docs)
