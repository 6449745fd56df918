"""``privads produce``: JSON-lines events into a topic, validated line by line."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from privads.infra import progress, records
from privads.infra.errors import InvalidEvent
from privads.infra.kafka import make_producer

KEY_FIELD = {records.IMPRESSIONS: "user_id", records.CLICKS: "user_id", records.ADS: "ad_id"}


@dataclass
class Counts:
    produced: int = 0
    invalid: int = 0
    skipped: int = 0  # rows of an exported log that were not clicked (when producing clicks from it)


def click_of_exported_row(line: str) -> str | None:
    """The click event of one exported-log row (``privads export-logs``), or None if that impression was not clicked.

    Its ``event_id`` is derived from the impression's, so producing the same
    export twice is deduplicated like any repeated event. A line that is not an
    exported row is returned unchanged.
    """
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return line
    if not isinstance(row, dict) or "clicked" not in row or "impression_id" in row:
        return line
    if not row["clicked"]:
        return None
    return json.dumps({"event_id": f"{row.get('event_id')}:click", "ts": row.get("click_ts") or row.get("ts"),
                       "impression_id": row.get("event_id"), "user_id": row.get("user_id"),
                       "ad_id": row.get("ad_id"), "value": row.get("value")}, separators=(",", ":"))


def produce_lines(servers: str, topic: str, lines: Iterable[str], report: TextIO = sys.stderr,
                  size: int | None = None) -> Counts:
    """Validate each line as a ``topic`` event and produce the valid ones, keyed per the contract.

    Invalid lines are reported with their line number and skipped; the raw line
    (extra fields included) is what is produced. An exported log
    (``privads export-logs``) can be produced as it is to both topics: as
    impressions, its rows are impressions with extra fields; as clicks, each
    clicked row becomes its click and the others are skipped (counted). ``size``: the input's bytes, if known
    (the progress bar's total).
    """
    if topic not in KEY_FIELD:
        raise ValueError(f"topic must be one of {', '.join(KEY_FIELD)}; got {topic!r}")
    counts = Counts()
    producer = make_producer(servers, linger_ms=20, batch_size=256 * 1024)
    bar = progress.bar(f"produce {topic}", total=size, unit="B", unit_scale=True)
    try:
        for n, line in enumerate(lines, start=1):
            bar.update(len(line.encode("utf-8")))
            if n % 1000 == 0:
                bar.set_postfix(produced=counts.produced, invalid=counts.invalid, refresh=False)
            line = line.strip()
            if not line:
                continue
            if topic == records.CLICKS:
                converted = click_of_exported_row(line)
                if converted is None:
                    counts.skipped += 1
                    continue
                line = converted
            payload = line.encode("utf-8")
            try:
                decoded = records.decode(topic, payload)
            except InvalidEvent as e:
                counts.invalid += 1
                print(f"line {n}: {e}", file=report)
                continue
            key = getattr(decoded.record, KEY_FIELD[topic])
            producer.send(topic, key=key.encode(), value=payload)
            counts.produced += 1
        bar.set_postfix(produced=counts.produced, invalid=counts.invalid, refresh=False)
        producer.flush(timeout=60)
    finally:
        bar.close()
        producer.close(timeout=10)
    return counts


def produce_file(servers: str, topic: str, path: Path | None, report: TextIO = sys.stderr) -> Counts:
    """``produce_lines`` over a file, or stdin when ``path`` is None."""
    if path is None:
        return produce_lines(servers, topic, sys.stdin, report)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with path.open(encoding="utf-8") as f:
        return produce_lines(servers, topic, f, report, size=path.stat().st_size)
