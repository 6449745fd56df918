"""Logged impressions on disk: ``privads export-logs`` and the readers of ``privads replay``.

An exported log has one row per impression whose label is settled (clicked, or
its attribution window has passed): the impression's fields (README.md, "Events"),
``context`` as an object, ``clicked`` (0/1), ``value`` (the click's value, 0
without one), ``click_ts`` (null unless clicked), and the ``pctr`` and ``factor`` the
impression was served with (null if not logged). ``.jsonl`` and
``.parquet`` are chosen by the file's extension; Parquet stores ``context`` as
a JSON string, so both read back the same with :func:`read_logs`.

The Open Bandit Dataset's CSV layout (``item_id``, ``position`` 1-based,
``click``, ``propensity_score``, ...) reads into the same rows, each its own
request, with the action set taken from ``item_context.csv`` beside it when
present.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from privads.infra import objects
from privads.infra.errors import LogError
from privads.infra.settings import Settings
from privads.learner.offline import Log
from privads.streams import archive

FORMATS = ("jsonl", "parquet", "obd")
EXPORT_SCHEMA = pa.schema([
    ("event_id", pa.string()), ("ts", pa.float64()), ("user_id", pa.string()), ("ad_id", pa.string()),
    ("position", pa.int32()), ("propensity", pa.float64()), ("policy", pa.string()), ("model_version", pa.string()),
    ("request_id", pa.string()), ("context", pa.string()), ("clicked", pa.int8()), ("value", pa.float64()),
    ("click_ts", pa.float64()), ("pctr", pa.float64()), ("factor", pa.float64()),
    ("user_mean", pa.string()), ("user_count", pa.int64()),
])


@dataclass
class Rows:
    """Logged rows as columns (what a reader returns), before they become a :class:`learner.offline.Log`."""

    request_id: list[str]
    user_id: list[str]
    ad_id: list[str]
    position: np.ndarray
    propensity: np.ndarray  # NaN where not logged
    clicked: np.ndarray
    value: np.ndarray
    policy: list[str]
    context: list[dict[str, Any] | None]
    ts: np.ndarray
    actions: list[str] | None = None  # the action set when the format defines one (OBD); else the ads shown
    # the user as served, where the log carries it (PrivAds' exports): records.pack_served text, and its count
    user_mean: list[str | None] | None = None
    user_count: list[int | None] | None = None

    def __len__(self) -> int:
        return len(self.ad_id)

    def take(self, keep: np.ndarray) -> Rows:
        """The rows where ``keep`` (bool, shape (n,)) holds, in order."""
        idx = np.flatnonzero(keep)

        def pick(v: Any) -> Any:
            return None if v is None else v[idx] if isinstance(v, np.ndarray) else [v[i] for i in idx]

        fields: dict[str, Any] = {f: (self.actions if f == "actions" else pick(getattr(self, f)))
                                  for f in self.__dataclass_fields__}
        return Rows(**fields)

    def to_log(self, reward: str = "clicked") -> Log:
        """Index requests and ads; ``reward`` is ``"clicked"`` or ``"value"``."""
        if reward not in ("clicked", "value"):
            raise LogError(f"reward: must be 'clicked' or 'value', got {reward!r}")
        actions = self.actions if self.actions is not None else list(dict.fromkeys(self.ad_id))
        index = {a: i for i, a in enumerate(actions)}
        missing = sorted({a for a in self.ad_id if a not in index})
        if missing:
            raise LogError(f"ad_id: {len(missing)} logged ads are not in the action set (first: {missing[0]!r})")
        requests = {r: i for i, r in enumerate(dict.fromkeys(self.request_id))}
        return Log(np.array([requests[r] for r in self.request_id], dtype=np.int64), self.position.astype(np.int64),
                   np.array([index[a] for a in self.ad_id], dtype=np.int64),
                   (self.clicked if reward == "clicked" else self.value).astype(np.float64),
                   self.propensity.astype(np.float64), list(actions))


# --- export ----------------------------------------------------------------------------------


def settled_rows(root: archive.Root, window_s: float, now: float | None = None) -> list[dict[str, Any]]:
    """The archive's impressions whose label is settled, joined with their clicks, oldest first.

    ``root``: the archive (``infra.objects.archive_of``, or its directory).
    """
    imps = archive.read_table(root, "impressions").to_pylist()
    clicks = {row["impression_id"]: row for row in archive.read_table(root, "labels").to_pylist()}
    now = time.time() if now is None else now
    out = []
    for imp in sorted(imps, key=lambda r: r["ts"]):
        click = clicks.get(imp["event_id"])
        if click is None and imp["ts"] > now - window_s:
            continue  # still inside its attribution window: its label may change
        raw = json.loads(imp["raw"])
        context = raw.get("context")
        out.append({"event_id": imp["event_id"], "ts": imp["ts"], "user_id": imp["user_id"], "ad_id": imp["ad_id"],
                    "position": imp["position"], "propensity": imp["propensity"], "policy": imp["policy"],
                    "model_version": imp["model_version"], "request_id": imp["request_id"], "context": context,
                    "clicked": 0 if click is None else 1,
                    "value": 0.0 if click is None or click["value"] is None else float(click["value"]),
                    "click_ts": None if click is None else click["ts"],
                    # what serving predicted and multiplied in: the stream's update of a replayed impression uses it
                    "pctr": raw.get("pctr"), "factor": raw.get("factor"),
                    # the user as the ranker saw it (records.pack_served): replay re-ranks from it, not from today's
                    "user_mean": imp.get("user_mean"), "user_count": imp.get("user_count")})
    return out


def write_rows(rows: list[dict[str, Any]], out: Path | str, settings: Settings | None = None) -> None:
    """Write exported rows as JSONL or Parquet, by ``out``'s extension, published whole (``infra.objects``).

    ``out`` is a path, or an ``s3://bucket/key`` URL (the credentials from ``settings``).
    """
    fmt = format_of(out)
    if fmt not in ("jsonl", "parquet"):
        raise LogError(f"{out}: export writes .jsonl or .parquet, not {Path(str(out)).suffix or 'no extension'}")
    where, name = objects.at(out, settings)
    if fmt == "jsonl":
        data = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows).encode()
    else:
        cols = {name: [r[name] for r in rows] for name in EXPORT_SCHEMA.names}
        cols["context"] = [None if c is None else json.dumps(c, separators=(",", ":")) for c in cols["context"]]
        data = objects.table_bytes(pa.table(cols, schema=EXPORT_SCHEMA))
    where.put(name, data)


def format_of(path: Path | str) -> str:
    suffix = Path(str(path)).suffix.lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "obd"}.get(
        suffix, suffix.lstrip("."))


# --- readers ---------------------------------------------------------------------------------


def read_logs(path: Path, fmt: str | None = None) -> Rows:
    """Read a log in ``fmt`` (``jsonl``, ``parquet`` or ``obd``; by default from the extension)."""
    path = Path(path)
    fmt = fmt or format_of(path)
    if fmt not in FORMATS:
        raise LogError(f"--format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not path.is_file():
        raise LogError(f"{path}: no such file")
    if fmt == "obd":
        return read_obd(path)
    records = _jsonl(path) if fmt == "jsonl" else _parquet(path)
    if not records:
        raise LogError(f"{path}: no rows")
    return _rows(path, records)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LogError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise LogError(f"{path}:{lineno}: a row must be a JSON object")
            out.append(row)
    return out


def _parquet(path: Path) -> list[dict[str, Any]]:
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowInvalid, OSError) as e:
        raise LogError(f"{path}: not a Parquet file ({e})") from None
    for row in rows:
        if isinstance(row.get("context"), str):
            row["context"] = json.loads(row["context"])
    return rows


def _rows(path: Path, records: list[dict[str, Any]]) -> Rows:
    need = ("ad_id", "position", "request_id", "clicked")
    for i, row in enumerate(records, 1):
        missing = [k for k in need if row.get(k) is None]
        if missing:
            raise LogError(f"{path}: row {i} has no {', '.join(missing)} (is it an exported log?)")

    def prop(v: float | str | None) -> float:  # a JSON number or Parquet double (a string would be converted)
        if v is None:
            return math.nan
        p = float(v)
        if not 0.0 < p <= 1.0:
            raise LogError(f"{path}: propensity must be in (0, 1], got {p}")
        return p

    return Rows(
        request_id=[str(r["request_id"]) for r in records], user_id=[str(r.get("user_id", "")) for r in records],
        ad_id=[str(r["ad_id"]) for r in records],
        position=np.array([int(r["position"]) for r in records], dtype=np.int64),
        propensity=np.array([prop(r.get("propensity")) for r in records]),
        clicked=np.array([float(r["clicked"]) for r in records]),
        value=np.array([float(r.get("value") or 0.0) for r in records]),
        policy=[str(r.get("policy", "")) for r in records], context=[r.get("context") for r in records],
        ts=np.array([float(r.get("ts") or 0.0) for r in records]),
        user_mean=[r.get("user_mean") if isinstance(r.get("user_mean"), str) else None for r in records],
        user_count=[int(c) if isinstance(c := r.get("user_count"), int | float) and c >= 0 else None
                    for r in records])


def read_obd(path: Path) -> Rows:
    """An Open Bandit Dataset CSV (e.g. ``obd/bts/all/all.csv``): one row per impression, positions from 1."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"item_id", "position", "click", "propensity_score"}
        if not need <= set(reader.fieldnames or ()):
            raise LogError(f"{path}: not the Open Bandit Dataset layout (needs columns {sorted(need)})")
        rows = list(reader)
    if not rows:
        raise LogError(f"{path}: no rows")
    items = path.parent / "item_context.csv"
    n_items = None
    if items.is_file():
        with items.open(newline="", encoding="utf-8") as f:
            n_items = len(list(csv.DictReader(f)))
    item = np.array([int(r["item_id"]) for r in rows], dtype=np.int64)
    n_items = max(n_items or 0, int(item.max()) + 1)
    pscore = np.array([float(r["propensity_score"]) for r in rows])
    click = np.array([float(r["click"]) for r in rows])
    return Rows(request_id=[str(i) for i in range(len(rows))], user_id=[""] * len(rows),
                ad_id=[str(i) for i in item], position=np.array([int(r["position"]) for r in rows]) - 1,
                propensity=pscore, clicked=click, value=click, policy=[path.parent.parent.name] * len(rows),
                context=[None] * len(rows), ts=np.zeros(len(rows)), actions=[str(i) for i in range(n_items)])
