"""Regenerates `rollout_pb2.py` / `rollout_pb2_grpc.py` from `rollout.proto` with grpc_tools.

The generated modules are committed (so a plain `pip install` needs no protoc). After editing the
.proto run `python -m clawjax.buffer gen-proto`; tests/test_buffer_proto.py fails while the
committed code and the .proto disagree. grpc_tools is a test/dev dependency, imported lazily.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

PROTO = pathlib.Path(__file__).with_name("rollout.proto")
GENERATED = ("rollout_pb2.py", "rollout_pb2_grpc.py")


def generate() -> dict[str, str]:
    """Runs protoc on `rollout.proto`; returns {file name: generated text} for `GENERATED`.

    The include root is the directory holding the `clawjax` package, so the generated code
    imports `clawjax.buffer.rollout_pb2` (not a top-level `rollout_pb2`)."""
    from grpc_tools import protoc  # dev dependency
    import importlib.resources

    root = PROTO.parent.parent.parent
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as out:
        rel = os.path.relpath(PROTO, root)
        rc = protoc.main(["grpc_tools.protoc", f"-I{root}", f"-I{well_known}",
                          f"--python_out={out}", f"--grpc_python_out={out}", rel])
        if rc != 0:
            raise RuntimeError(f"protoc failed on {PROTO} (exit code {rc})")
        gen_dir = pathlib.Path(out) / pathlib.Path(rel).parent
        return {name: (gen_dir / name).read_text() for name in GENERATED}


def write() -> list[pathlib.Path]:
    """Regenerates and overwrites the committed modules next to the .proto."""
    paths = []
    for name, text in generate().items():
        path = PROTO.with_name(name)
        path.write_text(text)
        paths.append(path)
    return paths
