"""Build-time check that the image's ML stack loads: run by the Dockerfiles (`RUN python …`).

--full (the CPU image): import torch, fbgemm_gpu and torchrec, and build a tiny EmbeddingBagCollection.
--driverless (the CUDA image, built on a machine without an NVIDIA driver): fbgemm-gpu's CUDA build
dlopens libnvidia-ml.so.1 at import, which only the driver provides at run time, so instead of importing
it: import torch and check it is the CUDA 13 build; check every fbgemm_gpu shared library's dependency
closure resolves (ldd) except the driver's own libraries; byte-compile every torchrec module; check the
pinned versions. The full import then happens on the first GPU node.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.metadata as md
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

PINS = {"torch": "2.14.1", "torchrec": "1.9.2"}
# Provided by the NVIDIA driver on the node (through the container toolkit), never by the image.
DRIVER_LIBS = {"libcuda.so.1", "libnvidia-ml.so.1"}


def _fail(msg: str) -> None:
    print(f"image check FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def check_pins(fbgemm_dist: str) -> None:
    """The installed versions are the pinned ones."""
    for dist, want in {**PINS, fbgemm_dist: "1.9.0"}.items():
        try:
            got = md.version(dist)
        except md.PackageNotFoundError:
            _fail(f"{dist} is not installed ({want} pinned)")
        if got.split("+")[0] != want:
            _fail(f"{dist} {got} installed, {want} pinned")


def full(fbgemm_dist: str) -> None:
    """Import everything and run one EmbeddingBagCollection forward on the CPU."""
    import fbgemm_gpu  # noqa: F401
    import torch
    import torchrec

    check_pins(fbgemm_dist)
    ebc = torchrec.EmbeddingBagCollection(
        tables=[
            torchrec.EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=8, feature_names=["f"])
        ],
        device=torch.device("cpu"),
    )
    kjt = torchrec.KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1])
    )
    out = ebc(kjt).to_dict()["f"]
    if tuple(out.shape) != (2, 4):
        _fail(f"EmbeddingBagCollection output shape {tuple(out.shape)}, expected (2, 4)")
    print(f"image check ok: torch {torch.__version__}, torchrec {torchrec.__version__}, fbgemm_gpu (cpu)")


def driverless(fbgemm_dist: str) -> None:
    """Check the CUDA stack without a driver (see the module docstring)."""
    check_pins(fbgemm_dist)
    import torch

    if not (torch.version.cuda or "").startswith("13."):
        _fail(f"torch {torch.__version__} is not a CUDA 13 build (torch.version.cuda={torch.version.cuda})")
    site = Path(torch.__file__).parents[1]
    lib_dirs = [site / "torch" / "lib", site / "fbgemm_gpu", *sorted(site.glob("nvidia/**/lib"))]
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(str(d) for d in lib_dirs if d.is_dir())}
    libs = sorted((site / "fbgemm_gpu").rglob("*.so"))
    if not libs:
        _fail(f"no shared libraries under {site / 'fbgemm_gpu'}")
    for lib in libs:
        out = subprocess.run(["ldd", str(lib)], env=env, capture_output=True, text=True, check=False).stdout
        missing = {line.split()[0] for line in out.splitlines() if "not found" in line} - DRIVER_LIBS
        if missing:
            _fail(f"{lib.name}: unresolved libraries {sorted(missing)}")
    spec = importlib.util.find_spec("torchrec")
    if spec is None or spec.origin is None:
        _fail("torchrec is not installed")
    pkg = Path(spec.origin).parent
    if not compileall.compile_dir(str(pkg), quiet=2):
        _fail(f"torchrec modules under {pkg} do not compile")
    print(
        f"image check ok: torch {torch.__version__} (CUDA {torch.version.cuda}), {len(libs)} fbgemm_gpu "
        f"libraries resolve without the driver, torchrec {md.version('torchrec')} compiles"
    )


def main() -> None:
    """Run the check selected on the command line."""
    p = argparse.ArgumentParser(description=__doc__)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--full", action="store_true", help="import everything (CPU image)")
    g.add_argument("--driverless", action="store_true", help="CUDA image built without a GPU driver")
    p.add_argument(
        "--fbgemm-dist",
        default=None,
        help="distribution expected (default: fbgemm-gpu-cpu with --full, fbgemm-gpu with --driverless)",
    )
    args = p.parse_args()
    if args.full:
        full(args.fbgemm_dist or "fbgemm-gpu-cpu")
    else:
        driverless(args.fbgemm_dist or "fbgemm-gpu")


if __name__ == "__main__":
    main()
