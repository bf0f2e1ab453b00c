"""Build an FP16 TensorRT engine (``model.plan``) from the exported ONNX, on a GPU machine.

``python -m export.tensorrt [--onnx model_repository/palm/1/model.onnx] [--out .../model.plan]`` uses the
TensorRT Python API when ``tensorrt`` imports, otherwise ``trtexec`` from ``PATH``. The optimisation
profile for ``images`` is ``min 1, opt 16, max 32`` tiles of ``3x512x512`` (the batch sizes
``model_repository/palm/configs/tensorrt.pbtxt`` serves). An engine is specific to the GPU and TensorRT
version it was built with, so it is built where it is served and never committed.

Exit status: 0 built, 1 build failed, 3 skipped because neither TensorRT nor a CUDA device is present
(a clear one-line message says so).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXIT_SKIPPED = 3
PROFILE = {"min": 1, "opt": 16, "max": 32}
SHAPE = "3x512x512"


def _cuda_device() -> bool:
    """True when the NVIDIA driver reports at least one GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    probe = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False)
    return probe.returncode == 0 and "GPU" in probe.stdout


def build_with_api(trt: Any, onnx_path: Path, plan_path: Path, workspace_gib: float) -> None:
    """Build with the TensorRT Python API (TensorRT 8.6 or 10).

    Raises:
        RuntimeError: when parsing or building fails (parser errors are included).
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # implicit in TensorRT 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    dims = [int(d) for d in SHAPE.split("x")]
    profile.set_shape("images", *[(PROFILE[k], *dims) for k in ("min", "opt", "max")])
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError("TensorRT build_serialized_network returned no engine")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(engine))


def build_with_trtexec(trtexec: str, onnx_path: Path, plan_path: Path, workspace_gib: float) -> None:
    """Build with ``trtexec``.

    Raises:
        RuntimeError: when trtexec exits non-zero (its last output lines are included).
    """
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    shapes = {k: f"images:{v}x{SHAPE}" for k, v in PROFILE.items()}
    cmd = [
        trtexec,
        f"--onnx={onnx_path}",
        f"--saveEngine={plan_path}",
        "--fp16",
        f"--minShapes={shapes['min']}",
        f"--optShapes={shapes['opt']}",
        f"--maxShapes={shapes['max']}",
        f"--memPoolSize=workspace:{int(workspace_gib * 1024)}M",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise RuntimeError(f"trtexec failed ({proc.returncode}):\n{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (exit status in the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m export.tensorrt", description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, default=Path("model_repository/palm/1/model.onnx"))
    parser.add_argument("--out", type=Path, default=Path("model_repository/palm/1/model.plan"))
    parser.add_argument("--workspace-gib", type=float, default=4.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        trt: Any = importlib.import_module("tensorrt")
    except ImportError:
        trt = None
    trtexec = shutil.which("trtexec")
    if (trt is None and trtexec is None) or not _cuda_device():
        missing = []
        if trt is None and trtexec is None:
            missing.append("no tensorrt Python module and no trtexec on PATH")
        if not _cuda_device():
            missing.append("no CUDA device")
        print(f"export.tensorrt: skipped, TensorRT engine not built ({'; '.join(missing)})", file=sys.stderr)
        return EXIT_SKIPPED
    try:
        if trt is not None:
            build_with_api(trt, args.onnx, args.out, args.workspace_gib)
        else:
            assert trtexec is not None
            build_with_trtexec(trtexec, args.onnx, args.out, args.workspace_gib)
    except RuntimeError as exc:
        print(f"export.tensorrt: build failed: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, FP16, profile {PROFILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
