"""Fault-injection scenarios (`make chaos`): each module exposes SCENARIO and run(workdir) -> dict."""
