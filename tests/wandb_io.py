"""Reading a real offline wandb run back in tests (what ``wandb sync`` would upload)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def read_offline_records(out_dir: Path, timeout_s: float = 30.0) -> list[Any]:
    """Every record of the one offline run under ``out_dir``, once its ``exit`` record is there:
    ``wandb.finish()`` can return before wandb-core has flushed the run file (seen: 1 read in 8 found only the
    7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    (path,) = Path(out_dir).glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        store = datastore.DataStore()
        store.open_for_scan(str(path))
        records = []
        while (data := store.scan_data()) is not None:
            rec = pb.Record()
            rec.ParseFromString(data)
            records.append(rec)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)
