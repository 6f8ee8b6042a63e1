"""Read what an offline W&B run logged, straight from its `run-*.wandb` file (no network, no wandb API).

The file is wandb's LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks
(crc32: 4 bytes, length: 2, type: 1 — FULL=1, FIRST=2, MIDDLE=3, LAST=4), each record a protobuf `Record`.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
FLUSH_WAIT_S = 60  # how long offline_run waits for wandb-core to finish writing a run's file


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"not a wandb log: {path}"
    pos, buf = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        buf = chunk if kind in (FULL, FIRST) else buf + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            try:
                record.ParseFromString(buf)
            except Exception:  # a record still being flushed by wandb's writer: the rest is not there yet
                return
            yield record
            buf = b""


def offline_run(run_dir: Path) -> dict:
    """{'history': [{key: value}], 'group', 'tags', 'project', 'config': {...}} of the one offline run below run_dir."""
    files = sorted(Path(run_dir).rglob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run under {run_dir}, found {files}"
    # wandb.finish() can return before wandb-core has written the file: on a loaded machine it was still its 7-byte
    # header then, and complete 2 s later. The run is whole once its `exit` record is there.
    deadline = time.monotonic() + FLUSH_WAIT_S
    while not any(r.WhichOneof("record_type") == "exit" for r in records(files[0])) and time.monotonic() < deadline:
        time.sleep(0.2)
    out: dict = {"history": [], "config": {}, "summary": {}}
    for r in records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
        elif kind == "run":
            out.update(group=r.run.run_group, tags=list(r.run.tags), project=r.run.project, id=r.run.run_id,
                       name=r.run.display_name)
        elif kind == "config":
            for i in r.config.update:
                out["config"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind == "summary":
            for i in r.summary.update:
                out["summary"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return out
