"""Read an offline wandb run (`<run>/wandb/offline-run-*/run-<id>.wandb`) back for the tests.

wandb >= 0.18 dropped its Python reader of these files (the Go `wandb-core` writes and reads
them), so this reads the documented framing itself and decodes every record with wandb's own
protobuf schema (`wandb.proto.wandb_internal_pb2.Record`): a 7-byte header (`:W&B`, magic
0xBEE1, version 0), then LevelDB-log blocks of 32 KiB holding chunks of (crc32c, length, type).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
CHUNK_HEADER = 7  # crc32c (4), length (2, little-endian), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    """Every `Record` in a `.wandb` file, in the order written."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a wandb run file"
    out, pending, pos = [], b"", 7
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # block trailer: zero padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER])
        if kind == 0 and length == 0:
            break  # zero fill after the last record
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


@dataclass
class OfflineRun:
    """What a run logged: its config, history rows (one per `log` call), summary, metric
    definitions (`define_metric`, by name or glob) and artifacts, in the order logged."""

    run_id: str
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    artifacts: list[dict[str, Any]] = field(default_factory=list)


def read_offline_run(run_file: Path) -> OfflineRun:
    """Decode a `.wandb` file into config, history, summary, metric definitions and artifacts
    (values JSON-decoded; a metric definition as protobuf's JSON form, e.g. `{"stepMetric":
    "epoch", "summary": {"min": true}}`; an artifact's files as `files`)."""
    from google.protobuf.json_format import MessageToDict

    def key(item: Any) -> str:
        return item.key or "/".join(item.nested_key)

    run = OfflineRun(run_id="")
    for record in records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.group = record.run.run_id, record.run.run_group
            run.tags = list(record.run.tags)
            run.config.update({key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run.config.update({key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run.history.append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary.update({key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "files":
            run.files.extend(f.path for f in record.files.files)
        elif kind == "metric":
            name = record.metric.name or record.metric.glob_name
            run.metrics[name] = MessageToDict(record.metric)
        elif kind == "artifact":
            art = record.artifact
            run.artifacts.append(
                {
                    "name": art.name,
                    "type": art.type,
                    "aliases": list(art.aliases),
                    "metadata": json.loads(art.metadata or "{}"),
                    "files": [entry.path for entry in art.manifest.contents],
                }
            )
    return run
