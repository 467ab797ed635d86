"""The typed config tree: strict YAML load, `--set` overrides, resolved dump."""

from recsys.config.root import *  # noqa: F403  (interim: the split into modules follows)
