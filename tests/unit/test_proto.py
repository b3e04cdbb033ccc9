"""The committed gRPC code is what protoc generates from proto/kvtide.proto today.

A stale ``kvtide_pb2.py`` would silently serve an old schema, so the test regenerates with
the pinned grpcio-tools into a temporary directory and compares byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_tools import protoc

from kvtide.proto import kvtide_pb2

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"
GENERATED = ("kvtide_pb2.py", "kvtide_pb2.pyi", "kvtide_pb2_grpc.py")


def test_generated_code_is_current(tmp_path):
    args = [
        "protoc",
        f"-Ikvtide/proto={PROTO_DIR}",
        f"--python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        "kvtide/proto/kvtide.proto",
    ]
    assert protoc.main(args) == 0
    for name in GENERATED:
        fresh = (tmp_path / "kvtide" / "proto" / name).read_text()
        committed = (PROTO_DIR / name).read_text()
        assert committed == fresh, f"proto/{name} is stale: run `make proto` and commit it"


def test_generated_imports_are_package_qualified():
    # -Ikvtide/proto=proto makes the grpc module import the messages as kvtide.proto.*; a
    # bare `import kvtide_pb2` would only work with proto/ on sys.path.
    grpc_code = (PROTO_DIR / "kvtide_pb2_grpc.py").read_text()
    assert "from kvtide.proto import kvtide_pb2" in grpc_code


@pytest.mark.parametrize("kind", ["stored", "removed", "cleared"])
def test_kv_event_round_trips_through_bytes(kind):
    event = kvtide_pb2.KvEvent(replica_id="r0", event_id=7)
    if kind == "stored":
        event.stored.block_hashes.extend([b"\x01" * 32, b"\x02" * 32])
    elif kind == "removed":
        event.removed.block_hashes.append(b"\x03" * 32)
    else:
        event.cleared.SetInParent()
    back = kvtide_pb2.KvEvent.FromString(event.SerializeToString())
    assert back == event
    assert back.WhichOneof("kind") == kind
