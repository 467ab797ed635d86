"""The MLflow account the jobs log with, on a server running MLflow's basic-auth app.

The jobs' account is not an admin: it gets EDIT on every experiment and registered model (wildcard
grants: log runs, metrics, artifacts, register model versions) and nothing on users or permissions.
Its name and password are the Secret `mlflow-credentials` the jobs already read; the admin's and the
server's Flask key live in the Secret `mlflow-server`, which only the server and this setup read.
The mlflow-auth component runs it as the Job `mlflow-job-user` (trainer image); by hand:

    MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=… \\
    RECSYS_JOB_MLFLOW_USERNAME=recsys-jobs RECSYS_JOB_MLFLOW_PASSWORD=… \\
      python -m recsys.launch.mlflow_users --tracking-uri http://127.0.0.1:5000

Re-running it is safe: an existing account gets the password given (rotation) and keeps its grants.
"""

from __future__ import annotations

import argparse
import os
import sys

from recsys.errors import UserError, exit_status

#: What the jobs' account may do: EDIT (not MANAGE: no granting to others) on every one of these.
JOB_GRANTS = (("experiment", "EDIT"), ("registered_model", "EDIT"))
JOB_USER_ENV = ("RECSYS_JOB_MLFLOW_USERNAME", "RECSYS_JOB_MLFLOW_PASSWORD")


def ensure_job_user(tracking_uri: str, username: str, password: str) -> str:
    """Create or update the non-admin job account with the admin credentials in the environment
    (MLFLOW_TRACKING_USERNAME/PASSWORD); returns what was done, as one line."""
    from mlflow.server.auth.client import AuthServiceClient

    from recsys.tracking import is_gone, wait_for_server

    if not username or not password:
        raise UserError(
            f"set {JOB_USER_ENV[0]} and {JOB_USER_ENV[1]} (the Secret mlflow-credentials) to the job account"
        )
    if username == os.environ.get("MLFLOW_TRACKING_USERNAME"):
        raise UserError(
            f"{JOB_USER_ENV[0]}={username!r} is the admin account: the jobs need an account of their own"
        )
    wait_for_server(tracking_uri, 300)
    auth = AuthServiceClient(tracking_uri)
    try:
        user = auth.get_user(username)
    except Exception as e:
        if not is_gone(e):
            raise
        user = auth.create_user(username, password)
        done = "created"
    else:
        auth.update_user_password(username, password)
        done = "updated the password of"
    if user.is_admin:
        raise UserError(f"MLflow user {username!r} is an admin; give the jobs a non-admin account")
    for resource, permission in JOB_GRANTS:
        try:
            auth.grant_user_permission(username, resource, "*", permission)
        except Exception as e:
            if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
    grants = ", ".join(f"{p} on every {r}" for r, p in JOB_GRANTS)
    return f"{done} MLflow user {username!r} at {tracking_uri} (not admin; {grants})"


def main(argv: list[str] | None = None) -> int:
    """`python -m recsys.launch.mlflow_users --tracking-uri URI`: set up the job account."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"), required=False)
    args = parser.parse_args(argv)

    def run() -> int:
        if not args.tracking_uri:
            raise UserError("pass --tracking-uri or set MLFLOW_TRACKING_URI")
        user, password = (os.environ.get(k, "") for k in JOB_USER_ENV)
        print(f"recsys: {ensure_job_user(args.tracking_uri, user, password)}", flush=True)
        return 0

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
