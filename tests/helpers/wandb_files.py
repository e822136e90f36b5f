"""Read an offline W&B run back from its ``run-*.wandb`` file, so tests can check what a user
would see after ``wandb sync``: the run's name, tags and group, its config, its metric
definitions, its history and its summary.

Offline runs write no ``wandb-summary.json`` or ``config.yaml`` (wandb issue 9646), and wandb
>= 0.19 no longer ships a Python reader, so this reads the file's format itself: LevelDB's log
format (32 KiB blocks of records with a 7-byte header: crc32c, length, type), after a 7-byte
file header (``:W&B``, magic 0xBEE1, version), each record a ``wandb_internal_pb2.Record``.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    """Every Record of a ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


class OfflineRun:
    """What one offline run logged: ``run`` (name, tags, group, ...), ``config`` (key -> value)
    and ``config_updates`` (key -> how many times it was set), ``metrics`` (define_metric
    records), ``history`` (one dict per row), ``summary`` and ``artifacts``."""

    def __init__(self, run_dir: str | Path) -> None:
        files = list(Path(run_dir).glob("run-*.wandb"))
        assert len(files) == 1, f"expected one run-*.wandb in {run_dir}, found {files}"
        self.run, self.config, self.metrics, self.history, self.summary = None, {}, [], [], {}
        self.config_updates: dict[str, int] = {}
        self.artifacts = []
        for record in records(files[0]):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.run = record.run
                self._config(record.run.config)
            elif kind == "config":
                self._config(record.config)
            elif kind == "artifact":
                self.artifacts.append(record.artifact)
            elif kind == "metric":
                self.metrics.append(record.metric)
            elif kind == "history":
                self.history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                     for item in record.history.item})
            elif kind == "summary":
                for item in record.summary.update:
                    self.summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)

    def _config(self, config) -> None:
        for item in config.update:
            key = item.key or "/".join(item.nested_key)
            self.config[key] = json.loads(item.value_json)
            self.config_updates[key] = self.config_updates.get(key, 0) + 1
