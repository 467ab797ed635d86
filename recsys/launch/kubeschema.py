"""Strict, field-by-field validation of Kubernetes manifests against the API models shipped in packages.

- core kinds: the kubernetes client's models (openapi_types / attribute_map), then kubernetes-validate's
  offline JSON schemas (strict: additional properties are errors);
- PyTorchJob: kubeflow-training's KubeflowOrgV1PyTorchJob (same generator, same walk);
- TrainJob: kubeflow-trainer-api's TrainerV1alpha1TrainJob (pydantic models);
- Katib Experiment: kubeflow-katib's V1beta1Experiment (same generator); its trialTemplate.trialSpec is
  an untyped object there, so it is validated as the manifest it is (a PyTorchJob);
- SparkApplication: kubeflow-spark-api's SparkV1beta2SparkApplication (pydantic models, as TrainJob),
  plus the operator's enums (type, mode, restartPolicy.type) that the models leave as plain strings;
- InferenceService: kserve's V1beta1InferenceService (same generator); kserve is installed --no-deps,
  so its package __init__ (the model server's imports) is bypassed, see `_kserve_models`.

The clients' own deserialisers ignore unknown keys, and the kubernetes client coerces "5" into 5, so a
typo or a wrong type would slip through them: the walkers here reject both and name the field path.
"""

from __future__ import annotations

import datetime
import types
import typing
from functools import cache
from typing import Any

from recsys.errors import UserError

_KIND_MODELS = {
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "Service"): "V1Service",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("v1", "Secret"): "V1Secret",
    ("v1", "Pod"): "V1Pod",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("networking.k8s.io/v1", "NetworkPolicy"): "V1NetworkPolicy",
    ("batch/v1", "Job"): "V1Job",
    ("batch/v1", "CronJob"): "V1CronJob",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("kubeflow.org/v1", "PyTorchJob"): "KubeflowOrgV1PyTorchJob",
    ("kubeflow.org/v1beta1", "Experiment"): "V1beta1Experiment",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}
#: Kinds whose models come from kserve (a CRD: kubernetes-validate has no schema for it).
_KSERVE_MODELS = {"V1beta1InferenceService"}
TRAINJOB = ("trainer.kubeflow.org/v1alpha1", "TrainJob")
SPARK_APPLICATION = ("sparkoperator.k8s.io/v1beta2", "SparkApplication")
# The Spark Operator CRD's enums (api/v1beta2/sparkapplication_types.go), plain strings in the models.
_SPARK_ENUMS = {
    ("spec", "type"): {"Java", "Scala", "Python", "R"},
    ("spec", "mode"): {"cluster", "client", "in-cluster-client"},
    ("spec", "restartPolicy", "type"): {"Never", "Always", "OnFailure"},
}
_PRIMS: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "date": (str, datetime.date),
    "datetime": (str, datetime.datetime),
}


class ManifestError(UserError):
    """A manifest that does not match its API model; the message lists every bad field path."""


@cache
def _kserve_models() -> Any:
    """kserve.models without running kserve/__init__.py (it imports the model server and its
    dependencies, which a --no-deps install lacks): a bare package module stands in while it loads."""
    import importlib
    import importlib.util
    import sys

    if "kserve" in sys.modules:
        return importlib.import_module("kserve.models")
    spec = importlib.util.find_spec("kserve")
    if spec is None or spec.submodule_search_locations is None:
        raise UserError("validating an InferenceService needs kserve: pip install --no-deps kserve==0.21.0")
    stub = types.ModuleType("kserve")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["kserve"] = stub
    try:
        return importlib.import_module("kserve.models")
    finally:
        del sys.modules["kserve"]  # a later `import kserve` runs the real package


@cache
def _openapi_class(name: str) -> type:
    import kubeflow.training.models as kf
    import kubernetes.client.models as k8s

    cls = getattr(k8s, name, None) or getattr(kf, name, None)
    if cls is None and name.startswith("V1beta1"):
        import kubeflow.katib.models as katib  # only for Katib Experiments (recsys tune --render-katib)

        cls = getattr(katib, name, None)
    if cls is None and name.startswith(("V1beta1", "V1alpha1")):
        cls = getattr(_kserve_models(), name, None)  # no name is both a Katib and a KServe model
    if cls is None:
        raise KeyError(f"no API model named {name}")
    return cls


def _walk_openapi(value: Any, typ: str, path: str, errors: list[str]) -> None:
    """Check `value` against an openapi-generator type string: unknown keys and wrong types are errors."""
    if value is None:
        return
    if typ.startswith("list["):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _walk_openapi(item, typ[5:-1], f"{path}[{i}]", errors)
        return
    if typ.startswith("dict("):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return
        inner = typ[5:-1].split(", ", 1)[1]
        for k, v in value.items():
            if not isinstance(k, str):
                errors.append(f"{path}: key {k!r} is not a string")
            _walk_openapi(v, inner, f"{path}.{k}", errors)
        return
    if typ == "object":
        return
    if typ in _PRIMS:
        # bool is an int in Python; the API server rejects true where an integer is expected.
        if not isinstance(value, _PRIMS[typ]) or (typ != "bool" and isinstance(value, bool)):
            errors.append(f"{path}: expected {typ}, got {type(value).__name__} {value!r}")
        return
    cls = _openapi_class(typ)
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a {typ} mapping, got {type(value).__name__} {value!r}")
        return
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    for key, item in value.items():
        if key not in by_json:
            errors.append(f"{path}.{key}: unknown field (not in {typ})")
            continue
        _walk_openapi(item, cls.openapi_types[by_json[key]], f"{path}.{key}", errors)


def _build_openapi(value: Any, typ: str) -> Any:
    """Construct the model objects of a walked document; their constructors check required fields."""
    if value is None or typ in _PRIMS or typ == "object":
        return value
    if typ.startswith("list["):
        return [_build_openapi(v, typ[5:-1]) for v in value]
    if typ.startswith("dict("):
        return {k: _build_openapi(v, typ[5:-1].split(", ", 1)[1]) for k, v in value.items()}
    cls = _openapi_class(typ)
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    return cls(**{by_json[k]: _build_openapi(v, cls.openapi_types[by_json[k]]) for k, v in value.items()})


def _required_openapi(doc: dict[str, Any], model: str, errors: list[str]) -> None:
    """Build the model with client-side validation on: missing required fields and bad enums raise."""
    if model in _KSERVE_MODELS:
        # kserve's ApiClient resolves only its own classes (not V1ObjectMeta & co.): build directly.
        try:
            _build_openapi(doc, model)
        except (ValueError, TypeError) as e:
            errors.append(f"{model}: {e}")
        return
    if model.startswith("KubeflowOrg"):
        from kubeflow.training.api_client import ApiClient
    elif model.startswith("V1beta1"):
        from kubeflow.katib.api_client import ApiClient
    else:
        from kubernetes.client import ApiClient
    try:
        ApiClient()._ApiClient__deserialize(doc, model)  # type: ignore[attr-defined]
    except (ValueError, TypeError) as e:
        errors.append(f"{model}: {e}")


def _unwrap(annotation: Any) -> list[Any]:
    """The model classes reachable from a pydantic field annotation (through Optional/List/Dict/Union)."""
    origin = typing.get_origin(annotation)
    if origin is None:
        return [annotation]
    out = []
    for arg in typing.get_args(annotation):
        out.extend(_unwrap(arg))
    return out


def _walk_pydantic(value: Any, annotation: Any, path: str, errors: list[str]) -> None:
    """Reject keys that no pydantic model field (by alias) declares, recursively."""
    from pydantic import BaseModel

    if value is None:
        return
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(models) == 1:
            _walk_pydantic(value, models[0], path, errors)
        return
    if origin is list:
        if isinstance(value, list):
            (inner,) = typing.get_args(annotation)
            for i, item in enumerate(value):
                _walk_pydantic(item, inner, f"{path}[{i}]", errors)
        return
    if origin is dict:
        if isinstance(value, dict):
            inner = typing.get_args(annotation)[1]
            for k, item in value.items():
                _walk_pydantic(item, inner, f"{path}.{k}", errors)
        return
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return
    # oneOf wrappers (Quantity, IntOrString) hold a scalar; their from_dict checks it.
    if "actual_instance" in annotation.model_fields or not isinstance(value, dict):
        return
    fields = {(f.alias or name): f for name, f in annotation.model_fields.items()}
    for key, item in value.items():
        if key not in fields:
            errors.append(f"{path}.{key}: unknown field (not in {annotation.__name__})")
            continue
        _walk_pydantic(item, fields[key].annotation, f"{path}.{key}", errors)


def _check_trainjob(doc: dict[str, Any], errors: list[str]) -> None:
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
    from pydantic import ValidationError

    _walk_pydantic(doc, TrainerV1alpha1TrainJob, "TrainJob", errors)
    try:
        TrainerV1alpha1TrainJob.from_dict(doc)
    except (ValidationError, ValueError) as e:
        errors.append(f"TrainJob: {e}")


def _check_sparkapplication(doc: dict[str, Any], errors: list[str]) -> None:
    from kubeflow_spark_api.models import SparkV1beta2SparkApplication
    from pydantic import ValidationError

    _walk_pydantic(doc, SparkV1beta2SparkApplication, "SparkApplication", errors)
    try:
        SparkV1beta2SparkApplication.from_dict(doc)
    except (ValidationError, ValueError) as e:
        errors.append(f"SparkApplication: {e}")
    for path, allowed in _SPARK_ENUMS.items():
        value: Any = doc
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None and value not in allowed:
            errors.append(f"SparkApplication.{'.'.join(path)}: {value!r} is not one of {sorted(allowed)}")


def _check_kubernetes_validate(doc: dict[str, Any], errors: list[str]) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path)
        errors.append(f"kubernetes-validate: {where or '<root>'}: {e.message}")


def validation_errors(doc: dict[str, Any]) -> list[str]:
    """Every problem of one manifest document against its API model(s); [] when it is valid."""
    if not isinstance(doc, dict):
        return [f"<document>: expected a mapping, got {type(doc).__name__}"]
    key = (doc.get("apiVersion"), doc.get("kind"))
    name = f"{key[1]}/{(doc.get('metadata') or {}).get('name', '?')}"
    errors: list[str] = []
    if key == TRAINJOB:
        _check_trainjob(doc, errors)
    elif key == SPARK_APPLICATION:
        _check_sparkapplication(doc, errors)
    elif key in _KIND_MODELS:
        model = _KIND_MODELS[key]  # type: ignore[index]
        _walk_openapi(doc, model, key[1], errors)
        if not errors:
            _required_openapi(doc, model, errors)
        if model == "V1beta1Experiment":
            trial = ((doc.get("spec") or {}).get("trialTemplate") or {}).get("trialSpec")
            if isinstance(trial, dict):
                errors += [f"spec.trialTemplate.trialSpec: {e}" for e in validation_errors(trial)]
        elif not model.startswith("KubeflowOrg") and model not in _KSERVE_MODELS:
            _check_kubernetes_validate(doc, errors)
    else:
        errors.append(f"apiVersion {key[0]!r} kind {key[1]!r}: no API model known to recsys")
    return [f"{name}: {e}" for e in errors]


def validate_documents(docs: list[dict[str, Any]], origin: str) -> None:
    """Raise ManifestError naming `origin` and every bad field when any document is invalid."""
    errors = [e for doc in docs for e in validation_errors(doc)]
    if errors:
        raise ManifestError(f"{origin}: invalid manifest:\n  " + "\n  ".join(errors))
