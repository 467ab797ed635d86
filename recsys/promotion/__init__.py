"""Continuous training's last steps: score a candidate run and the registered champion on a new data
window (`window_eval`), move MLflow Model Registry aliases (`registry`), decide and rebuild what is
served (`gate`), and run it all on a schedule (`schedule`: a KFP recurring run, a Kubernetes CronJob)."""
