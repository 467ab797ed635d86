"""`recsys chaos` / `make chaos`: inject faults into real runs on this machine, one row per scenario.

Each scenario is a module `recsys/chaos/<name>.py` with `SCENARIO: str` (a one-line name) and
`run(workdir: pathlib.Path) -> dict` returning `scenario`, `injected`, `survived` (bool), `lost` (e.g.
"nothing", "12 steps of metrics"), `recover_s` (float | None) and `detail`. The runner gives each a
fresh temporary folder, prints the table and a summary line, and exits 1 when one did not survive.
"""

from __future__ import annotations

import importlib
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

#: Scenario modules in the order they run (recsys.chaos.<name>).
REGISTRY: list[str] = [
    "preempt",
    "disk_full",
    "corrupt_checkpoint",
    "frozen_peer",
    "shm_collision",
    "mlflow_down",
    "serve_requests",
]

KEYS = ("scenario", "injected", "survived", "lost", "recover_s", "detail")


def run_scenario(name: str, keep: bool = False) -> dict[str, Any]:
    """Run scenario `name` in a fresh temporary folder; a crash of the scenario itself is a failed row."""
    module = importlib.import_module(f"recsys.chaos.{name}")
    workdir = Path(tempfile.mkdtemp(prefix=f"recsys-chaos-{name}-"))
    t0 = time.monotonic()
    try:
        row = dict(module.run(workdir))
    except Exception as e:
        row = {
            "scenario": getattr(module, "SCENARIO", name),
            "injected": "?",
            "survived": False,
            "lost": "unknown",
            "recover_s": None,
            "detail": f"the scenario itself failed: {type(e).__name__}: {e}\n{traceback.format_exc()}",
        }
    missing = [k for k in KEYS if k not in row]
    if missing:
        row = {**{k: None for k in KEYS}, **row, "survived": False, "detail": f"row lacks {missing}"}
    row["name"], row["seconds"] = name, time.monotonic() - t0
    if not keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        row["workdir"] = str(workdir)
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width table (scenario, injected, result, lost, recover) plus details."""
    head = f"{'scenario':<34} {'injected':<46} {'result':<9} {'lost':<30} {'recover':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        rec = f"{r['recover_s']:.1f} s" if isinstance(r.get("recover_s"), int | float) else "-"
        result = "survived" if r["survived"] else "FAILED"
        lines.append(
            f"{str(r['scenario'])[:34]:<34} {str(r['injected'])[:46]:<46} {result:<9} "
            f"{str(r['lost'])[:30]:<30} {rec:>8}"
        )
    lines.append("")
    lines += [f"[{r['name']}] {r['detail']}" for r in rows]
    return "\n".join(lines)


def main(only: list[str] | None = None, keep: bool = False) -> int:
    """Run the registered scenarios (or `only`), print the table; 0 when every one survived."""
    names = only or REGISTRY
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        from recsys.errors import UserError

        raise UserError(
            f"recsys chaos --only {', '.join(unknown)}: unknown scenario (known: {', '.join(REGISTRY)})"
        )
    rows = []
    for name in names:
        print(f"recsys chaos: running {name} ...", flush=True)
        rows.append(run_scenario(name, keep))
        r = rows[-1]
        print(
            f"recsys chaos: {name}: {'survived' if r['survived'] else 'FAILED'} ({r['seconds']:.0f} s)",
            flush=True,
        )
    print(format_table(rows))
    failed = [r["name"] for r in rows if not r["survived"]]
    total = sum(r["seconds"] for r in rows)
    print(
        f"recsys chaos: {len(rows) - len(failed)}/{len(rows)} survived in {total:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    return 1 if failed else 0
