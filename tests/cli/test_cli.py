"""The `privads` CLI against a real broker: produce validates line by line; failures are one line, non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import read_topic
from privads.infra import records
from privads.infra.processes import free_port

pytestmark = pytest.mark.integration


def privads(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "privads", *args], env={**os.environ, **(env or {})},
                          input=stdin, capture_output=True, timeout=120)


def test_produce_skips_invalid_lines_with_their_numbers(infra, tmp_path) -> None:
    good = {"ad_id": "ad-1", "text": "trail running shoes", "bid": 0.7, "category": "running", "extra": 1}
    lines = [json.dumps(good), "{broken", json.dumps({"ad_id": "ad-2", "text": "x", "bid": -3}), "",
             json.dumps({**good, "ad_id": "ad-3"})]
    f = tmp_path / "ads.jsonl"
    f.write_text("\n".join(lines) + "\n")
    r = privads("produce", records.ADS, str(f), env={"PRIVADS_KAFKA": infra.kafka, "PRIVADS_REDIS": infra.redis_url})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"topic": records.ADS, "produced": 2, "invalid": 2}
    err = r.stderr.decode()
    assert "line 2: not JSON" in err and "line 3:" in err and "bid" in err
    produced = read_topic(infra.kafka, records.ADS)
    assert sorted(m["ad_id"] for m in produced) == ["ad-1", "ad-3"]
    assert produced[0]["extra"] == 1  # unknown fields are kept


def test_produce_from_stdin(infra) -> None:
    line = json.dumps({"event_id": "e-1", "ts": 1.0, "impression_id": "i", "user_id": "u", "ad_id": "a"})
    r = privads("produce", records.CLICKS, env={"PRIVADS_KAFKA": infra.kafka}, stdin=(line + "\n").encode())
    assert r.returncode == 0 and json.loads(r.stdout)["produced"] == 1


@pytest.mark.parametrize("args", [["produce", "no.such.topic"], ["produce", "privads.ads", "/no/such/file"]])
def test_failures_exit_non_zero_with_one_line(infra, args: list[str]) -> None:
    r = privads(*args, env={"PRIVADS_KAFKA": infra.kafka})
    assert r.returncode != 0
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("privads produce:")


def test_commands_say_when_nothing_is_running(tmp_path) -> None:
    port = free_port()
    r = privads("train", env={"PRIVADS_KAFKA": "", "PRIVADS_REDIS": "", "PRIVADS_EMBEDDED_KAFKA_PORT": str(port)})
    assert r.returncode != 0
    assert "no embedded broker is running" in r.stderr.decode().strip()


def test_bench_policies_prints_one_json_object_and_draws_the_plot(tmp_path) -> None:
    plot = tmp_path / "policies.png"
    env = {**os.environ, "PRIVADS_DATA": str(tmp_path / "data")}
    proc = privads("bench", "policies", "--users", "30", "--ads", "30", "--requests", "600",
                   "--policies", "privads,random,vowpalwabbit", "--plot", str(plot), env=env)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = json.loads(proc.stdout)
    assert set(out["policies"]) == {"privads", "random", "vowpalwabbit"} and out["requests"] == 600
    for r in out["policies"].values():
        assert len(r["curve"]) == len(out["requests_at"]) and r["seconds"] >= 0
    assert out["policies"]["privads"]["efficiency"] > out["policies"]["random"]["efficiency"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    bad = privads("bench", "policies", "--policies", "privads,magic", env=env)
    lines = bad.stderr.decode().strip().splitlines()
    assert bad.returncode != 0 and len(lines) == 1 and "unknown policy 'magic'" in lines[0], lines


def test_long_commands_report_progress_on_stderr_and_quiet_silences_it(infra, tmp_path) -> None:
    ads = [{"ad_id": f"p-{i}", "text": f"progress ad {i}", "bid": 1.0, "category": "c"} for i in range(3000)]
    f = tmp_path / "many.jsonl"
    f.write_text("".join(json.dumps(a) + "\n" for a in ads))
    env = {"PRIVADS_KAFKA": infra.kafka, "PRIVADS_REDIS": infra.redis_url}
    loud = privads("produce", records.ADS, str(f), env=env)
    assert loud.returncode == 0, loud.stderr
    # the result alone on stdout, one JSON object
    assert json.loads(loud.stdout) == {"topic": records.ADS, "produced": 3000, "invalid": 0}
    err = loud.stderr.decode()
    # what it is doing, how far (the file's bytes, to 100%), the rate, and the counts so far
    assert f"produce {records.ADS}: 100%" in err and "B/s" in err and "produced=3000" in err, err
    quiet = privads("produce", records.ADS, str(f), "--quiet", env=env)
    assert quiet.returncode == 0 and json.loads(quiet.stdout)["produced"] == 3000
    assert f"produce {records.ADS}" not in quiet.stderr.decode()  # (kafka-python's own warnings stay)
