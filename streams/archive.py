"""The event archive: what the workers committed, drained from Redis into Parquet files by hour.

Layout under ``PRIVADS_DATA/archive``::

    impressions/hour=2026-11-23T14/p{partition}-{first entry id}.parquet   one row per impression (raw JSON kept)
    labels/hour=2026-11-23T14/p{partition}-{first entry id}.parquet        one row per labelled impression

Exactly once: each batch's archive entry is written to the stream ``arch:{p}``
in the same Redis transaction as the state it describes. A drain reads a chunk
of entries, writes every file of the chunk (named by the chunk's first entry
id, under a temporary name, then renamed), and only then trims the stream. A
crash before the trim re-reads a chunk that starts at the same id and rewrites
the same file names, so no row is archived twice or lost.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path

import msgspec
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from infra import keys
from streams.records import Labelled

IMPRESSION_SCHEMA = pa.schema([
    ("event_id", pa.string()), ("ts", pa.float64()), ("user_id", pa.string()), ("ad_id", pa.string()),
    ("position", pa.int32()), ("propensity", pa.float64()), ("policy", pa.string()),
    ("model_version", pa.string()), ("request_id", pa.string()), ("raw", pa.string()),
])
LABEL_SCHEMA = pa.schema([
    ("impression_id", pa.string()), ("user_id", pa.string()), ("ad_id", pa.string()), ("ts", pa.float64()),
    ("clicked", pa.int8()), ("value", pa.float64()), ("policy", pa.string()),
])
_labels = msgspec.msgpack.Decoder(list[Labelled])


def hour_of(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H", time.gmtime(ts))


def _write(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def rows_of(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> tuple[list[dict], list[dict]]:
    """Impression rows and label rows of a chunk of archive entries."""
    imps, labs = [], []
    for _, fields in entries:
        for line in filter(None, fields.get(b"imp", b"").split(b"\n")):
            e = orjson.loads(line)
            imps.append({"event_id": e["event_id"], "ts": e["ts"], "user_id": e["user_id"], "ad_id": e["ad_id"],
                         "position": e["position"], "propensity": e.get("propensity"), "policy": e["policy"],
                         "model_version": e.get("model_version"), "request_id": e["request_id"],
                         "raw": line.decode()})
        if fields.get(b"lab"):
            for lab in _labels.decode(fields[b"lab"]):
                labs.append({"impression_id": lab.impression_id, "user_id": lab.user_id, "ad_id": lab.ad_id,
                             "ts": lab.ts, "clicked": int(lab.clicked), "value": lab.value, "policy": lab.policy})
    return imps, labs


def write_chunk(root: Path, partition: int, first_id: str, entries: list) -> int:
    """Write a chunk's rows into hour files named by ``first_id``; returns the number of rows."""
    imps, labs = rows_of(entries)
    name = f"p{partition}-{first_id}.parquet"
    for kind, rows, schema in (("impressions", imps, IMPRESSION_SCHEMA), ("labels", labs, LABEL_SCHEMA)):
        by_hour: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            by_hour[hour_of(row["ts"])].append(row)
        for hour, hrows in by_hour.items():
            _write(root / kind / f"hour={hour}" / name, pa.Table.from_pylist(hrows, schema=schema))
    return len(imps) + len(labs)


def drain(r: object, root: Path, partition: int, chunk: int = 500) -> int:
    """Move archived entries of one partition from Redis into Parquet; returns rows written.

    ``r`` is a synchronous redis client (the drain runs in a thread).
    """
    stream = keys.archive(partition)
    written = 0
    while True:
        entries = r.xrange(stream, count=chunk)  # type: ignore[attr-defined]
        if not entries:
            return written
        first, last = entries[0][0].decode(), entries[-1][0].decode()
        written += write_chunk(root, partition, first.replace("-", "_"), entries)
        # only now: everything up to `last` is on disk
        r.xtrim(stream, minid=_after(last))  # type: ignore[attr-defined]
        if len(entries) < chunk:
            return written


def _after(entry_id: str) -> str:
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"


def read_table(root: Path, kind: str) -> pa.Table:
    """Every archived row of ``kind`` ("impressions" or "labels") as one table."""
    files = sorted((root / kind).glob("hour=*/*.parquet"))
    schema = IMPRESSION_SCHEMA if kind == "impressions" else LABEL_SCHEMA
    if not files:
        return schema.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=schema) for f in files])
