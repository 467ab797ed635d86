"""The demo (and bench) reuse a prepared folder only when it was prepared with the same data settings."""

from __future__ import annotations

from pathlib import Path

from recsys.config import load_config
from recsys.data.metadata import data_settings, read_metadata
from recsys.demo import ensure_prepared

TINY = ["data.source.num_users=60", "data.source.num_items=40", "data.source.interactions_per_user=6"]


def test_reuse_needs_the_same_data_settings(tmp_path: Path) -> None:
    sets = [*TINY, f"data.prepared_dir={tmp_path / 'tt'}"]
    cfg = load_config("two_tower_synth", sets)
    assert ensure_prepared(cfg).endswith(": prepared")
    assert read_metadata(cfg.data.prepared_dir).settings == data_settings(cfg)

    # Same name, same content settings (a loader-only knob differs): reused.
    assert "reused" in ensure_prepared(load_config("two_tower_synth", [*sets, "data.num_workers=1"]))

    # Same name, different data: the old folder must not be reused.
    changed = load_config("two_tower_synth", [*sets, "data.source.num_users=80"])
    assert "re-prepared" in ensure_prepared(changed)
    meta = read_metadata(changed.data.prepared_dir)
    assert meta.settings == data_settings(changed) and meta.settings["source"]["num_users"] == 80
