"""Off-policy estimators: hand-computed values, the Open Bandit Dataset sample, interval coverage
on simulated logs with a known true policy value, and generic checks run for every estimator class."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from privads.learner.estimators import (
    DM,
    DR,
    IPS,
    SNIPS,
    BaseOffPolicyEstimator,
    OPEResult,
    Replay,
    compute_unsupported_mass,
    dm,
    dr,
    effective_sample_size,
    ips,
    replay,
    snips,
)

Z95 = 1.959963984540054  # Φ⁻¹(0.975)

# --------------------------------------------------------------------------------------------
# 1. hand-computed values on tiny arrays
# --------------------------------------------------------------------------------------------

# four logged rows: reward r, logging propensity π₀, evaluation probability π_e of the logged action
R = np.array([1.0, 0.0, 1.0, 0.0])
PS = np.array([0.5, 0.25, 0.2, 0.5])
PE = np.array([0.5, 0.5, 0.4, 0.0])
# w = π_e/π₀ = [0.5/0.5, 0.5/0.25, 0.4/0.2, 0/0.5] = [1, 2, 2, 0];  w·r = [1, 0, 2, 0]
Q_HAT = np.array([0.5, 0.1, 0.6, 0.2])  # q̂ at the logged action
V_HAT = np.array([0.6, 0.2, 0.5, 0.3])  # Σ_a π_e(a) q̂(a) per row


# IPS = (1 + 0 + 2 + 0) / 4 = 0.75; ESS = (1+2+2+0)² / (1+4+4+0) = 25/9
def test_ips_hand_computed():
    res = ips(reward=R, pscore=PS, action_dist=PE, ci="normal")
    assert res.estimate == pytest.approx(0.75)
    assert res.ess == pytest.approx(25 / 9)
    assert res.n == 4 and res.estimator == "ips" and res.ci_method == "normal"
    assert res.n_bootstrap is None and res.seed is None
    # normal interval: w·r = [1, 0, 2, 0], deviations from 0.75 = [.25, −.75, 1.25, −.75],
    # squares sum to .0625 + .5625 + 1.5625 + .5625 = 2.75, sd² = 2.75/3, SE = √(2.75/3/4) = 0.4787136
    se = math.sqrt(2.75 / 3 / 4)
    assert se == pytest.approx(0.4787136, abs=1e-7)
    assert (res.ci_lo, res.ci_hi) == pytest.approx((0.75 - Z95 * se, 0.75 + Z95 * se))


# SNIPS = Σ w r / Σ w = 3 / 5 = 0.6
def test_snips_hand_computed():
    res = snips(reward=R, pscore=PS, action_dist=PE, ci="normal")
    assert res.estimate == pytest.approx(0.6)
    assert res.ess == pytest.approx(25 / 9)
    # delta method: e = w·r − 0.6·w = [1 − .6, 0 − 1.2, 2 − 1.2, 0 − 0] = [.4, −1.2, .8, 0], Σe² = 2.24,
    # SE = √(2.24 / (4·3)) / mean(w) = √0.186667 / 1.25 = 0.4320494 / 1.25 = 0.3456395
    se = math.sqrt(2.24 / 12) / 1.25
    assert se == pytest.approx(0.3456395, abs=1e-7)
    assert (res.ci_lo, res.ci_hi) == pytest.approx((0.6 - Z95 * se, 0.6 + Z95 * se))


# DM = (0.6 + 0.2 + 0.5 + 0.3) / 4 = 0.4; no weighting, so ESS = n
def test_dm_hand_computed():
    res = dm(estimated_policy_value_per_row=V_HAT, ci="normal")
    assert res.estimate == pytest.approx(0.4)
    assert res.ess == 4.0
    # deviations [.2, −.2, .1, −.1], Σ² = .1, sd² = .1/3, SE = √(.1/3/4) = 0.0912871
    se = math.sqrt(0.1 / 3 / 4)
    assert (res.ci_lo, res.ci_hi) == pytest.approx((0.4 - Z95 * se, 0.4 + Z95 * se))


# DR = mean(v̂ + w (r − q̂)): r − q̂ = [.5, −.1, .4, −.2], w·(r − q̂) = [.5, −.2, .8, 0] (sum 1.1),
# so DR = (1.6 + 1.1) / 4 = 0.675
def test_dr_hand_computed():
    res = dr(reward=R, pscore=PS, action_dist=PE, estimated_rewards=Q_HAT, estimated_policy_value_per_row=V_HAT)
    assert res.estimate == pytest.approx(0.675)
    assert res.ess == pytest.approx(25 / 9)
    assert res.ci_method == "bootstrap" and res.n_bootstrap == 1000 and res.seed == 0


# a perfect reward model (q̂ = r) makes the correction vanish: DR = DM
def test_dr_equals_dm_when_the_model_is_exact():
    res = dr(reward=R, pscore=PS, action_dist=PE, estimated_rewards=R, estimated_policy_value_per_row=V_HAT)
    assert res.estimate == pytest.approx(0.4)


# replay keeps rows where the policy's choice = the logged action: rows 0, 1, 3 → (1 + 1 + 0) / 3
def test_replay_hand_computed():
    res = replay(reward=np.array([1.0, 1.0, 0.0, 0.0]), action=np.array([0, 1, 2, 1]),
                 eval_action=np.array([0, 1, 1, 1]), pscore=np.full(4, 1 / 3), ci="normal")
    assert res.estimate == pytest.approx(2 / 3)
    assert res.ess == 3.0
    # delta method: kept rewards [1, 1, 0] minus 2/3 = [1/3, 1/3, −2/3], Σ² = 2/3, dropped row adds 0;
    # SE = √((2/3) / (4·3)) / (3/4) = 0.3142697
    se = math.sqrt((2 / 3) / 12) / 0.75
    assert (res.ci_lo, res.ci_hi) == pytest.approx((2 / 3 - Z95 * se, 2 / 3 + Z95 * se))
    assert not any("not uniform" in w for w in res.warnings)


def test_effective_sample_size():
    assert effective_sample_size(np.array([1.0, 1.0, 1.0])) == pytest.approx(3.0)
    assert effective_sample_size(np.array([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_sample_size(np.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="weights"):
        effective_sample_size(np.array([1.0, -1.0]))


# --------------------------------------------------------------------------------------------
# intervals, warnings, argument checks
# --------------------------------------------------------------------------------------------


def test_bootstrap_is_seeded_and_agrees_with_the_normal_interval_on_large_n():
    rng = np.random.default_rng(3)
    n = 20_000
    ps = rng.uniform(0.2, 0.8, n)
    pe = rng.uniform(0.0, 1.0, n)
    r = (rng.random(n) < 0.3).astype(float)
    a = ips(reward=r, pscore=ps, action_dist=pe, seed=7, n_bootstrap=400)
    b = ips(reward=r, pscore=ps, action_dist=pe, seed=7, n_bootstrap=400)
    c = ips(reward=r, pscore=ps, action_dist=pe, seed=8, n_bootstrap=400)
    assert (a.ci_lo, a.ci_hi) == (b.ci_lo, b.ci_hi)
    assert (a.ci_lo, a.ci_hi) != (c.ci_lo, c.ci_hi)
    assert a.ci_method == "bootstrap" and a.n_bootstrap == 400 and a.seed == 7
    norm = ips(reward=r, pscore=ps, action_dist=pe, ci="normal")
    assert norm.estimate == a.estimate
    # both are ≈ estimate ± 1.96 SE at n = 20k: widths within 10 %, centres within 10 % of a width
    width_b, width_n = a.ci_hi - a.ci_lo, norm.ci_hi - norm.ci_lo
    assert abs(width_b / width_n - 1) < 0.10
    assert abs((a.ci_lo + a.ci_hi) / 2 - (norm.ci_lo + norm.ci_hi) / 2) < 0.1 * width_n
    s_b = snips(reward=r, pscore=ps, action_dist=pe, seed=7, n_bootstrap=400)
    s_n = snips(reward=r, pscore=ps, action_dist=pe, ci="normal")
    assert abs((s_b.ci_hi - s_b.ci_lo) / (s_n.ci_hi - s_n.ci_lo) - 1) < 0.10


def test_unlogged_propensity_raises_naming_pscore():
    ps = np.array([0.5, np.nan, 0.2, 0.5])
    for fn in (ips, snips):
        with pytest.raises(ValueError, match=r"pscore has 1 of 4 rows without a logged propensity"):
            fn(reward=R, pscore=ps, action_dist=PE)
    with pytest.raises(ValueError, match="pscore"):
        dr(reward=R, pscore=ps, action_dist=PE, estimated_rewards=Q_HAT, estimated_policy_value_per_row=V_HAT)
    with pytest.raises(ValueError, match=r"pscore must be in \(0, 1\]"):
        ips(reward=R, pscore=np.array([0.5, 0.0, 0.2, 0.5]), action_dist=PE)
    # replay only uses pscore to check uniformity: NaN rows are reported, not fatal
    res = replay(reward=R, action=np.array([0, 1, 2, 3]), eval_action=np.array([0, 1, 0, 0]),
                 pscore=np.array([0.25, np.nan, 0.25, 0.25]))
    assert res.estimate == pytest.approx(0.5)
    assert any("1 of 4 rows have no logged propensity" in w for w in res.warnings)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reward": R[:3]}, r"reward, pscore, action_dist must have the same length"),
        ({"reward": R.reshape(2, 2)}, r"reward must be 1-dimensional"),
        ({"reward": np.array([1.0, np.inf, 0.0, 0.0])}, r"reward must be finite"),
        ({"action_dist": np.array([0.5, 1.5, 0.4, 0.0])}, r"action_dist must be probabilities"),
        ({"pscore": np.array([0.5, 1.25, 0.2, 0.5])}, r"pscore must be in \(0, 1\]"),
        ({"alpha": 1.5}, r"alpha must be"),
        ({"ci": "wald"}, r"ci must be 'bootstrap' or 'normal'"),
        ({"n_bootstrap": 0}, r"n_bootstrap must be a positive integer"),
        ({"seed": 1.5}, r"seed must be an integer"),
        ({"unsupported_mass": 1.5}, r"unsupported_mass must be in \[0, 1\]"),
        ({"tiny_pscore": -1.0}, r"tiny_pscore must be in \[0, 1\]"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, match):
    args = {"reward": R, "pscore": PS, "action_dist": PE} | kwargs
    with pytest.raises(ValueError, match=match):
        ips(**args)


def test_bad_arguments_of_replay_dm_dr():
    with pytest.raises(ValueError, match="action must hold integers"):
        replay(reward=R, action=np.array([0.0, 1, 2, 1]), eval_action=np.array([0, 1, 1, 1]))
    with pytest.raises(ValueError, match="eval_action must be non-negative"):
        replay(reward=R, action=np.array([0, 1, 2, 1]), eval_action=np.array([0, -1, 1, 1]))
    with pytest.raises(ValueError, match="estimated_policy_value_per_row must be finite"):
        dm(estimated_policy_value_per_row=np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="reward, estimated_rewards, estimated_policy_value_per_row must have"):
        dr(reward=R, pscore=PS, action_dist=PE, estimated_rewards=Q_HAT[:3], estimated_policy_value_per_row=V_HAT)
    with pytest.raises(ValueError, match="reward is required"):
        ips(reward=None, pscore=PS, action_dist=PE)


def test_tiny_propensities_and_low_ess_are_warned():
    ps = np.array([0.5, 0.0005, 0.2, 0.0001])
    pe = np.array([0.5, 0.5, 0.4, 0.0])
    res = ips(reward=R, pscore=ps, action_dist=pe)
    # w = [1, 1000, 2, 0]: ESS = 1003² / (1 + 10⁶ + 4) = 1.006, not below 0.1 · 4 = 0.4: only the tiny-pscore
    # warning (2 rows below 1e-3, largest weight 0.5 / 0.0005 = 1000)
    assert res.warnings == ["2 of 4 rows have pscore < 0.001 (min 0.0001); largest importance weight 1e+03"]
    res = ips(reward=R, pscore=ps, action_dist=pe, min_ess_ratio=0.5)  # 1.006 < 0.5 · 4 = 2; 1.006/4 = 25.2 %
    assert any(w.startswith("effective sample size 1.0 is 25.2% of n = 4") for w in res.warnings)
    clean = ips(reward=R, pscore=PS, action_dist=PE)  # min pscore 0.2, ESS 2.78 ≥ 0.4
    assert clean.warnings == []


def test_unsupported_mass_is_computed_and_warned():
    eval_dist = np.array([[0.5, 0.5, 0.0], [0.2, 0.0, 0.8]])
    logging_dist = np.array([[0.5, 0.0, 0.5], [0.5, 0.5, 0.0]])
    # row 0: π_e puts 0.5 on action 1 where π₀ = 0; row 1: 0.8 on action 2 → mean (0.5 + 0.8) / 2 = 0.65
    assert compute_unsupported_mass(eval_dist, logging_dist=logging_dist) == pytest.approx(0.65)
    # empirical support: (action 0, pos 0) and (action 1, pos 1) are logged; row 0 (pos 0) misses
    # actions 1, 2 → 0.5; row 1 (pos 1) misses actions 0, 2 → 1.0 → mean 0.75
    emp = compute_unsupported_mass(eval_dist, action=np.array([0, 1]), position=np.array([0, 1]))
    assert emp == pytest.approx(0.75)
    with pytest.raises(ValueError, match="eval_dist rows must sum to 1"):
        compute_unsupported_mass(np.array([[0.5, 0.2]]), logging_dist=np.array([[0.5, 0.5]]))
    with pytest.raises(ValueError, match="logging_dist, or both action and position"):
        compute_unsupported_mass(eval_dist)
    for fn in (ips, snips):
        assert any("65.0% of the evaluation policy's mass" in w
                   for w in fn(reward=R, pscore=PS, action_dist=PE, unsupported_mass=0.65).warnings)
    assert any("dm extrapolates" in w for w in dm(estimated_policy_value_per_row=V_HAT, unsupported_mass=0.2).warnings)
    assert dm(estimated_policy_value_per_row=V_HAT, unsupported_mass=0.0).warnings == []


def test_replay_warns_on_non_uniform_logs_and_empty_matches():
    kw = {"reward": R, "action": np.array([0, 1, 2, 1]), "eval_action": np.array([0, 1, 1, 1])}
    assert any("log is not uniform" in w for w in replay(pscore=np.array([0.5, 0.25, 0.25, 0.25]), **kw).warnings)
    # uniform within each position is uniform: position 0 has 2 candidates, position 1 has 4
    per_pos = replay(pscore=np.array([0.5, 0.25, 0.5, 0.25]), position=np.array([0, 1, 0, 1]), **kw)
    assert not any("not uniform" in w for w in per_pos.warnings)
    assert any("cannot check that the log is uniform" in w for w in replay(**kw).warnings)
    none = replay(reward=R, action=np.array([0, 0, 0, 0]), eval_action=np.array([1, 1, 1, 1]), pscore=np.full(4, 0.5))
    assert math.isnan(none.estimate) and none.ess == 0.0
    assert any("replay is undefined" in w for w in none.warnings)
    assert none.to_dict()["estimate"] is None  # NaN → None in the JSON-ready dict


def test_result_to_dict_is_plain():
    d = ips(reward=R, pscore=PS, action_dist=PE, seed=3, n_bootstrap=50).to_dict()
    assert set(d) == {f for f in OPEResult.__dataclass_fields__}
    assert d["estimator"] == "ips" and d["ci_method"] == "bootstrap" and d["n_bootstrap"] == 50 and d["seed"] == 3
    assert d["ci_lo"] <= d["estimate"] <= d["ci_hi"]


# --------------------------------------------------------------------------------------------
# 2. the Open Bandit Dataset sample (ZOZOTOWN, shipped in the obp==0.4.1 wheel)
# --------------------------------------------------------------------------------------------


def _obd_dir() -> Path | None:
    """``$PRIVADS_OBD_DIR`` (the folder holding ``bts/`` and ``random/``), else ``obp/dataset/obd``
    found on sys.path (site-packages) without importing obp."""
    env = os.environ.get("PRIVADS_OBD_DIR")
    if env:
        return Path(env) if (Path(env) / "bts" / "all" / "all.csv").is_file() else None
    spec = importlib.util.find_spec("obp")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            cand = Path(root) / "dataset" / "obd"
            if (cand / "bts" / "all" / "all.csv").is_file():
                return cand
    return None


OBD = _obd_dir()
needs_obd = pytest.mark.skipif(
    OBD is None, reason="Open Bandit Dataset sample not found: set PRIVADS_OBD_DIR or install obp==0.4.1"
)


def _load_obd(policy: str) -> dict[str, np.ndarray]:
    """item_id, position (0-based, as obp ranks it), click, propensity_score of obd/<policy>/all."""
    assert OBD is not None
    cols: dict[str, list[str]] = {"item_id": [], "position": [], "click": [], "propensity_score": []}
    with open(OBD / policy / "all" / "all.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            for key, values in cols.items():
                values.append(row[key])
    return {
        "action": np.array(cols["item_id"], dtype=np.int64),
        "position": np.array(cols["position"], dtype=np.int64) - 1,  # OBD positions are 1, 2, 3
        "reward": np.array(cols["click"], dtype=np.float64),
        "pscore": np.array(cols["propensity_score"], dtype=np.float64),
    }


@needs_obd
def test_obd_uniform_policy_from_bts_logs_matches_closed_form():
    bts = _load_obd("bts")
    n = bts["reward"].shape[0]
    n_actions = int(bts["action"].max()) + 1  # 80 items, obp's definition
    pe = np.full(n, 1.0 / n_actions)  # uniform policy: π_e(a | x, pos) = 1/80 for every item at every slot
    # closed forms, written out: IPS = (1/n) Σ click · (1/80) / π₀, SNIPS = Σ click/π₀ / Σ 1/π₀
    ips_cf = float(np.mean(bts["reward"] * (1.0 / n_actions) / bts["pscore"]))
    snips_cf = float(np.sum(bts["reward"] / bts["pscore"]) / np.sum(1.0 / bts["pscore"]))
    r_ips = ips(reward=bts["reward"], pscore=bts["pscore"], action_dist=pe)
    r_snips = snips(reward=bts["reward"], pscore=bts["pscore"], action_dist=pe)
    assert n == 10_000 and n_actions == 80
    assert r_ips.estimate == pytest.approx(ips_cf, abs=1e-6)
    assert r_snips.estimate == pytest.approx(snips_cf, abs=1e-6)
    # the values obp 0.4.1's IPW / SNIPW give on this sample (regression pin for the shipped data)
    assert r_ips.estimate == pytest.approx(0.00235964, abs=1e-8)
    assert r_snips.estimate == pytest.approx(0.00233371, abs=1e-8)
    assert r_ips.ci_lo < r_ips.estimate < r_ips.ci_hi and r_snips.ci_lo < r_snips.estimate < r_snips.ci_hi
    # BTS concentrates on few items: 110 rows with π₀ < 1e-3 and an ESS of ~340 of 10 000
    assert r_ips.ess == pytest.approx(340.378, abs=1e-3)
    assert any(w.startswith("110 of 10000 rows have pscore < 0.001") for w in r_ips.warnings)
    assert any("effective sample size" in w for w in r_ips.warnings)
    # replay is only valid on uniform logs: BTS logs are flagged
    rp = replay(reward=bts["reward"], action=bts["action"], eval_action=np.zeros(n, dtype=np.int64),
                pscore=bts["pscore"], position=bts["position"])
    assert any("log is not uniform" in w for w in rp.warnings)


@needs_obd
def test_obd_random_logs_uniform_policy_is_the_on_policy_ctr():
    rnd = _load_obd("random")
    n = rnd["reward"].shape[0]
    ctr = float(rnd["reward"].mean())
    assert ctr == pytest.approx(0.0038)  # 38 clicks in 10 000 impressions
    pe = np.full(n, 1.0 / 80)
    # logged uniformly (π₀ = 1/80 everywhere), so the uniform policy's weights are all 1: IPS = SNIPS = CTR
    for fn in (ips, snips):
        res = fn(reward=rnd["reward"], pscore=rnd["pscore"], action_dist=pe)
        assert res.estimate == pytest.approx(ctr, abs=1e-12) and res.ess == pytest.approx(n)
        assert res.warnings == []
    # replay of "always item 0" keeps exactly the rows that showed item 0, and sees a uniform log
    eval_action = np.zeros(n, dtype=np.int64)
    rp = replay(reward=rnd["reward"], action=rnd["action"], eval_action=eval_action, pscore=rnd["pscore"],
                position=rnd["position"])
    shown0 = rnd["action"] == 0
    assert rp.ess == shown0.sum() and rp.estimate == pytest.approx(rnd["reward"][shown0].mean())
    assert not any("not uniform" in w for w in rp.warnings)


@needs_obd
def test_obd_matches_obp_estimators():
    obp_ope = pytest.importorskip("obp.ope", reason="obp not importable here (the closed-form test still runs)")
    bts = _load_obd("bts")
    n, n_actions, len_list = bts["reward"].shape[0], 80, int(bts["position"].max()) + 1
    action_dist = np.full((n, n_actions, len_list), 1.0 / n_actions)
    kw = {"reward": bts["reward"], "action": bts["action"], "pscore": bts["pscore"], "action_dist": action_dist,
          "position": bts["position"]}
    pe = np.full(n, 1.0 / n_actions)
    ours_ips = ips(reward=bts["reward"], pscore=bts["pscore"], action_dist=pe).estimate
    ours_snips = snips(reward=bts["reward"], pscore=bts["pscore"], action_dist=pe).estimate
    assert ours_ips == pytest.approx(obp_ope.InverseProbabilityWeighting().estimate_policy_value(**kw), abs=1e-6)
    assert ours_snips == pytest.approx(
        obp_ope.SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(**kw), abs=1e-6)


# --------------------------------------------------------------------------------------------
# 3. interval coverage on simulated logs with a known true policy value
# --------------------------------------------------------------------------------------------

N_CTX, N_ACT, N_POS = 4, 5, 3


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


_world = np.random.default_rng(12345)
# known Bernoulli click model: q(x, a, pos) = base(x, a) · position bias(pos)
Q_TRUE = _world.uniform(0.05, 0.5, (N_CTX, N_ACT))[:, :, None] * np.array([1.0, 0.6, 0.3])  # (ctx, act, pos)
# stochastic logging policy (same at every slot) and a different, position-aware evaluation policy
PI_LOG = np.repeat(_softmax(0.5 * _world.normal(size=(N_CTX, N_ACT)))[:, None, :], N_POS, axis=1)  # (ctx, pos, act)
PI_EVAL = _softmax(1.5 * _world.normal(size=(N_CTX, N_POS, N_ACT)))
# deterministic policy for replay, evaluated on a second, uniformly-logged stream
EVAL_CHOICE = np.argmax(_world.normal(size=(N_CTX, N_POS, N_ACT)), axis=-1)  # (ctx, pos)
# contexts and positions are uniform, so the true values are plain averages over the 4 × 3 cells
V_TRUE = float(np.mean(np.einsum("xpa,xap->xp", PI_EVAL, Q_TRUE)))
V_TRUE_DET = float(np.mean(Q_TRUE[np.arange(N_CTX)[:, None], EVAL_CHOICE, np.arange(N_POS)[None, :]]))


def _simulate_log(rng: np.random.Generator, n: int, policy: np.ndarray):
    x = rng.integers(0, N_CTX, n)
    pos = rng.integers(0, N_POS, n)
    probs = policy[x, pos]  # (n, act)
    a = np.minimum((probs.cumsum(axis=1) < rng.random(n)[:, None]).sum(axis=1), N_ACT - 1)
    r = (rng.random(n) < Q_TRUE[x, a, pos]).astype(np.float64)
    return x, pos, a, r, probs[np.arange(n), a]


def _fit_reward_model(x: np.ndarray, a: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Per-(context, action) click rate, ignoring position (so misspecified); empty cells get the global rate."""
    clicks, shows = np.zeros((N_CTX, N_ACT)), np.zeros((N_CTX, N_ACT))
    np.add.at(clicks, (x, a), r)
    np.add.at(shows, (x, a), 1.0)
    return np.where(shows > 0, clicks / np.maximum(shows, 1.0), r.mean())


# Repetitions and threshold. Each repetition's interval covers the truth or not, so with true coverage p
# the observed coverage over REPS = 400 independent repetitions is Binomial(400, p)/400, sd = √(p(1−p)/400):
# 0.011 at p = 0.95, 0.013 at p = 0.93 (asymptotic intervals at n = 1000 run a little under nominal).
# Passing band [0.90, 0.99]:
#   * a correct interval fails with P ≈ Φ(−(0.95−0.90)/0.011) ≈ 3e-6 (≈ 1 % if its true coverage is 0.93),
#     and fails the upper bound with P ≈ Φ(−(0.99−0.95)/0.011) ≈ 1e-4;
#   * a broken one passes rarely: true coverage 0.85 → P ≈ Φ(−(0.90−0.85)/0.018) ≈ 0.3 %, 0.80 → ≈ 3e-7;
#     an interval twice too wide (coverage ≈ 0.9999) fails the upper bound.
# Everything is seeded, so the run is deterministic; the band is what keeps it robust to innocuous changes.
REPS, N_ROWS, N_BOOT = 400, 1000, 200
LOW, HIGH = 0.90, 0.99


@pytest.fixture(scope="module")
def coverage_runs() -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, float]]:
    """(estimator, ci method) → (estimates, covered flags, truth) over REPS seeded repetitions.

    DM is given the *true* reward model (correct, hence unbiased). DR, and a second DM ("dm_fitted"),
    are given a model fitted on an independent pilot log of the same logging policy: per-(context,
    action) click rates that ignore position, i.e. a noisy and misspecified q̂. DR stays unbiased
    because its propensities are right; DM's row-resampling interval ignores q̂'s error.
    """
    out: dict[tuple[str, str], tuple[list[float], list[bool], float]] = {}
    uniform = np.full_like(PI_LOG, 1.0 / N_ACT)
    for rep in range(REPS):
        rng = np.random.default_rng(rep)
        x, pos, a, r, ps = _simulate_log(rng, N_ROWS, PI_LOG)
        pe = PI_EVAL[x, pos, a]
        v_true = np.einsum("na,na->n", PI_EVAL[x, pos], Q_TRUE[x, :, pos])
        xp, _, ap, rp, _ = _simulate_log(rng, N_ROWS, PI_LOG)  # pilot log for the fitted model
        q_fit = _fit_reward_model(xp, ap, rp)
        v_fit = np.einsum("na,na->n", PI_EVAL[x, pos], q_fit[x])
        xu, pu, au, ru, psu = _simulate_log(rng, N_ROWS, uniform)  # uniform log for replay
        for method in ("bootstrap", "normal"):
            kw = {"ci": method, "n_bootstrap": N_BOOT, "seed": rep}
            results = {
                "replay": (replay(reward=ru, action=au, eval_action=EVAL_CHOICE[xu, pu], pscore=psu, **kw),
                           V_TRUE_DET),
                "ips": (ips(reward=r, pscore=ps, action_dist=pe, **kw), V_TRUE),
                "snips": (snips(reward=r, pscore=ps, action_dist=pe, **kw), V_TRUE),
                "dm": (dm(estimated_policy_value_per_row=v_true, **kw), V_TRUE),
                "dr": (dr(reward=r, pscore=ps, action_dist=pe, estimated_rewards=q_fit[x, a],
                          estimated_policy_value_per_row=v_fit, **kw), V_TRUE),
                "dm_fitted": (dm(estimated_policy_value_per_row=v_fit, **kw), V_TRUE),
            }
            for name, (res, truth) in results.items():
                est, cov, _ = out.setdefault((name, method), ([], [], truth))
                est.append(res.estimate)
                cov.append(res.ci_lo <= truth <= res.ci_hi)
    return {k: (np.array(e), np.array(c), t) for k, (e, c, t) in out.items()}


@pytest.mark.parametrize("method", ["bootstrap", "normal"])
@pytest.mark.parametrize("name", ["replay", "ips", "snips", "dm", "dr"])
def test_interval_coverage_on_simulated_logs(coverage_runs, name, method):
    estimates, covered, truth = coverage_runs[(name, method)]
    coverage = covered.mean()
    assert LOW <= coverage <= HIGH, f"{name}/{method}: coverage {coverage:.3f} over {REPS} reps"
    # and unbiased: the mean estimate is within 4 standard errors of the truth
    se_mean = estimates.std(ddof=1) / math.sqrt(REPS)
    assert abs(estimates.mean() - truth) < 4 * se_mean, f"{name}: mean {estimates.mean():.5f} vs truth {truth:.5f}"


# the check has power: DM with a fitted model gets an interval for the context/position sampling only,
# while q̂'s own error (a pilot log of 1000 rows) dominates, so it covers far less than 95 %
def test_dm_interval_ignores_reward_model_error(coverage_runs):
    _, covered, _ = coverage_runs[("dm_fitted", "bootstrap")]
    assert covered.mean() < LOW


# --------------------------------------------------------------------------------------------
# 4. generic checks, run for every estimator class (river's ``checks`` style)
# --------------------------------------------------------------------------------------------

ESTIMATOR_CLASSES: list[type[BaseOffPolicyEstimator]] = [Replay, IPS, SNIPS, DM, DR]
FUNCTIONS: dict[type[BaseOffPolicyEstimator], Callable[..., OPEResult]] = {
    Replay: replay, IPS: ips, SNIPS: snips, DM: dm, DR: dr}
MODEL_OFFSET = 0.15  # the reward model of the on-policy log is off by this everywhere


def _on_policy_log(n: int = 4000, seed: int = 5) -> dict[str, np.ndarray]:
    """Every array an estimator may ask for, for a log whose evaluation policy *is* the logging policy.

    π_e = π₀ (``action_dist`` = ``pscore``, so every importance weight is exactly 1), replay's
    deterministic choice is the logged action, and the reward model q̂ = q + MODEL_OFFSET is biased
    (DM is off by about the offset) but varies with the action, so DR's correction is not trivial.
    """
    rng = np.random.default_rng(seed)
    n_ctx, n_act = 6, 5
    pi = _softmax(rng.normal(size=(n_ctx, n_act)))
    q = rng.uniform(0.05, 0.6, (n_ctx, n_act))
    x = rng.integers(0, n_ctx, n)
    a = np.minimum((pi[x].cumsum(axis=1) < rng.random(n)[:, None]).sum(axis=1), n_act - 1)
    q_hat = q + MODEL_OFFSET
    return {
        "reward": (rng.random(n) < q[x, a]).astype(np.float64),
        "action": a,
        "eval_action": a,
        "position": rng.integers(0, 3, n),
        "pscore": pi[x, a],
        "action_dist": pi[x, a],
        "estimated_rewards": q_hat[x, a],
        "estimated_policy_value_per_row": np.einsum("na,na->n", pi[x], q_hat[x]),
    }


ON_POLICY = _on_policy_log()


def _arrays(cls: type[BaseOffPolicyEstimator], log: dict[str, np.ndarray]) -> dict[str, Any]:
    """The per-row arrays ``cls`` declares as fields, taken from ``log`` (typed Any: they go to any subclass)."""
    return {f.name: log[f.name] for f in dataclasses.fields(cls) if f.name in log}


def check_returns_a_result_whose_interval_holds_the_estimate(cls: type[BaseOffPolicyEstimator]) -> None:
    arrays = _arrays(cls, ON_POLICY)
    n = ON_POLICY["reward"].shape[0]
    for ci in ("bootstrap", "normal"):
        res = cls(**arrays, ci=ci, n_bootstrap=200, seed=1).estimate()
        assert isinstance(res, OPEResult)
        assert res.estimator == cls.name and res.ci_method == ci and res.n == n
        assert math.isfinite(res.estimate) and res.ci_lo < res.estimate < res.ci_hi, (ci, res)
        assert 0.0 < res.ess <= n * (1 + 1e-12)


def check_the_function_is_a_thin_wrapper(cls: type[BaseOffPolicyEstimator]) -> None:
    arrays = _arrays(cls, ON_POLICY)
    via_class = cls(**arrays, n_bootstrap=100, seed=3).estimate()
    assert FUNCTIONS[cls](**arrays, n_bootstrap=100, seed=3) == via_class


def check_bad_arguments_raise_naming_them(cls: type[BaseOffPolicyEstimator]) -> None:
    arrays = _arrays(cls, ON_POLICY)
    n = ON_POLICY["reward"].shape[0]
    assert arrays, f"{cls.__name__} declares no per-row array"
    for name, arr in arrays.items():
        if len(arrays) > 1:  # DM's single array has nothing to disagree with
            with pytest.raises(ValueError, match=rf"must have the same length, but have .*\b{name} \({n - 1}\)"):
                cls(**(arrays | {name: arr[:-1]}))
        with pytest.raises(ValueError, match=rf"^{name} must not be empty"):
            cls(**(arrays | {name: arr[:0]}))
        with pytest.raises(ValueError, match=rf"^{name} must be 1-dimensional"):
            cls(**(arrays | {name: arr.reshape(-1, 1)}))
    for bad, match in (({"alpha": 1.5}, "alpha must be"), ({"ci": "wald"}, "ci must be"),
                       ({"n_bootstrap": 0}, "n_bootstrap must be"), ({"seed": "x"}, "seed must be")):
        with pytest.raises(ValueError, match=f"^{match}"):
            cls(**arrays, **bad).estimate()


def check_on_policy_recovers_the_logged_mean(cls: type[BaseOffPolicyEstimator]) -> None:
    arrays = _arrays(cls, ON_POLICY)
    if "reward" not in arrays:
        pytest.skip(f"{cls.__name__} does not read the logged rewards")
    logged_mean = float(ON_POLICY["reward"].mean())
    res = cls(**arrays, ci="normal").estimate()
    assert res.ci_lo <= logged_mean <= res.ci_hi
    if "estimated_rewards" in arrays:
        # DR: the weights are 1, so V̂ − mean(r) = mean(v̂_i − q̂(a_i)), zero-mean noise (sd ≈ 0.002 here); without
        # the correction term it would be off by about MODEL_OFFSET
        assert res.estimate == pytest.approx(logged_mean, abs=0.01)
    else:
        # every weight (or match) is exactly 1: replay, IPS and SNIPS are then the plain mean of the rewards
        assert res.estimate == pytest.approx(logged_mean, rel=1e-12)


CHECKS = [
    check_returns_a_result_whose_interval_holds_the_estimate,
    check_the_function_is_a_thin_wrapper,
    check_bad_arguments_raise_naming_them,
    check_on_policy_recovers_the_logged_mean,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("cls", ESTIMATOR_CLASSES, ids=lambda c: c.__name__)
def test_estimator_checks(cls, check):
    check(cls)


def test_every_estimator_class_is_checked():
    def concrete(base: type) -> set[type]:
        subs: set[type] = set(base.__subclasses__())
        return {c for c in subs | {d for s in subs for d in concrete(s)} if not getattr(c, "__abstractmethods__", None)}

    assert concrete(BaseOffPolicyEstimator) == set(ESTIMATOR_CLASSES) == set(FUNCTIONS)


# SNIPS divides by Σw where IPS divides by n: with weights whose mean is exactly 1 (dyadic, so Σw = n in
# floating point) the two estimates are the same number. (Their normal intervals differ: SNIPS's delta
# method takes residuals a_i − V̂ w_i, IPS's a_i − V̂.)
def test_snips_equals_ips_when_the_weights_average_one():
    rng = np.random.default_rng(8)
    d = rng.choice([0.0, 0.25, 0.5, 0.75], 100)
    w = np.concatenate([1 - d, 1 + d])  # pairs around 1: Σw = 200 exactly
    pscore = rng.choice([0.25, 0.5], 200)
    action_dist = w * pscore  # exact: dyadic times dyadic, and ≤ 1.75 · 0.5 < 1
    reward = (rng.random(200) < 0.4).astype(np.float64)
    assert np.array_equal(action_dist / pscore, w) and w.sum() == 200.0 and w.std() > 0.2
    kw = {"reward": reward, "pscore": pscore, "action_dist": action_dist}
    a, b = ips(**kw), snips(**kw)
    assert a.estimate == b.estimate == float(np.sum(w * reward)) / 200
    assert a.ess == b.ess and a.warnings == b.warnings == []
    # and the test has power: scale the evaluation probabilities so the weights average 0.5, and they part
    half = {**kw, "action_dist": action_dist / 2}
    assert snips(**half).estimate == pytest.approx(2 * ips(**half).estimate) and ips(**half).estimate > 0
