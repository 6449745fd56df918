"""The archive on a full disk (README: Resource limits): nothing partial is visible, nothing committed is lost or
doubled, the failure is logged once, and the drain recovers once there is room.

* a real worker whose archive directory is a 2 MiB tmpfs, filled before any event arrives (skipped, saying why,
  where mounting is not permitted);
* the drain's failure handling (``streams.archive.Drainer``) on a directory it cannot write into, without a mount.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import msgspec
import pytest
import redis

from conftest import Infra, start_api, start_worker, stopping, wait_until
from helpers import click, impression, produce, sample_ads
from privads.infra import keys, records
from privads.infra.processes import free_port
from privads.infra.records import Labelled
from privads.infra.settings import Settings
from privads.streams import archive

pytestmark = pytest.mark.integration
ADS = sample_ads(["gaming"], per_category=4)


def fill(directory: Path) -> Path:
    """Write one file into ``directory`` until the disk refuses more; returns it."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def visible(root: Path) -> list[Path]:
    return sorted(root.glob("*/hour=*/*.parquet"))


def leftovers(root: Path) -> list[Path]:
    return sorted(root.glob("*/hour=*/.*.tmp"))


def metric(text: str, name: str) -> float:
    return float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith(name + " ")))


@pytest.fixture()
def full_disk(infra: Infra) -> Path:
    """The module's archive directory on a 2 MiB tmpfs; unmounted (and the mount point removed) afterwards."""
    root = infra.data / "archive"
    root.mkdir(parents=True, exist_ok=False)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        root.rmdir()
        pytest.skip(f"cannot mount a tmpfs here (root and CAP_SYS_ADMIN needed): {mounted.stderr.strip()}")
    try:
        yield root
    finally:
        if subprocess.run(["umount", str(root)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(root)], capture_output=True)  # busy: detach it now, freed on close
        shutil.rmtree(root, ignore_errors=True)


def test_a_full_archive_disk_keeps_the_batches_in_redis_and_drains_them_once_there_is_room(
        infra: Infra, rds: redis.Redis, full_disk: Path) -> None:
    settings = Settings(kafka=infra.kafka, redis=infra.redis_url, data=infra.data, partitions=2, catalog=None,
                        seed=8, control_share=0.0, archive_every_s=0.5, api=f"http://127.0.0.1:{free_port()}")
    root = full_disk
    filler = fill(root)
    imps = [impression(f"d{i % 30}", ADS[i % len(ADS)]["ad_id"]) for i in range(300)]
    clicks = [click(i) for i in imps[::5]]
    with stopping() as procs:
        procs.append(start_worker(settings, rds))
        procs.append(start_api(settings))
        produce(infra.kafka, records.ADS, [(a["ad_id"], a) for a in ADS])
        wait_until(lambda: rds.scard(keys.ADS) == len(ADS), 60, "the catalog")
        produce(infra.kafka, records.IMPRESSIONS, [(i["user_id"], i) for i in imps])
        produce(infra.kafka, records.CLICKS, [(c["user_id"], c) for c in clicks])
        wait_until(lambda: int(rds.hget(keys.STATS, "labelled_clicks") or 0) == len(clicks), 60,
                   "every click learned (committed to Redis)")
        time.sleep(4)  # drain attempts at 0.5 s, then backing off: 1, 2, 4 s

        # nothing on disk, nothing trimmed, nothing half-written left behind; said once
        assert visible(root) == [] and leftovers(root) == []
        waiting = sum(rds.xlen(keys.archive(p)) for p in range(settings.partitions))
        assert waiting > 0, "the failed drain trimmed entries it did not write"
        log = (settings.local / "logs" / "worker.log").read_text(errors="replace")
        assert log.count("archive: cannot drain") == 1, log[-3000:]
        assert "No space left on device" in log
        text = httpx_get(settings, "/metrics")
        assert metric(text, "privads_archive_oldest_pending_seconds") > 2

        # room again: every committed event lands, once
        filler.unlink()
        wait_until(lambda: sum(rds.xlen(keys.archive(p)) for p in range(settings.partitions)) == 0, 30,
                   "the drain to catch up once the disk has room")
        worker_log = settings.local / "logs" / "worker.log"
        log = wait_until(lambda: (t := worker_log.read_text(errors="replace")).count("archive: drained again") and t,
                         10, "the recovery to be logged (just after the trim the test saw)")
        assert log.count("archive: cannot drain") == 1 and log.count("archive: drained again") == 1, log[-3000:]
        assert metric(httpx_get(settings, "/metrics"), "privads_archive_oldest_pending_seconds") == 0
    got = sorted(archive.read_table(root, "impressions").column("event_id").to_pylist())
    assert got == sorted(i["event_id"] for i in imps)  # each once: none lost, none twice
    labels = archive.read_table(root, "labels").to_pylist()
    assert sorted(x["impression_id"] for x in labels) == sorted(c["impression_id"] for c in clicks)
    assert all(x["clicked"] == 1 for x in labels) and leftovers(root) == []


def httpx_get(settings: Settings, path: str) -> str:
    import httpx

    return httpx.get(settings.api + path, timeout=10).text


# --- the drain's failure handling, without a mount --------------------------------------------------


def add_entry(r: redis.Redis, partition: int, imps: list[dict], labels: list[Labelled]) -> None:
    r.xadd(keys.archive(partition), {b"imp": b"\n".join(json.dumps(i).encode() for i in imps),
                                     b"lab": msgspec.msgpack.encode(labels)})


def test_a_drain_that_cannot_write_trims_nothing_shows_nothing_logs_once_and_recovers(
        rds: redis.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = 9
    imps = [impression(f"w{i}", "a1", event_id=f"w{i}") for i in range(20)]
    labels = [Labelled(impression_id=i["event_id"], user_id=i["user_id"], ad_id="a1", ts=i["ts"], clicked=True,
                       policy="treatment") for i in imps[:5]]
    add_entry(rds, p, imps[:10], labels)
    add_entry(rds, p, imps[10:], [])
    root = tmp_path / "archive"
    root.mkdir()
    (root / "labels").write_text("not a directory")  # the impressions' files can be written, the labels' cannot
    drainer = archive.Drainer(root, every_s=60.0, owner="test")
    caplog.set_level(logging.INFO, logger="privads.streams.archive")

    assert drainer.run(rds, [p]) == 0
    # the chunk's impressions were written under temporary names, then removed with the labels' failure
    assert visible(root) == [] and list((root / "impressions").rglob("*")) == list(
        (root / "impressions").glob("hour=*"))
    assert rds.xlen(keys.archive(p)) == 2 and not rds.exists(f"archlock:{p}")
    assert drainer.failures == 1 and "NotADirectoryError" in (drainer.error or "")
    assert drainer.run(rds, [p]) == 0 and drainer.failures == 1  # backing off: not even tried
    assert drainer.run(rds, [p], force=True) == 0 and drainer.failures == 2  # tried again, and not logged again
    said = [r for r in caplog.records if r.name == "privads.streams.archive"]
    assert [r.levelno for r in said] == [logging.ERROR] and "cannot drain" in said[0].getMessage()

    (root / "labels").unlink()
    assert drainer.run(rds, [p], force=True) == len(imps) + len(labels)
    assert rds.xlen(keys.archive(p)) == 0 and drainer.failures == 0 and drainer.error is None
    said = [r for r in caplog.records if r.name == "privads.streams.archive"]
    assert len(said) == 2 and "drained again" in said[1].getMessage() and "2 failed attempts" in said[1].getMessage()
    assert sorted(archive.read_table(root, "impressions").column("event_id").to_pylist()) == sorted(
        i["event_id"] for i in imps)
    assert sorted(archive.read_table(root, "labels").column("impression_id").to_pylist()) == [f"w{i}" for i in
                                                                                               range(5)]
    assert leftovers(root) == []


def test_a_killed_writers_temporary_files_are_swept_at_the_first_drain(rds: redis.Redis, tmp_path: Path) -> None:
    hour = tmp_path / "impressions" / "hour=2026-01-01T00"
    hour.mkdir(parents=True)
    stale, fresh = hour / ".p0-1_0.parquet.aaaa.tmp", hour / ".p0-2_0.parquet.bbbb.tmp"
    stale.write_bytes(b"half a file")
    fresh.write_bytes(b"being written now")
    old = time.time() - archive.Drainer.TMP_AGE_S - 60
    os.utime(stale, (old, old))
    archive.Drainer(tmp_path, 1.0, "test").run(rds, [])
    assert not stale.exists() and fresh.exists()
