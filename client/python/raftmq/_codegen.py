"""Generates the gRPC stubs into ``raftmq/_gen/`` from the repository's ``proto/``.

Why generated, not committed: ``proto/`` is the whole wire contract, and stubs
generated from it cannot drift from it. Only generation needs grpcio-tools; the
client itself needs grpcio and protobuf alone.

Why the imports are rewritten: protoc names modules after the proto package, so
``messaging_pb2_grpc.py`` says ``from raftmq.v1 import messaging_pb2``. That
absolute ``raftmq`` would resolve to *this* package (whose name is also
``raftmq``), not to the generated tree. So the tree goes under ``raftmq/_gen/``
and every import of a generated module is rewritten to a relative one, which
works whatever the outer package is called and needs no ``sys.path`` edits.

This file uses only the standard library (and grpc_tools inside ``generate``),
so it runs as a script without importing the package:

    python raftmq/_codegen.py            # what generate.sh does
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
GEN_DIR = PACKAGE_DIR / "_gen"
#: proto/proto of the repository (client/python/raftmq -> repository root).
PROTO_ROOT = Path(os.environ.get("RAFTMQ_PROTO_DIR") or PACKAGE_DIR.parents[2] / "proto" / "proto")
#: The client-facing API only; raftmq/raft/v1 is the brokers' internal Raft RPC.
PROTO_GLOB = "raftmq/v1/*.proto"
#: Content hash of the sources the tree was generated from.
STAMP = GEN_DIR / "SOURCES.sha256"
#: Written last: its presence means the tree is complete.
MARKER = "raftmq/v1/messaging_pb2_grpc.py"

_IMPORT = re.compile(r"^(\s*)from ((?:[A-Za-z_]\w*)(?:\.[A-Za-z_]\w*)*) import ", re.M)
_MODULE_NAME = re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, )'[\w.]+'(, _globals\))")
_ABS_IMPORT = re.compile(r"^\s*import ((?:[A-Za-z_]\w*)(?:\.[A-Za-z_]\w*)*)", re.M)


def proto_files() -> list[Path]:
    """The .proto files the stubs come from, relative to PROTO_ROOT, sorted."""
    return sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.glob(PROTO_GLOB))


def source_hash() -> str | None:
    """sha256 over the proto sources and this generator; None without a proto/ tree."""
    files = proto_files() if PROTO_ROOT.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    # This file too: a change in how stubs are generated regenerates them.
    h.update(Path(__file__).read_bytes() + b"\0")
    for rel in files:
        h.update(str(rel).encode() + b"\0" + (PROTO_ROOT / rel).read_bytes() + b"\0")
    return h.hexdigest()


def is_current() -> bool:
    """True when the generated tree is complete and matches proto/ (or proto/ is absent)."""
    if not (GEN_DIR / MARKER).is_file():
        return False
    want = source_hash()
    if want is None:  # installed without the repository: use what was generated
        return True
    return STAMP.is_file() and STAMP.read_text().strip() == want


def _rewrite(text: str, rel: Path, generated_roots: set[str]) -> str:
    """Turns imports of generated modules into relative ones (see module docs)."""
    up = "." * len(rel.parts)  # from raftmq/_gen/a/b/x.py, "..." is raftmq/_gen

    def fix(m: re.Match) -> str:
        module = m.group(2)
        if module.split(".")[0] in generated_roots:
            return f"{m.group(1)}from {up}{module} import "
        return m.group(0)

    text = _IMPORT.sub(fix, text)
    # Messages' __module__ (used by pickle and repr) must name the module where
    # they really live, not the protoc-side "raftmq.v1.messaging_pb2".
    text = _MODULE_NAME.sub(r"\1__name__\2", text)
    for m in _ABS_IMPORT.finditer(text):
        if m.group(1).split(".")[0] in generated_roots:
            raise RuntimeError(f"{rel}: cannot rewrite absolute import {m.group(0).strip()!r}")
    return text


def generate() -> Path:
    """Runs protoc (grpcio-tools) over proto/ and installs the result in GEN_DIR.

    Generates into a temporary directory, rewrites the imports, then replaces
    files one by one with os.replace (the marker file last), so a concurrent
    importer sees either the old complete tree or the new one.
    """
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("generating the stubs needs grpcio-tools (pip install grpcio-tools)") from e

    files = proto_files() if PROTO_ROOT.is_dir() else []
    if not files:
        raise RuntimeError(f"no {PROTO_GLOB} under {PROTO_ROOT}; set RAFTMQ_PROTO_DIR to the repository's proto/proto")
    digest = source_hash()
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="raftmq-gen-") as tmp:
        out = Path(tmp)
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *(str(f) for f in files),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed: " + " ".join(args))
        generated = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
        roots = {p.parts[0] for p in generated if len(p.parts) > 1}
        staged: dict[Path, str] = {}
        for rel in generated:
            staged[rel] = _rewrite((out / rel).read_text(), rel, roots)
        # Every directory becomes a regular package, so relative imports work.
        packages = {Path()} | {d for rel in generated for d in rel.parents}
        for d in packages:
            staged.setdefault(d / "__init__.py", "")
        staged[Path(STAMP.name)] = f"{digest}\n"

        marker = Path(MARKER)
        if marker not in staged:
            raise RuntimeError(f"protoc did not produce {MARKER}")
        order = sorted(staged, key=lambda p: (p == marker, p == Path(STAMP.name), str(p)))
        for rel in order:
            dest = GEN_DIR / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_path = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
            with os.fdopen(fd, "w") as f:
                f.write(staged[rel])
            os.chmod(tmp_path, 0o644)  # mkstemp makes 0600; others may import these
            os.replace(tmp_path, dest)
        # Drop modules of .proto files that no longer exist.
        for old in [p for p in GEN_DIR.rglob("*") if p.is_file()]:
            rel = old.relative_to(GEN_DIR)
            if rel not in staged and "__pycache__" not in rel.parts:
                old.unlink()
        for cache in GEN_DIR.rglob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)
    return GEN_DIR


def ensure_generated() -> None:
    """Called on import: (re)generates when the tree is missing or stale.

    Stale but no grpcio-tools: keeps the old tree, with a warning, rather than
    refusing to start. Missing and no grpcio-tools: a clear ImportError.
    """
    if is_current():
        return
    try:
        import grpc_tools  # noqa: F401
    except ImportError:
        if (GEN_DIR / MARKER).is_file():
            import warnings

            warnings.warn(
                f"raftmq: stubs in {GEN_DIR} are older than {PROTO_ROOT}; run client/python/generate.sh",
                stacklevel=3,
            )
            return
        raise ImportError(
            f"raftmq: no generated stubs in {GEN_DIR}. Run client/python/generate.sh "
            "(needs grpcio-tools), or install grpcio-tools to generate them on import."
        ) from None
    generate()


if __name__ == "__main__":
    path = generate()
    print(f"raftmq: stubs generated from {PROTO_ROOT} into {path}")
    sys.exit(0)
