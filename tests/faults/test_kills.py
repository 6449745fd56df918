"""Process-kill faults under a steady stream of events: the loop recovers with exact counts.

Each test runs on its own broker and redis-server (``box``), keeps a steady
stream going while it SIGKILLs one process, brings it back, stops the stream,
waits for quiescence and compares every counter, user state and archive row
with what was sent (``faults.harness.check``). The measured recovery time is
printed as a ``FAULT {...}`` line (and appended to ``$PRIVADS_FAULT_REPORT``).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from faults.harness import (
    AofTail,
    ApiStream,
    Box,
    Fleet,
    KafkaStream,
    Progress,
    SentImpression,
    check,
    drain_archive,
    kill_on_create,
    load_catalog,
    quiesce,
    record,
    wait_for,
)
from helpers import sample_ads
from privads.infra import keys, records
from privads.infra.processes import Process
from privads.infra.settings import Settings
from privads.ranker.artifacts import load_version

pytestmark = pytest.mark.integration
ADS = sample_ads(["gaming", "gardening", "skincare", "coffee & tea"], per_category=4)


def partitions_of(worker: Process) -> list[int]:
    """The partitions a worker last said it owns (its log's "owning partitions [..]" line)."""
    lines = [ln for ln in worker.log.read_text().splitlines() if "owning partitions" in ln]
    return json.loads(lines[-1].split("owning partitions", 1)[1]) if lines else []


def owned(r: redis.Redis, worker_pid: int) -> int:
    """How many partitions the worker with this pid says it owns (its heartbeat)."""
    for k, v in r.hgetall(keys.WORKERS).items():
        if k.decode().endswith(f"-{worker_pid}"):
            return int(json.loads(v)["partitions"])
    return 0


def test_the_checks_pass_without_a_fault_and_catch_a_lost_or_doubled_event(box: Box, fsettings: Settings,
                                                                           fleet: Fleet, r: redis.Redis) -> None:
    fleet.worker("worker")
    load_catalog(box, r, ADS)
    stream = KafkaStream(box.kafka, ADS, tag="base")
    fleet.streams.append(stream)
    stream.start()
    time.sleep(4)
    ledger = stream.stop()
    quiesce(r, ledger)
    drain_archive(r, fsettings.local / "archive")
    out = check(r, fsettings.local / "archive", ledger)
    out.require()
    assert len(ledger.impressions) > 500 and ledger.clicked and ledger.repeats > 0
    record("none (baseline)", None, out)
    # the checks can fail: an impression sent but never seen, and one seen but never sent
    ghost = dataclasses.replace(ledger, impressions={**ledger.impressions,
                                                     "ghost": SentImpression("baseu1", ADS[0]["ad_id"], "control",
                                                                             time.time())})
    lost = check(r, fsettings.local / "archive", ghost)
    assert lost.lost == 1 and any("ghost: sent 1, seen 0" in d for _, d in lost.diffs), lost.diffs
    dropped = next(iter(ledger.impressions))
    fewer = dataclasses.replace(ledger, impressions={k: v for k, v in ledger.impressions.items() if k != dropped})
    extra = check(r, fsettings.local / "archive", fewer)
    assert any(f"impression {dropped}" in d and "never sent" in d for _, d in extra.diffs), extra.diffs
    assert any(d.startswith("stats:") and "impressions: sent" in d for _, d in extra.diffs), extra.diffs


# the partition's clock is not run on by the outage before the backlog is read (streams/worker.py: _behind): a
# taking-over worker counts a topic idle only once it has read it to its end
def test_sigkill_one_of_two_workers_mid_batch(box: Box, fsettings: Settings, fleet: Fleet, r: redis.Redis) -> None:
    a = fleet.worker("worker-a")
    load_catalog(box, r, ADS)
    b = fleet.worker("worker-b")
    assert a.pid is not None and b.pid is not None
    wait_for(lambda: owned(r, a.pid) == 1 and owned(r, b.pid) == 1, 60, "the two workers to own a partition each")
    progress = Progress(fsettings.redis_url)
    stream = KafkaStream(box.kafka, ADS, tag="wk")
    fleet.streams.append(stream)
    stream.start()
    time.sleep(3)
    mine = partitions_of(b)
    stream.burst(1500)  # B has a batch in hand when the kill lands
    time.sleep(0.15)
    before = progress.committed()
    killed_at = time.time()
    b.signal(signal.SIGKILL)
    b.popen.wait(10)  # type: ignore[union-attr]
    # mid-batch: events B had been given were not all committed when it died
    produced = {p: sum(o for (t, q), o in stream.end_offsets.items() if q == p and t in records.EVENT_TOPICS)
                for p in range(2)}
    assert any(before[p] < produced[p] for p in mine), f"nothing was outstanding at the kill: {before} vs {produced}"
    # A takes B's partition once the group notices (session timeout): both partitions commit past the kill
    takeover = progress.recovery(before, killed_at, timeout=60)
    wait_for(lambda: owned(r, a.pid) == 2, 30, "worker A to own both partitions")
    b = fleet.worker("worker-b2")
    wait_for(lambda: owned(r, a.pid) == 1 and owned(r, b.pid) == 1, 60, "the partitions to be shared again")
    time.sleep(2)
    ledger = stream.stop()
    waited = quiesce(r, ledger)
    drain_archive(r, fsettings.local / "archive")
    out = check(r, fsettings.local / "archive", ledger)
    record("SIGKILL 1 of 2 workers mid-batch", takeover, out, quiesce_s=round(waited, 1))
    assert a.poll() is None, "worker A died"
    out.require()


def test_sigkill_redis_mid_transaction_then_restart_from_its_aof_short_of_its_last_second(
        box: Box, fsettings: Settings, fleet: Fleet, r: redis.Redis) -> None:
    w = fleet.worker("worker")
    load_catalog(box, r, ADS)
    progress = Progress(fsettings.redis_url)
    aof = AofTail(box.data / "redis").start()
    fleet.closers.append(aof.stop)
    stream = KafkaStream(box.kafka, ADS, tag="rd")
    fleet.streams.append(stream)
    stream.start()
    time.sleep(3)
    stream.burst(1500)  # the worker is committing batches when redis-server dies
    time.sleep(0.1)
    before = progress.committed()
    killed_at = time.time()
    box.kill_redis()
    # a SIGKILL alone loses nothing (the page cache has the AOF); appendfsync everysec may lose the last second
    # to a power cut: that is cut from the file too. The checkpoints' offsets go back with the state they describe
    cut = aof.cut_back(1.0, killed_at)
    box.start_redis()
    kept = progress.committed()
    rolled_back = sum(before.values()) - sum(kept.values())
    assert cut > 0 and rolled_back > 0, f"the cut lost no commit ({cut} bytes, {before} → {kept})"
    recovery = progress.recovery(before, killed_at, timeout=60)
    time.sleep(3)
    ledger = stream.stop()
    waited = quiesce(r, ledger)
    drain_archive(r, fsettings.local / "archive")
    out = check(r, fsettings.local / "archive", ledger)
    record("SIGKILL redis-server mid-transaction, restart from its AOF less its last second", recovery, out,
           quiesce_s=round(waited, 1), events_rolled_back=rolled_back, aof_bytes_cut=cut)
    assert w.poll() is None, "the worker died with redis-server"
    out.require()


def serving_under_load(box: Box, fsettings: Settings, fleet: Fleet, r: redis.Redis) -> tuple[Process, ApiStream]:
    """A worker, the catalog, an API, and API clients calling it for 3 s already."""
    fleet.worker("worker")
    load_catalog(box, r, ADS)
    api = fleet.api("api")
    clients = ApiStream(fsettings.api)
    fleet.streams.append(clients)
    clients.start()
    time.sleep(3)
    return api, clients


# /clicks answers once Kafka confirmed the click, whatever the settings. /recommend answers before Kafka has its
# impressions (by default), but only after writing them to the API's journal (infra/journal.py): the restarted API
# replays what the killed one had queued. With IMPRESSION_CONFIRM_S > 0 it answers once Kafka confirmed them. Either
# way nothing answered 2xx is lost or doubled.
@pytest.mark.parametrize("confirm_s", [0.05, 0.0], ids=["impressions-confirmed", "default"])
def test_sigkill_the_api_mid_request_then_restart(box: Box, fsettings: Settings, fleet: Fleet, r: redis.Redis,
                                                  confirm_s: float) -> None:
    fleet.settings = fsettings.model_copy(update={"impression_confirm_s": confirm_s})
    api, clients = serving_under_load(box, fsettings, fleet, r)
    # the kill lands a moment after an answer, while the other client's request is in flight
    answered = threading.Event()
    clients.on_answer = answered.set
    assert answered.wait(10), "no answer from the API"
    api.signal(signal.SIGKILL)
    killed_at = time.time()
    clients.on_answer = None
    api.popen.wait(10)  # type: ignore[union-attr]
    served = clients.answered
    journal = list(fsettings.journal_dir.glob("*.seg"))
    fleet.api("api2")
    wait_for(lambda: clients.answered > served, 30, "an answer from the restarted API")
    recovery = time.time() - killed_at
    time.sleep(3)
    ledger = clients.stop()
    waited = quiesce(r, ledger)
    drain_archive(r, fsettings.local / "archive")
    out = check(r, fsettings.local / "archive", ledger, resent=True)
    record(f"SIGKILL the API mid-request, restart (IMPRESSION_CONFIRM_S={confirm_s:g})", recovery, out,
           quiesce_s=round(waited, 1), unanswered=len(ledger.unanswered), refused=ledger.refused,
           journal_segments_left_by_the_kill=len(journal), impressions_sent_twice_and_dropped=out.resent)
    assert len(ledger.impressions) > 200 and ledger.clicks
    assert journal, "the killed API left no journal segment: the kill did not land while impressions were in flight"
    assert not [p for p in journal if p.exists()], "the restarted API did not replay the killed one's journal"
    out.require()


def replayed(api: str) -> int:
    """``privads_impressions_replayed_total`` of the API process answering at ``api``."""
    for line in httpx.get(f"{api}/metrics", timeout=5).text.splitlines():
        if line.startswith("privads_impressions_replayed_total "):
            return int(float(line.split()[1]))
    raise AssertionError("/metrics has no privads_impressions_replayed_total")


# The journal's own case, made certain: with the broker frozen (SIGSTOP) nothing the API answers can reach Kafka, so
# every impression answered in the meantime is in the producer's queue when the API is SIGKILLed. The restarted API
# must replay each of them from the killed one's journal, once.
def test_sigkill_the_api_while_kafka_is_frozen_then_restart(box: Box, fsettings: Settings, fleet: Fleet,
                                                            r: redis.Redis) -> None:
    api, clients = serving_under_load(box, fsettings, fleet, r)
    before = len(clients.ledger.impressions)
    box.broker.signal(signal.SIGSTOP)
    try:
        time.sleep(2.0)  # below the workers' session timeout (6 s): no rebalance, only a pause
        api.signal(signal.SIGKILL)
        killed_at = time.time()
        api.popen.wait(10)  # type: ignore[union-attr]
    finally:
        box.broker.signal(signal.SIGCONT)
    held = len(clients.ledger.impressions) - before  # answered while Kafka could take none of them
    served = clients.answered
    fleet.api("api2")
    wait_for(lambda: clients.answered > served, 30, "an answer from the restarted API")
    recovery = time.time() - killed_at
    sent_again = replayed(fsettings.api)
    time.sleep(3)
    ledger = clients.stop()
    waited = quiesce(r, ledger)
    drain_archive(r, fsettings.local / "archive")
    out = check(r, fsettings.local / "archive", ledger, resent=True)
    record("SIGKILL the API while Kafka is frozen (SIGSTOP), restart", recovery, out, quiesce_s=round(waited, 1),
           unanswered=len(ledger.unanswered), refused=ledger.refused, answered_while_frozen=held,
           replayed_from_the_journal=sent_again, impressions_sent_twice_and_dropped=out.resent)
    # few: the clients' clicks wait for Kafka (up to 1.5 s each) meanwhile, and hold up their next /recommend
    assert held >= 3, f"only {held} impressions answered while the broker was frozen"
    assert sent_again >= held, f"{held} impressions were held in the killed API's queue, {sent_again} replayed"
    out.require()


def test_sigkill_the_learner_mid_write_keeps_the_served_version(box: Box, fsettings: Settings, fleet: Fleet,
                                                                r: redis.Redis) -> None:
    fleet.worker("worker")
    load_catalog(box, r, ADS)
    stream = KafkaStream(box.kafka, ADS, tag="ln")
    fleet.streams.append(stream)
    stream.start()
    models = fsettings.models_dir
    first = fleet.run("train-1", ["train"])
    assert first.popen is not None and first.popen.wait(120) == 0, "the first cycle failed"
    served = json.loads(r.get(keys.MODEL_CURRENT))
    api = fleet.api("api")
    assert httpx.get(f"{fsettings.api}/healthz").json()["model_version"] == served["version"]

    # killed the moment its version directory appears, while its files are being written
    name, second = kill_on_create(models, ".tmp-", lambda: fleet.run("train-2", ["train"]))
    killed_at = time.time()
    assert second.popen is not None and second.popen.wait(10) == -signal.SIGKILL, \
        f"the cycle was not killed (exit {second.poll()}): {second.log.read_text(errors='replace')[-1500:]}"
    assert name.startswith(".tmp-") and (models / name).exists(), f"no half-written version left: {name!r}"
    half = name.removeprefix(".tmp-")
    assert not (models / half).exists(), "the kill came after the version was complete: not mid-write"
    # the pointer never moved: the served version is still the first, whole and loadable
    assert json.loads(r.get(keys.MODEL_CURRENT)) == served
    assert load_version(served).version == served["version"]
    assert httpx.get(f"{fsettings.api}/healthz").json()["model_version"] == served["version"]
    during = httpx.post(f"{fsettings.api}/recommend", json={"user_id": "someone", "k": 3})
    assert during.status_code == 200 and during.json()["model_version"] == served["version"]

    third = fleet.run("train-3", ["train"])
    assert third.popen is not None and third.popen.wait(120) == 0, "the cycle after the kill failed"
    published = json.loads(r.get(keys.MODEL_CURRENT))
    recovery = time.time() - killed_at
    assert published["version"] not in (served["version"], half)
    assert Path(published["path"]).name == published["version"] and load_version(published).version
    wait_for(lambda: httpx.get(f"{fsettings.api}/healthz").json()["model_version"] == published["version"], 30,
             "the API to serve the new version")
    assert api.poll() is None
    ledger = stream.stop()
    for a in during.json()["ads"]:  # the request above logged impressions too
        ledger.impressions[a["impression_id"]] = SentImpression("someone", a["ad_id"], during.json()["policy"], 0.0)
    waited = quiesce(r, ledger)
    drain_archive(r, fsettings.local / "archive")
    out = check(r, fsettings.local / "archive", ledger)
    record("SIGKILL the learner mid-write", recovery, out, quiesce_s=round(waited, 1),
           note="served version unchanged through the kill; recovery = kill to the next version published")
    out.require()
