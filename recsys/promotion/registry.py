"""MLflow Model Registry aliases: `models:/NAME@ALIAS` URIs, looked up and moved through MlflowClient.

The promotion decision lives in aliases only: `champion` (what is served), `challenger` (the newest
candidate the gate looked at) and `previous` (the champion before the current one: the rollback).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from recsys.errors import UserError

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[A-Za-z0-9_\-]+)$")
_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>[0-9]+)$")


def parse_alias_uri(uri: str) -> tuple[str, str] | None:
    """(name, alias) of `models:/NAME@ALIAS`; None for anything else."""
    m = _ALIAS_URI.match(uri)
    return (m["name"], m["alias"]) if m else None


def parse_version_uri(uri: str) -> tuple[str, str] | None:
    """(name, version number) of `models:/NAME/VERSION`; None for anything else."""
    m = _VERSION_URI.match(uri)
    return (m["name"], m["version"]) if m else None


@dataclass
class RegisteredVersion:
    """One registered model version as the gate and serving use it."""

    name: str
    version: str
    run_id: str | None  # the training run that logged it
    aliases: list[str]


def _as_registered(v: Any) -> RegisteredVersion:
    return RegisteredVersion(v.name, str(v.version), v.run_id, list(v.aliases or []))


def version_by_alias(client: Any, name: str, alias: str) -> RegisteredVersion | None:
    """The version of `name` holding `alias`; None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return _as_registered(client.get_model_version_by_alias(name, alias))
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def resolve_alias(uri: str, tracking_uri: str) -> RegisteredVersion:
    """The version `models:/NAME@ALIAS` points at, or a UserError naming what is missing."""
    import mlflow

    parsed = parse_alias_uri(uri)
    if parsed is None:
        raise UserError(f"{uri!r}: expected models:/NAME@ALIAS (e.g. models:/recsys-two-tower@champion)")
    version = version_by_alias(mlflow.MlflowClient(tracking_uri), *parsed)
    if version is None:
        raise UserError(
            f"{uri}: no version of registered model {parsed[0]!r} has alias {parsed[1]!r} in {tracking_uri}; "
            "promote a run first (`recsys promote`)"
        )
    return version


def resolve_version(uri: str, tracking_uri: str) -> RegisteredVersion:
    """The version `models:/NAME/VERSION` names, or the one `models:/NAME@ALIAS` points at; a UserError
    naming what is missing."""
    import mlflow
    from mlflow.exceptions import MlflowException

    parsed = parse_version_uri(uri)
    if parsed is None:
        return resolve_alias(uri, tracking_uri)
    try:
        return _as_registered(mlflow.MlflowClient(tracking_uri).get_model_version(*parsed))
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise
    raise UserError(
        f"{uri}: registered model {parsed[0]!r} has no version {parsed[1]} in {tracking_uri}; use a "
        "version `recsys serve build` printed (registered as NAME version N)"
    )


def run_of(run_or_alias: str, tracking_uri: str) -> str:
    """A run id as given, or the training run of the version `models:/NAME@ALIAS` points at."""
    if not run_or_alias.startswith("models:/"):
        return run_or_alias
    version = resolve_alias(run_or_alias, tracking_uri)
    if not version.run_id:
        raise UserError(f"{run_or_alias}: version {version.version} was not logged from a run")
    return version.run_id


def storage_location(uri: str, tracking_uri: str) -> str:
    """Where the files of the version `models:/NAME@ALIAS` or `models:/NAME/VERSION` are stored (what
    KServe downloads)."""
    import mlflow

    version = resolve_version(uri, tracking_uri)
    return str(
        mlflow.MlflowClient(tracking_uri).get_model_version_download_uri(version.name, version.version)
    )


def move_aliases(client: Any, name: str, new: str, old: RegisteredVersion | None, promoted: bool) -> None:
    """Candidate version `new` becomes challenger; promoted, also champion, and `old` becomes previous."""
    client.set_registered_model_alias(name, CHALLENGER, new)
    if not promoted:
        return
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS, old.version)
    client.set_registered_model_alias(name, CHAMPION, new)
