"""Attribution for one partition batch: the pure logic (no I/O).

Impressions wait in time buckets (``bucket_s`` wide, by event time) until a
click joins them — a positive, at once — or their attribution window closes
without one — a negative. Negatives are never emitted early: an impression is
labelled 0 only once no click can be attributed to it any more, so the learner
never has to take a label back. (The user vectors do not wait for the label:
``ranker.updates.learn_events`` takes an impression's label-free half of the
step when it arrives and the click's half when it is joined.) A click whose
impression has not arrived waits as an *orphan* and is counted as unattributed
until its impression arrives (then it is joined) or the window passes (then it
stays unattributed, counted).

A click joins only an impression of its own user and ad: one that names another
user's impression, or shows another ad, is rejected whether it comes after its
impression or before (an orphan, checked when the impression arrives). A
rejected click labels nothing, moves no counter but ``mismatched_clicks`` and
``dead_letters``, and is dead-lettered by the worker (``Plan.rejected``). The API
refuses such clicks itself (signed impression ids, ``infra.signing``); this
check holds for clicks produced straight to Kafka.

Exactly-once: the planner is deterministic in (batch, state read); the worker
commits its writes together with the partition's input offsets in one Redis
transaction, so a batch is applied once or not at all.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from privads.infra import keys
from privads.infra.keys import EXPECTED_SCALE
from privads.infra.records import Click, Impression, Labelled, Pending


def bucket_of(ts: float, bucket_s: int) -> int:
    """Index of the time bucket holding event time ``ts``."""
    return int(ts // bucket_s)


IDLE_GRACE_S = 2.0


@dataclass
class Clock:
    """A partition's clock: the slowest of its input topics' event times.

    Each input topic has a watermark (the latest event time it delivered) and
    the wall time it last delivered anything. The partition's time is the
    minimum over its topics, so a topic that lags behind a backlog (clicks
    fetched after their impressions) holds windows open until it catches up.
    A topic that delivered nothing for ``IDLE_GRACE_S`` is idle, and its time
    runs on with the wall clock, so quiet partitions still close their windows.

    Attributes
    ----------
    marks : dict
        Topic → (watermark, wall time of its last delivery).
    """

    marks: dict[str, tuple[float, float]] = field(default_factory=dict)

    def now(self, wall: float) -> float:
        if not self.marks:
            return wall
        return min(wm + max(0.0, wall - seen - IDLE_GRACE_S) for wm, seen in self.marks.values())

    def bounded(self, wall: float) -> Clock:
        """The clock with no watermark past ``wall``.

        ``advance`` never moves a watermark past the wall clock, but a checkpoint may hold
        one from before that rule, from another host whose clock ran ahead, or from a wall
        clock that jumped and came back: bounded, it closes windows on real time again
        instead of years ahead.
        """
        return Clock({t: (min(wm, wall), min(seen, wall)) for t, (wm, seen) in self.marks.items()})

    def idle(self, wall: float) -> list[str]:
        """The topics whose time runs on with the wall clock now (nothing delivered for ``IDLE_GRACE_S``)."""
        return [t for t, (_, seen) in self.marks.items() if wall - seen > IDLE_GRACE_S]

    def touch(self, topics: Sequence[str], wall: float) -> Clock:
        """The clock with these topics counted as delivering at ``wall``: not idle, their watermark kept.

        For the topics a worker has not read to their end: a partition taken over after its
        worker died has marks from before the outage, and its time must not run on by the
        outage before the backlog is read.
        """
        return Clock({t: ((wm, wall) if t in topics else (wm, seen)) for t, (wm, seen) in self.marks.items()})

    def advance(self, event_ts: dict[str, list[float]], wall: float) -> Clock:
        """The clock after a batch delivered these event times per topic, at ``wall``.

        A watermark never passes ``wall``: an event a little ahead (a producer's clock skew,
        within ``ahead``'s tolerance) is learned, but cannot close windows before their time.
        """
        marks = dict(self.marks)
        for topic, ts in event_ts.items():
            if ts:
                old = marks.get(topic, (float("-inf"), wall))[0]
                marks[topic] = (max(old, min(max(ts), wall)), wall)
        return Clock(marks)


def ahead(ts: float, wall: float, tolerance_s: float) -> str | None:
    """Why an event stamped ``ts`` is too far in the future to be believed (then it is dead-lettered), or None.

    One event in milliseconds instead of seconds would otherwise move its partition's clock
    some 50,000 years ahead: every later impression a negative at once, every click late.
    """
    if ts <= wall + tolerance_s:
        return None
    return (f"ts {ts!r} is {ts - wall:.0f} s ahead of the worker's clock (at most {tolerance_s:g} s, "
            "PRIVADS_MAX_EVENT_AHEAD_S); is it in milliseconds? Unix seconds are expected")


class WallGuard:
    """The wall time the partition clocks run on: it never moves forward faster than real (monotonic) time.

    A quiet partition closes its windows on wall time (``Clock.now``). A wall clock stepped
    forward (by hand, or by NTP correcting a large error) would close every open window at
    once, labelling impressions negative before their clicks could come. This guard believes
    a backward step at once (windows then close late, which is safe) and a forward step never,
    within one process: its time runs on at the monotonic clock's rate from where it was.
    The future-events check (``ahead``) uses the raw wall clock.
    """

    def __init__(self, slack_s: float = 1.0) -> None:
        self.slack_s = slack_s
        self.anchor: tuple[float, float] | None = None  # (wall, monotonic) of the last reading believed

    def read(self, wall: float, mono: float) -> float:
        """The guarded wall time for a raw ``wall`` reading taken at monotonic time ``mono``."""
        if self.anchor is not None:
            was, then = self.anchor
            bound = was + max(0.0, mono - then) + self.slack_s
            if wall > bound:
                return bound  # a forward step: not believed; the anchor stays
        self.anchor = (wall, mono)
        return wall


@dataclass
class Seen:
    """What Redis holds of one partition for a batch (phase-1 reads).

    Attributes
    ----------
    pending : dict
        Impression id → (bucket, record) for the ids this batch touches.
    orphans : dict
        Impression id → waiting click, for the ids this batch touches.
    due : dict
        Bucket → {impression id → record}: buckets whose window closes now.
    closed_before : int
        Buckets below this index are closed (their negatives were emitted).
    all_orphans : dict or None
        Every waiting click of the partition, read when buckets close, to expire old ones.
    """

    pending: dict[str, tuple[int, Pending]] = field(default_factory=dict)
    orphans: dict[str, Click] = field(default_factory=dict)
    due: dict[int, dict[str, Pending]] = field(default_factory=dict)
    closed_before: int = 0
    all_orphans: dict[str, Click] | None = None


@dataclass
class Plan:
    """Every write a batch implies, for the worker to commit atomically."""

    put_pending: dict[int, dict[str, Pending]] = field(default_factory=dict)
    put_orphans: dict[str, Click] = field(default_factory=dict)
    del_orphans: set[str] = field(default_factory=set)
    labelled: list[Labelled] = field(default_factory=list)
    new_impressions: list[Impression] = field(default_factory=list)
    arm: Counter[tuple[str, int, str]] = field(default_factory=Counter)  # (policy, arm bucket, impressions|clicks)
    # (policy, arm bucket, keys.ARM_VALUE_FIELDS) → the clicks' values and their squares, by the impression's minute
    arm_value: defaultdict[tuple[str, int, str], float] = field(default_factory=lambda: defaultdict(float))
    ads: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (policy, ad_id, keys.ADSTAT_FIELDS)
    stats: Counter[str] = field(default_factory=Counter)
    closed_before: int = 0
    click_ts: list[float] = field(default_factory=list)  # produce time of each applied click (freshness)
    # clicks that do not match their impression's user or ad, with why: dead-lettered, never learned
    rejected: list[tuple[Click, str]] = field(default_factory=list)

    def _put(self, bucket: int, iid: str, rec: Pending) -> None:
        self.put_pending.setdefault(bucket, {})[iid] = rec


def mismatch(click: Click, rec: Pending) -> str | None:
    """Why ``click`` cannot be a click on impression ``rec`` (another user's, another ad's), or None if it can."""
    wrong = [name for name, mine, theirs in (("user_id", click.user_id, rec.user_id), ("ad_id", click.ad_id, rec.ad_id))
             if mine != theirs]
    if not wrong:
        return None
    # the impression's own user id is left out: the dead letter must not tell a forger whose impression it was
    return (f"click {click.event_id!r} does not match impression {click.impression_id!r}: its "
            f"{' and '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not the impression's; not attributed, "
            "not learned")


def plan_batch(
    impressions: Sequence[Impression],
    clicks: Sequence[Click],
    seen: Seen,
    *,
    now: float,
    window_s: float,
    bucket_s: int,
    arm_bucket_s: int,
    base_rate: float = 0.05,
) -> Plan:
    """Decide the writes for one partition's batch.

    Parameters
    ----------
    impressions, clicks : sequences of decoded events owned by this partition
    seen : Seen
        Redis state for the ids and buckets this batch touches.
    now : float
        The partition's clock (event time).
    window_s : float
        Attribution window.
    bucket_s, arm_bucket_s : int
        Widths of the pending-impression buckets and of the /lift counters.
    base_rate : float
        The click probability expected of an impression logged without a ``pctr``.

    Returns
    -------
    Plan
    """
    plan = Plan(closed_before=max(seen.closed_before, 0))
    cutoff = bucket_of(now - window_s, bucket_s)  # buckets below it close now
    new: dict[str, tuple[int, Pending]] = {}

    def label(iid: str, rec: Pending, clicked: bool) -> None:
        plan.labelled.append(Labelled(impression_id=iid, user_id=rec.user_id, ad_id=rec.ad_id, ts=rec.ts,
                                      clicked=clicked, policy=rec.policy, value=rec.value))
        plan.ads[(rec.policy, rec.ad_id, "labelled")] += 1
        if clicked:
            plan.ads[(rec.policy, rec.ad_id, "clicks")] += 1
            minute = int(rec.ts) // arm_bucket_s
            plan.arm[(rec.policy, minute, "clicks")] += 1
            if rec.value:  # the arm's value per impression and its variance (ranker.experiment.arm_value)
                plan.arm_value[(rec.policy, minute, keys.ARM_VALUE)] += rec.value
                plan.arm_value[(rec.policy, minute, keys.ARM_VALUE_SQ)] += rec.value * rec.value

    def reject(click: Click, why: str) -> None:
        plan.rejected.append((click, why))
        plan.stats["mismatched_clicks"] += 1
        plan.stats["dead_letters"] += 1

    def join(iid: str, bucket: int, rec: Pending, click: Click) -> Pending:
        rec = msgspec.structs.replace(rec, clicked=True, value=click.value or 0.0)
        plan._put(bucket, iid, rec)
        label(iid, rec, True)
        plan.click_ts.append(click.ts)
        return rec

    for imp in impressions:
        iid = imp.event_id
        if iid in seen.pending or iid in new:
            plan.stats["duplicate_impressions"] += 1
            continue
        b = bucket_of(imp.ts, bucket_s)
        rec = Pending(user_id=imp.user_id, ad_id=imp.ad_id, policy=imp.policy, ts=imp.ts)
        plan.arm[(imp.policy, int(imp.ts) // arm_bucket_s, "impressions")] += 1
        # shown at once: the cold-ad Beta counts an impression as a trial as soon as it is served, not when its
        # window closes (half an hour of clicks without their negatives would make every clicked ad look perfect)
        plan.ads[(imp.policy, imp.ad_id, "shown")] += 1
        expected = imp.pctr if imp.pctr is not None else base_rate
        plan.ads[(imp.policy, imp.ad_id, "expected")] += round(expected * EXPECTED_SCALE)
        plan.stats["impressions"] += 1
        plan.new_impressions.append(imp)
        early = seen.orphans.get(iid)
        if early is not None and (why := mismatch(early, rec)) is not None:  # a forged click came first
            reject(early, why)
            plan.del_orphans.add(iid)
            plan.stats["unattributed_clicks"] -= 1  # counted unattributed while it waited: it was no click at all
        elif early is not None and early.ts - imp.ts <= window_s:  # its click came first
            rec = join(iid, b, rec, early)
            plan.del_orphans.add(iid)
            plan.stats["unattributed_clicks"] -= 1
        plan._put(b, iid, rec)
        new[iid] = (b, rec)

    arrived = set(new)
    for click in clicks:
        iid = click.impression_id
        found = new.get(iid) or seen.pending.get(iid)
        if found is None:
            if iid in seen.orphans or iid in plan.put_orphans:
                plan.stats["duplicate_clicks"] += 1
            else:
                plan.put_orphans[iid] = click
                plan.stats["unattributed_clicks"] += 1
            continue
        b, rec = found
        rec = plan.put_pending.get(b, {}).get(iid, rec)
        if (why := mismatch(click, rec)) is not None:
            reject(click, why)
        elif rec.clicked:
            plan.stats["repeated_clicks"] += 1  # the label is binary: one positive per impression
        elif (b < plan.closed_before and iid not in arrived) or click.ts - rec.ts > window_s:
            plan.stats["late_clicks"] += 1  # outside its window: it is (or will be) a negative
        else:
            rec = join(iid, b, rec, click)
            new[iid] = (b, rec)

    # close every bucket whose window has passed: this batch's updates win over what Redis held
    closing: dict[int, dict[str, Pending]] = {b: dict(recs) for b, recs in seen.due.items() if b < cutoff}
    for b, _ in new.values():
        if b < max(cutoff, plan.closed_before):  # arrived after its own window: due at once
            closing.setdefault(b, {})
    for b in sorted(closing):
        recs = closing[b]
        recs.update(plan.put_pending.get(b, {}))
        for iid, rec in recs.items():
            if not rec.clicked and (b >= plan.closed_before or iid in arrived):
                label(iid, rec, False)
    plan.closed_before = max(plan.closed_before, cutoff)
    if seen.all_orphans:
        for iid, click in seen.all_orphans.items():
            if iid not in plan.del_orphans and click.ts < now - window_s - bucket_s:
                plan.del_orphans.add(iid)  # its impression never came: it stays counted as unattributed
                plan.stats["expired_orphans"] += 1
    return plan
