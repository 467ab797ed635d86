"""A Kubernetes pod spec as `docker run` options, and the env the Kubeflow operators inject: shared by the
local-process emulation (tests/test_operator_contract.py) and the containerised one (tests/test_image_build.py).

Everything is derived from the manifest: the pod's and container's securityContext, its volumes (ConfigMap →
a read-only folder of the ConfigMap's keys, PVC → a host folder shared by the pods, memory emptyDir at
/dev/shm → --shm-size, other emptyDirs → a tmpfs the pod's user may write), its env and resource limits.
A field with no docker equivalent written here fails loudly instead of being dropped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Kubernetes binary quantity suffixes → docker's (tmpfs/--shm-size/--memory take k, m, g).
_SUFFIX = {"Ki": "k", "Mi": "m", "Gi": "g", "Ti": "t"}
# Security settings docker applies anyway (RuntimeDefault = docker's default seccomp profile) or that are
# scheduling-only; listed so that an unknown field still fails.
_POD_SECURITY_KNOWN = {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile"}
_CONTAINER_SECURITY_KNOWN = {"allowPrivilegeEscalation", "capabilities", "readOnlyRootFilesystem"}


def docker_quantity(q: str) -> str:
    """A Kubernetes quantity ("8Gi") as docker writes it ("8g")."""
    for k8s, docker in _SUFFIX.items():
        if q.endswith(k8s):
            return q[: -len(k8s)] + docker
    return q


def security_options(pod_spec: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """--user, --group-add, --cap-drop, no-new-privileges and --read-only from the two securityContexts."""
    sc, csc = pod_spec.get("securityContext", {}), container.get("securityContext", {})
    unknown = (set(sc) - _POD_SECURITY_KNOWN) | (set(csc) - _CONTAINER_SECURITY_KNOWN)
    assert not unknown, f"no docker equivalent written for securityContext fields {sorted(unknown)}"
    assert sc.get("seccompProfile", {"type": "RuntimeDefault"})["type"] == "RuntimeDefault"
    if sc.get("runAsNonRoot"):
        assert sc.get("runAsUser", 0) != 0, "runAsNonRoot with runAsUser 0: the kubelet refuses the pod"
    opts = ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
    if "fsGroup" in sc:
        opts += ["--group-add", str(sc["fsGroup"])]  # the kubelet adds fsGroup to the supplementary groups
    for cap in csc.get("capabilities", {}).get("drop", []):
        opts += ["--cap-drop", cap]
    for cap in csc.get("capabilities", {}).get("add", []):
        opts += ["--cap-add", cap]
    if csc.get("allowPrivilegeEscalation") is False:
        opts += ["--security-opt", "no-new-privileges"]
    if csc.get("readOnlyRootFilesystem"):
        opts += ["--read-only"]
    return opts


def volume_options(
    pod_spec: dict[str, Any],
    container: dict[str, Any],
    configmaps: dict[str, dict[str, Any]],
    pvc_root: Path,
    pod_dir: Path,
) -> list[str]:
    """-v / --tmpfs / --shm-size for each volumeMount; PVC claims become pvc_root/<claim> (shared by pods)."""
    sc = pod_spec.get("securityContext", {})
    uid, gid = sc["runAsUser"], sc.get("fsGroup", sc.get("runAsGroup", sc["runAsUser"]))
    vols = {v["name"]: v for v in pod_spec["volumes"]}
    opts: list[str] = []
    for m in container["volumeMounts"]:
        vol, path = vols[m["name"]], m["mountPath"]
        if "configMap" in vol:
            # A ConfigMap volume is read-only whatever the mount says; its keys are the files.
            local = pod_dir / "configmap" / vol["configMap"]["name"]
            local.mkdir(parents=True, exist_ok=True)
            for key, text in configmaps[vol["configMap"]["name"]]["data"].items():
                (local / key).write_text(text)
            opts += ["-v", f"{local}:{path}:ro"]
        elif "persistentVolumeClaim" in vol:
            local = pvc_root / vol["persistentVolumeClaim"]["claimName"]
            local.mkdir(parents=True, exist_ok=True)
            # fsGroup makes a PVC writable for the pod's group; a host folder owned by it does here.
            os.chown(local, uid, gid)
            opts += ["-v", f"{local}:{path}{':ro' if m.get('readOnly') else ''}"]
        elif "emptyDir" in vol and path == "/dev/shm" and vol["emptyDir"].get("medium") == "Memory":
            opts += ["--shm-size", docker_quantity(vol["emptyDir"].get("sizeLimit", "64Mi"))]
        elif "emptyDir" in vol:
            size = vol["emptyDir"].get("sizeLimit")
            extra = f",size={docker_quantity(size)}" if size else ""
            # exec: an emptyDir is not mounted noexec (docker's --tmpfs is); Spark's snappy-java loads
            # the native library it unpacks into /tmp.
            opts += ["--tmpfs", f"{path}:uid={sc['runAsUser']},gid={gid},mode=1777,exec{extra}"]
        else:
            raise AssertionError(f"no docker equivalent written for volume {vol}")
    return opts


def env_options(container: dict[str, Any], extra: dict[str, str]) -> list[str]:
    """-e for the container's literal env and `extra` (injected); optional absent Secrets add nothing."""
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        else:
            # secretKeyRef with optional: true and no such Secret here → the kubelet leaves it unset.
            assert e["valueFrom"]["secretKeyRef"]["optional"] is True, e
    for ref in container.get("envFrom", []):
        assert ref["secretRef"]["optional"] is True, ref  # an absent optional Secret adds nothing
    opts: list[str] = []
    for k, v in {**env, **extra}.items():
        opts += ["-e", f"{k}={v}"]
    return opts


def resource_options(resources: dict[str, Any]) -> list[str]:
    """--memory / --cpus from resources.limits (GPUs are not emulated: CPU-sized jobs only)."""
    limits = resources.get("limits", {})
    assert not any("gpu" in k for k in limits), f"GPU limits cannot run here: {limits}"
    opts = []
    if "memory" in limits:
        opts += ["--memory", docker_quantity(limits["memory"])]
    if "cpu" in limits:
        cpu = str(limits["cpu"])
        opts += ["--cpus", str(int(cpu[:-1]) / 1000) if cpu.endswith("m") else cpu]
    return opts


def pytorchjob_env(job: dict[str, Any], rtype: str, index: int) -> dict[str, str]:
    """What kubeflow/training-operator v1.9 injects into a PyTorchJob replica (envvar.go, master.go).

    MASTER_ADDR is the master's Service, `<job>-master-0`; callers that cannot resolve it map it.
    """
    name, spec = job["metadata"]["name"], job["spec"]
    reps = spec["pytorchReplicaSpecs"]
    total = sum(r["replicas"] for r in reps.values())
    master_c = reps["Master"]["template"]["spec"]["containers"][0]
    port = next(p["containerPort"] for p in master_c["ports"] if p["name"] == "pytorchjob-port")
    rank = index + 1 if rtype == "Worker" else index
    nproc = str(spec["nprocPerNode"])
    return {
        "PYTHONUNBUFFERED": "0",
        "MASTER_PORT": str(port),
        "PET_MASTER_PORT": str(port),
        "MASTER_ADDR": f"{name}-master-0",
        "PET_MASTER_ADDR": f"{name}-master-0",
        "WORLD_SIZE": str(total * int(nproc)),
        "RANK": str(rank),
        "PET_NPROC_PER_NODE": nproc,
        "PET_NODE_RANK": str(rank),
        "PET_NNODES": str(total),
    }


def trainjob_env(job: dict[str, Any], index: int) -> dict[str, str]:
    """What Kubeflow Trainer v2's torch plugin injects (torch.go EnforceMLPolicy): PET_* only."""
    name, trainer = job["metadata"]["name"], job["spec"]["trainer"]
    return {
        "PET_NNODES": str(trainer["numNodes"]),
        "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
        "PET_NODE_RANK": str(index),  # from batch.kubernetes.io/job-completion-index
        "PET_MASTER_ADDR": f"{name}-node-0-0.{name}",  # the JobSet's headless Service
        "PET_MASTER_PORT": "29400",
    }


def trainjob_pod(job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, container) of a TrainJob's node pods: the runtime patch plus spec.trainer."""
    trainer = job["spec"]["trainer"]
    (patch,) = job["spec"]["runtimePatches"]
    (rj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rj["name"] == "node"
    pod_spec = rj["template"]["spec"]["template"]["spec"]
    (cpatch,) = pod_spec["containers"]
    assert cpatch["name"] == "node"
    container = {
        **cpatch,
        "command": trainer["command"],
        "env": trainer.get("env", []),
        "resources": trainer.get("resourcesPerNode", {}),
    }
    return pod_spec, container
