"""The attribution planner and the partition clock: pure logic, hand-checked cases."""

from __future__ import annotations

import msgspec

from privads.infra.records import Click, Impression, Pending
from privads.streams.attribution import IDLE_GRACE_S, Clock, Seen, WallGuard, ahead, bucket_of, plan_batch

W, B = 10.0, 1  # a 10 s window, 1 s buckets


def imp(iid: str, ts: float, user: str = "u", ad: str = "a", policy: str = "t") -> Impression:
    return Impression(event_id=iid, ts=ts, user_id=user, ad_id=ad, position=0, propensity=0.5, policy=policy,
                      request_id="r")


def clk(iid: str, ts: float, user: str = "u", value: float | None = None) -> Click:
    return Click(event_id="c-" + iid, ts=ts, impression_id=iid, user_id=user, ad_id="a", value=value)


def plan(imps, clicks, seen=None, now=100.0):
    return plan_batch(imps, clicks, seen or Seen(closed_before=bucket_of(now - W, B)), now=now, window_s=W,
                      bucket_s=B, arm_bucket_s=60)


# the partition's time is its slowest input topic: a lagging clicks topic holds windows open
def test_clock_is_the_slowest_topic():
    c = Clock().advance({"imps": [100.0, 140.0], "clicks": [103.0]}, wall=1000.0)
    assert c.now(1000.0) == 103.0
    assert c.now(1000.0 + IDLE_GRACE_S) == 103.0  # not idle yet
    # clicks silent for grace + 5 s: it runs on with the wall clock
    assert c.now(1000.0 + IDLE_GRACE_S + 5) == 108.0
    assert Clock().now(55.0) == 55.0  # nothing seen: wall time


def test_click_in_window_is_one_positive_and_counts():
    p = plan([imp("i1", 95.0)], [clk("i1", 96.0, value=2.0), clk("i1", 97.0)])
    assert [(x.impression_id, x.clicked, x.value) for x in p.labelled] == [("i1", True, 2.0)]
    assert p.stats["repeated_clicks"] == 1 and p.arm[("t", 1, "clicks")] == 1 and p.arm[("t", 1, "impressions")] == 1
    # the click's value, and its square, in the impression's minute (the repeated click adds nothing)
    assert dict(p.arm_value) == {("t", 1, "value:sum"): 2.0, ("t", 1, "value:sq"): 4.0}
    # a click without a value counts as a click worth nothing
    q = plan([imp("i2", 95.0)], [clk("i2", 96.0)])
    assert q.arm[("t", 1, "clicks")] == 1 and not q.arm_value
    assert p.put_pending[95]["i1"].clicked and p.click_ts == [96.0]


def test_window_close_emits_negatives_once_and_skips_clicked():
    due = {85: {"x": Pending("u", "a", "t", 85.5), "y": Pending("u", "a", "t", 85.2, clicked=True)}}
    p = plan([], [], Seen(closed_before=85, due=due), now=96.0)  # cutoff = bucket(86) = 86
    assert [(x.impression_id, x.clicked) for x in p.labelled] == [("x", False)]
    assert p.closed_before == 86


def test_click_after_close_is_late_and_click_before_impression_waits():
    seen = Seen(closed_before=90, pending={"old": (80, Pending("u", "a", "t", 80.0))})
    p = plan([], [clk("old", 99.0), clk("nope", 99.0)], seen)
    assert p.stats["late_clicks"] == 1 and not p.labelled
    assert p.stats["unattributed_clicks"] == 1 and "nope" in p.put_orphans
    # the orphan's impression arrives: joined, and no longer unattributed
    p2 = plan([imp("nope", 98.0)], [], Seen(closed_before=90, orphans={"nope": clk("nope", 99.0)}))
    assert [(x.impression_id, x.clicked) for x in p2.labelled] == [("nope", True)]
    assert p2.stats["unattributed_clicks"] == -1 and p2.del_orphans == {"nope"}


def test_duplicate_impressions_and_late_arrivals():
    seen = Seen(closed_before=90, pending={"i1": (95, Pending("u", "a", "t", 95.0))})
    p = plan([imp("i1", 95.0), imp("i2", 96.0), imp("i2", 96.0)], [], seen)
    assert p.stats["duplicate_impressions"] == 2 and [i.event_id for i in p.new_impressions] == ["i2"]
    # an impression older than its window arrives: it is due at once, a negative unless clicked in the same batch
    p = plan([imp("late", 50.0), imp("late2", 51.0)], [clk("late2", 52.0)])
    assert sorted((x.impression_id, x.clicked) for x in p.labelled) == [("late", False), ("late2", True)]


def test_an_impression_counts_as_shown_with_its_served_pctr_at_once():
    # the calibration factor's evidence: shown and µ-expected clicks on arrival, without waiting for a label
    served = msgspec.structs.replace(imp("i1", 95.0), pctr=0.125)
    p = plan_batch([served, imp("i2", 95.5), imp("i2", 95.5)], [], Seen(closed_before=bucket_of(90.0, B)), now=100.0,
                   window_s=W, bucket_s=B, arm_bucket_s=60, base_rate=0.02)
    assert p.ads[("t", "a", "shown")] == 2  # the duplicate is not counted again
    assert p.ads[("t", "a", "expected")] == 125_000 + 20_000  # no pctr logged: the base rate is expected
    assert not p.labelled and p.ads[("t", "a", "labelled")] == 0


# forged clicks: another user's impression, or another ad than the impression showed
def wrong(iid: str, ts: float, user: str = "u", ad: str = "a") -> Click:
    return Click(event_id="f-" + iid, ts=ts, impression_id=iid, user_id=user, ad_id=ad)


def test_a_click_of_another_user_or_ad_is_rejected_and_counts_nothing_but_itself():
    seen = Seen(closed_before=90, pending={"old": (95, Pending("u", "a", "t", 95.0))})
    p = plan([imp("new", 96.0)], [wrong("old", 97.0, user="mallory"), wrong("new", 97.0, ad="b"),
                                  wrong("new", 97.5, user="mallory", ad="b")], seen)
    assert [c.event_id for c, _ in p.rejected] == ["f-old", "f-new", "f-new"]
    reasons = [why for _, why in p.rejected]
    assert "user_id is not the impression's" in reasons[0] and "ad_id is not the impression's" in reasons[1]
    assert "user_id and ad_id are not" in reasons[2]
    assert all("'u'" not in why for why in reasons)  # the victim's id is not told to the forger
    assert not p.labelled and not p.click_ts
    assert not any(what == "clicks" for (_, _, what) in p.arm)
    assert not any(what in ("clicks", "labelled") for (_, _, what) in p.ads)
    assert not p.put_pending.get(95) and not p.put_pending[96]["new"].clicked
    assert p.stats["mismatched_clicks"] == 3 and p.stats["dead_letters"] == 3
    assert not p.stats["unattributed_clicks"] and not p.put_orphans


def test_a_forged_click_does_not_spoil_the_real_one():
    p = plan([imp("i1", 95.0)], [wrong("i1", 96.0, user="mallory"), clk("i1", 96.5)])
    assert [(x.impression_id, x.clicked, x.user_id) for x in p.labelled] == [("i1", True, "u")]
    assert p.stats["mismatched_clicks"] == 1 and p.arm[("t", 1, "clicks")] == 1


def test_a_forged_click_that_came_before_its_impression_is_rejected_when_it_arrives():
    # it waited as an orphan (counted unattributed); the impression shows it was not the impression's click
    early = {"i1": wrong("i1", 99.0, ad="b"), "i2": clk("i2", 99.0)}
    p = plan([imp("i1", 98.0), imp("i2", 98.0)], [], Seen(closed_before=90, orphans=early))
    assert [(c.event_id, "ad_id" in why) for c, why in p.rejected] == [("f-i1", True)]
    assert [(x.impression_id, x.clicked) for x in p.labelled] == [("i2", True)]  # the true orphan still joins
    assert p.del_orphans == {"i1", "i2"} and p.stats["unattributed_clicks"] == -2
    assert p.stats["mismatched_clicks"] == 1 and not p.put_pending[98]["i1"].clicked


# --- event time that cannot be believed -------------------------------------------------------------------------


# an event in milliseconds is ~50,000 years ahead: refused, naming the limit; a little skew is let in
def test_an_event_far_ahead_of_the_clock_is_refused_with_the_reason():
    wall = 1_800_000_000.0
    assert ahead(wall + 299.0, wall, 300.0) is None and ahead(wall - 1e6, wall, 300.0) is None
    why = ahead(wall * 1000, wall, 300.0)
    assert why is not None and "milliseconds" in why and "PRIVADS_MAX_EVENT_AHEAD_S" in why


# a checkpoint's clock years ahead (written before the check, or by a wall clock that came back) closes windows on
# real time again once bounded
def test_a_clock_bounded_to_the_tolerance_closes_windows_on_real_time():
    wall = 1_800_000_000.0
    broken = Clock({"imps": (wall * 1000, wall), "clicks": (wall - 5, wall)})
    assert broken.now(wall) == wall - 5  # the slowest topic rules while both deliver ...
    alone = Clock({"imps": (wall * 1000, wall)})
    assert alone.now(wall) > wall + 1e9  # ... but alone the broken one is 50,000 years ahead
    assert alone.bounded(wall).now(wall) == wall
    assert broken.bounded(wall).marks["clicks"] == (wall - 5, wall)  # nothing else moves


# an event a little ahead (a producer's skew) is let in, but its topic's watermark stops at the wall clock
def test_a_watermark_never_passes_the_wall_clock():
    c = Clock().advance({"imps": [1000.0 + 200]}, wall=1000.0)
    assert c.marks["imps"] == (1000.0, 1000.0)
    assert c.advance({"imps": [1001.0]}, wall=1002.0).marks["imps"] == (1001.0, 1002.0)


# the wall time the clocks run on follows real time: a forward step is not believed, a backward one is
def test_the_wall_guard_ignores_a_forward_step_and_follows_a_backward_one():
    g = WallGuard(slack_s=1.0)
    assert g.read(1000.0, 50.0) == 1000.0
    assert g.read(1010.0, 60.0) == 1010.0  # 10 s of wall in 10 s of real time
    assert g.read(1010.0 + 3600, 61.0) == 1012.0  # stepped an hour ahead: 1 s passed (+ the 1 s slack)
    assert g.read(1010.0 + 3600 + 10, 71.0) == 1022.0  # and it runs on at real time from where it was
    assert g.read(900.0, 72.0) == 900.0  # a backward step: believed (windows close late, never early)
    assert g.read(901.0, 73.0) == 901.0


# a quiet partition behind a stepped wall clock keeps its window open
def test_a_forward_wall_step_does_not_close_a_quiet_partitions_windows():
    g = WallGuard()
    c = Clock().advance({"imps": [1000.0], "clicks": [1000.0]}, g.read(1000.0, 0.0))
    stepped = g.read(1000.0 + 3600, 5.0)  # 5 s later the wall clock says an hour passed
    assert c.now(stepped) < 1000.0 + W  # still within the 10 s window: nothing closes early


# a topic not read to its end is not idle: touched, its time stops running on with the wall clock
def test_a_touched_topic_is_not_idle_and_keeps_its_watermark():
    c = Clock({"imps": (100.0, 100.0), "clicks": (90.0, 100.0)})
    assert sorted(c.idle(200.0)) == ["clicks", "imps"] and c.now(200.0) == 90.0 + 100.0 - IDLE_GRACE_S
    t = c.touch(["clicks"], 200.0)
    assert t.idle(200.0) == ["imps"] and t.marks["clicks"] == (90.0, 200.0)
    assert t.now(200.0) == 90.0  # the outage does not count for the topic whose backlog is still to be read
