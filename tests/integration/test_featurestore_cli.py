"""``dmrstream features show|stats`` over real partition stores."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from dmrstream.cli import app
from dmrstream.contracts import Click, Impression
from dmrstream.settings import load_settings
from featurestore import open_partition_store

T0 = 1_700_000_000_000


def test_show_and_stats(tmp_path):
    settings = load_settings(overrides={"state_dir": str(tmp_path)})
    with open_partition_store(settings, 0) as s0, open_partition_store(settings, 3) as s3:
        s0.apply([Click(event_id="a", user_id=42, item_id=7, category_id=1, ts=T0),
                  Click(event_id="b", user_id=42, item_id=8, category_id="x", ts=T0 + 5, behavior="buy"),
                  Impression(event_id="c", user_id=42, item_id=8, category_id="x", ts=T0 + 9)],
                 offsets={("t.clicks", 0): 2})
        s3.apply([Click(event_id="d", user_id="bob", item_id=1, category_id=1, ts=T0)])
    run = CliRunner().invoke
    base = ["--set", f"state_dir={tmp_path}", "features"]

    res = run(app, [*base, "show", "42", "--json"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output)
    assert shown["partition"] == 0 and shown["user_id"] == 42
    assert [(b["item_id"], b["behavior"]) for b in shown["sequence"]] == [(7, "click"), (8, "buy")]
    assert shown["counters"] == {"user_impressions": 1.0, "user_clicks": 1.0}

    res = run(app, [*base, "show", "bob"])
    assert res.exit_code == 0 and "partition 3" in res.output and "click" in res.output
    assert run(app, [*base, "show", "bob", "--partition", "0"]).exit_code == 1
    assert run(app, [*base, "show", "nobody"]).exit_code == 1

    res = run(app, [*base, "stats", "--json"])
    rows = {r["partition"]: r for r in json.loads(res.output)}
    assert rows[0]["users"] == 1 and rows[0]["items"] == 2 and rows[3]["users"] == 1
    assert rows[0]["offsets"] == {"t.clicks[0]": 2}
    assert rows[0]["bytes_on_disk"] > 0
    assert "total" in run(app, [*base, "stats"]).output
