"""Replay parsers: order and content of the events for every format, bad rows, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmrstream.contracts import Click, Codec, Impression, encode
from dmrstream.settings import LimitSettings
from replay.generic import ColumnMap
from replay.records import BadRows, ReplayError
from replay.runner import flatten
from replay.sources import ReplayOptions, open_sources

LIMITS = LimitSettings()


def replay(paths, **opts):
    bad = BadRows(strict=opts.pop("strict", False))
    records, infos = open_sources([Path(p) for p in paths], ReplayOptions(**opts), bad, LIMITS)
    events = list(flatten(records))
    return events, bad, infos


def brief(ev):
    kind = "c" if isinstance(ev, Click) else ("n" if ev.sampled else "i")
    return kind, ev.user_id, ev.item_id, ev.category_id, ev.ts


def assert_valid_contracts(events):
    """Everything replay sends passes the streamer's strict decoder."""
    codecs = {Impression: Codec(Impression, LIMITS), Click: Codec(Click, LIMITS)}
    for ev in events:
        assert codecs[type(ev)].decode(encode(ev)) == ev


def assert_time_ordered(events):
    ts = [e.ts for e in events]
    assert ts == sorted(ts)


# ---------------------------------------------------------------- MovieLens

def test_movielens_real_data(movielens_dir):
    events, bad, infos = replay([movielens_dir])
    imps = [e for e in events if isinstance(e, Impression)]
    clicks = [e for e in events if isinstance(e, Click)]
    assert (len(imps), bad.count) == (100_000, 0)
    assert 0.54 < len(clicks) / len(imps) < 0.56  # "55 % of events are clicks" (ratings >= 4)
    assert_time_ordered(events)
    assert infos[0].kind == "movielens" and infos[0].order == "sorted in memory"
    # The earliest rating in ml-100k: user 259, "Truth About Cats & Dogs" (Comedy Romance), rating 4.
    first, second = events[0], events[1]
    assert brief(first) == ("i", 259, 255, "Comedy", 874_724_710_000)
    assert first.user_profile == {"age": 20, "gender": "M", "occupation": "student"}
    assert first.item_features == {"genres": "Comedy Romance", "year": "1997"}
    assert isinstance(second, Click) and second.request_id == first.request_id and second.ts == first.ts
    assert first.event_id.endswith(":i") and second.event_id == first.event_id[:-1] + "c"
    # Every click comes right after its own impression.
    for i, ev in enumerate(events):
        if isinstance(ev, Click):
            assert events[i - 1].request_id == ev.request_id
    assert len({e.event_id for e in events}) == len(events)
    assert_valid_contracts(events[:2000])


def test_movielens_click_threshold(movielens_dir):
    events, _, _ = replay([movielens_dir], click_threshold=5)
    assert sum(isinstance(e, Click) for e in events) == 21_201  # ratings of 5 in ml-100k


def write_grouplens(d: Path) -> Path:
    d.mkdir()
    (d / "u.data").write_text("1\t10\t5\t881250949\n2\t20\t3\t881250900\n1\t20\tx\t881250950\n"
                              "2\t10\t4\t881250949\n3\t10\n")
    flags = ["0"] * 19
    flags[1] = flags[16] = "1"  # Action, Thriller
    item10 = "|".join(["10", "Heat (1995)", "15-Dec-1995", "", "http://x"] + flags)
    flags = ["0"] * 19
    flags[7] = "1"  # Documentary
    item20 = "|".join(["20", "Caf\xe9 (1996)", "01-Jan-1996", "", "http://y"] + flags)
    (d / "u.item").write_bytes((item10 + "\n" + item20 + "\n").encode("latin-1"))
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    return d


def test_grouplens_layout_with_bad_rows(tmp_path):
    events, bad, _ = replay([write_grouplens(tmp_path / "ml")])
    assert [brief(e) for e in events] == [
        ("i", 2, 20, "Documentary", 881_250_900_000),
        ("i", 1, 10, "Action", 881_250_949_000), ("c", 1, 10, "Action", 881_250_949_000),  # line 1
        ("i", 2, 10, "Action", 881_250_949_000), ("c", 2, 10, "Action", 881_250_949_000),  # line 4: tie -> row
    ]
    assert events[1].item_features == {"genres": "Action Thriller", "year": "1995"}
    assert events[1].user_profile == {"age": 20, "gender": "M", "occupation": "technician"}
    assert events[1].event_id == "u.data:1:i" and events[3].event_id == "u.data:4:i"
    assert bad.count == 2 and [line for _, line, _ in bad.first] == [3, 5]
    assert "not numeric" in bad.first[0][2]


# ---------------------------------------------------------------- Taobao UserBehavior

TAOBAO = """1,100,10,pv,1511544070
1,101,11,pv,1511544000
2,100,10,cart,1511544100
2,200,20,buy,1511544100
3,300,30,zz,1511544100
3,300,30,pv,abc
3,300
3,300,30,pv,12
2,102,10,pv,1511544200
2,103,12,fav,1511544300
"""


def test_taobao_order_content_and_bad_rows(tmp_path):
    f = tmp_path / "UserBehavior.csv"
    f.write_text(TAOBAO)
    events, bad, infos = replay([f])
    assert infos[0].kind == "taobao"
    assert [(brief(e), getattr(e, "behavior", None)) for e in events] == [
        (("i", 1, 101, 11, 1_511_544_000_000), None), (("c", 1, 101, 11, 1_511_544_000_000), "click"),
        (("i", 1, 100, 10, 1_511_544_070_000), None), (("c", 1, 100, 10, 1_511_544_070_000), "click"),
        (("c", 2, 100, 10, 1_511_544_100_000), "cart"), (("c", 2, 200, 20, 1_511_544_100_000), "buy"),
        (("i", 2, 102, 10, 1_511_544_200_000), None), (("c", 2, 102, 10, 1_511_544_200_000), "click"),
        (("c", 2, 103, 12, 1_511_544_300_000), "fav"),
    ]
    assert events[4].request_id is None  # behaviours other than pv belong to no impression
    assert bad.count == 4 and [line for _, line, _ in bad.first] == [5, 6, 7, 8]
    assert "unknown behavior" in bad.first[0][2] and "outside 1990..2100" in bad.first[3][2]
    assert_valid_contracts(events)


def test_taobao_sampled_negatives(tmp_path):
    f = tmp_path / "UserBehavior.csv"
    f.write_text(TAOBAO)
    events, _, _ = replay([f], negatives=3, seed=7)
    again, _, _ = replay([f], negatives=3, seed=7)
    assert [encode(e) for e in events] == [encode(e) for e in again]
    negs = [e for e in events if isinstance(e, Impression) and e.sampled]
    # The first pv has no earlier pv item to draw from; the others get 3 each, except draws
    # that hit the positive item twice (item 101 is the only pool item for the second pv).
    pv_items = {101: 11, 100: 10, 102: 10}
    assert negs and all(n.item_id in pv_items and n.category_id == pv_items[n.item_id] for n in negs)
    for i, ev in enumerate(events):
        if isinstance(ev, Impression) and ev.sampled:
            pos = next(e for e in reversed(events[:i]) if isinstance(e, Impression) and not e.sampled)
            assert (ev.user_id, ev.ts) == (pos.user_id, pos.ts) and ev.item_id != pos.item_id
            assert ev.event_id.startswith(pos.request_id + ":n") and ev.request_id == ev.event_id
    assert len(negs) == 6  # second pv: 3 draws of 101; third pv (item 102): 3 draws from {101, 100}
    assert len({e.event_id for e in events}) == len(events)
    assert_valid_contracts(events)


# ---------------------------------------------------------------- Alimama raw files

def write_alimama(d: Path) -> Path:
    d.mkdir()
    (d / "raw_sample.csv").write_text(
        "user,time_stamp,adgroup_id,pid,nonclk,clk\n"
        "581738,1494137644,1,430548_1007,1,0\n"
        "449818,1494638778,3,430548_1007,0,1\n"
        "914836,1494650879,4,430539_1007,1,0\n"
        "914836,1494651029,5,430548_1007,1,2\n"  # clk=2: bad
        "914836,notatime,5,430548_1007,1,0\n"  # bad ts
        "1,1494137644,999,430548_1007,1,0\n")  # ad group without features
    (d / "ad_feature.csv").write_text(
        "adgroup_id,cate_id,campaign_id,customer,brand,price\n"
        "1,6406,83237,1,95471,170.0\n3,1665,167335,62,NULL,68.0\n4,7954,7954,88,54,9.9\n")
    (d / "user_profile.csv").write_text(
        "userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,occupation,"
        "new_user_class_level \n"
        "581738,0,1,2,1,,3,0,\n449818,0,5,2,5,2,3,0,3\n")
    (d / "behavior_log.csv").write_text(
        "user,time_stamp,btag,cate,brand\n"
        "581738,1494137000,pv,6406,95471\n"
        "581738,1494137644,cart,6406,95471\n"
        "449818,1494638700,buy,1665,NULL\n"
        "449818,1494638701,share,1665,1\n")  # unknown btag: bad
    return d


def test_alimama_directory_merges_both_logs(tmp_path):
    events, bad, infos = replay([write_alimama(tmp_path / "ali")])
    assert [i.kind for i in infos] == ["alimama-raw", "alimama-behavior"]
    assert [(brief(e), getattr(e, "behavior", None)) for e in events] == [
        (("c", 581738, "brand:95471", 6406, 1_494_137_000_000), "click"),
        (("i", 581738, 1, 6406, 1_494_137_644_000), None),  # same ts: raw_sample (source 0) first
        (("i", 1, 999, "unknown", 1_494_137_644_000), None),
        (("c", 581738, "brand:95471", 6406, 1_494_137_644_000), "cart"),
        (("c", 449818, "brand:unknown", 1665, 1_494_638_700_000), "buy"),
        (("i", 449818, 3, 1665, 1_494_638_778_000), None), (("c", 449818, 3, 1665, 1_494_638_778_000), "click"),
        (("i", 914836, 4, 7954, 1_494_650_879_000), None),
    ]
    imp = events[1]
    assert imp.context == {"pid": "430548_1007"}
    assert imp.item_features == {"campaign_id": 83237, "customer": 1, "brand": 95471, "price": 170.0}
    assert imp.user_profile == {"cms_segid": 0, "cms_group_id": 1, "final_gender_code": 2, "age_level": 1,
                                "shopping_level": 3, "occupation": 0}
    assert events[5].item_features == {"campaign_id": 167335, "customer": 62, "price": 68.0}
    assert events[6].request_id == events[5].request_id == "raw_sample.csv:3"
    assert bad.count == 3
    assert [(t, line) for t, line, _ in bad.first] == [("raw_sample.csv", 5), ("raw_sample.csv", 6),
                                                      ("behavior_log.csv", 5)]
    assert_valid_contracts(events)


def test_strict_aborts_at_first_bad_row(tmp_path):
    with pytest.raises(ReplayError, match="raw_sample.csv:5"):
        replay([write_alimama(tmp_path / "ali") / "raw_sample.csv"], strict=True)


# ---------------------------------------------------------------- generic formats

ROWS = [  # user, item, cat, time, clk, price
    ("u1", 7, 3, "2024-01-01T00:00:05", 1, 9.5),
    ("u2", 8, 3, "2024-01-01T00:00:01", 0, 1.0),
    ("u1", 9, 4, "2024-01-01T00:00:05", 0, 2.0),
]
MAP = ["user=uid", "item=iid", "category=cid", "ts=time", "label=clk", "item_features=price"]
EXPECTED = [("i", "u2", 8, 3, 1_704_067_201_000), ("i", "u1", 7, 3, 1_704_067_205_000),
            ("c", "u1", 7, 3, 1_704_067_205_000), ("i", "u1", 9, 4, 1_704_067_205_000)]


def test_generic_csv_with_mapping_and_bad_rows(tmp_path):
    f = tmp_path / "log.csv"
    lines = ["uid,iid,cid,time,clk,price"] + [",".join(map(str, r)) for r in ROWS]
    lines += ["u3,10,3,yesterday,0,1.0", "u3,10,3", "u3,,3,2024-01-01T00:00:09,0,1", "u4,11,3,2024-01-01T00:00:09,x,1"]
    f.write_text("\n".join(lines) + "\n")
    events, bad, _ = replay([f], mapping=ColumnMap.build(pairs=MAP))
    assert [brief(e) for e in events] == EXPECTED
    assert events[1].item_features == {"price": 9.5} and events[1].event_id == "log.csv:2:i"
    assert events[2].request_id == events[1].request_id
    assert bad.count == 4 and [line for _, line, _ in bad.first] == [5, 6, 7, 8]
    assert_valid_contracts(events)


def test_generic_behavior_column_and_mapping_file(tmp_path):
    f = tmp_path / "log.csv"
    f.write_text("u;i;c;t;kind;rid\n1;5;2;1700000000;show;r1\n1;5;2;1700000003;click;r1\n1;6;2;1700000004;buy;\n"
                 "1;6;2;1700000005;hover;\n")
    m = tmp_path / "map.toml"
    m.write_text('user = "u"\nitem = "i"\ncategory = "c"\nts = "t"\nts_unit = "s"\nbehavior = "kind"\n'
                 'request_id = "rid"\ndelimiter = ";"\n')
    events, bad, _ = replay([f], mapping=ColumnMap.build(m))
    assert [(brief(e), e.request_id) for e in events] == [
        (("i", 1, 5, 2, 1_700_000_000_000), "r1"), (("c", 1, 5, 2, 1_700_000_003_000), "r1"),
        (("c", 1, 6, 2, 1_700_000_004_000), None)]
    assert events[2].behavior == "buy"
    assert bad.count == 1 and "hover" in bad.first[0][2]


def test_generic_jsonl(tmp_path):
    f = tmp_path / "log.jsonl"
    rows = [dict(zip(("uid", "iid", "cid", "time", "clk", "price"), r)) for r in ROWS]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n[1]\n")
    events, bad, infos = replay([f], mapping=ColumnMap.build(pairs=MAP))
    assert infos[0].kind == "jsonl"
    assert [brief(e) for e in events] == EXPECTED
    assert bad.count == 2 and [line for _, line, _ in bad.first] == [4, 5]


def test_generic_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "log.parquet"
    cols = list(zip(*ROWS))
    table = pa.table({"uid": list(cols[0]), "iid": list(cols[1]), "cid": list(cols[2]),
                      "time": [1_704_067_205_000, 1_704_067_201_000, 1_704_067_205_000],
                      "clk": list(cols[4]), "price": list(cols[5])})
    pq.write_table(table, f)
    events, bad, _ = replay([f], mapping=ColumnMap.build(pairs=MAP + ["ts_unit=ms"]))
    assert [brief(e) for e in events] == EXPECTED
    assert events[1].event_id == "log.parquet:1:i" and bad.count == 0


def test_unknown_mapping_key_is_refused():
    with pytest.raises(ValueError, match="unknown mapping key"):
        ColumnMap.build(pairs=["usr=uid"])


# ---------------------------------------------------------------- determinism, merge, windows

def test_same_replay_twice_gives_identical_ids(tmp_path):
    ali = write_alimama(tmp_path / "ali")
    taobao = tmp_path / "UserBehavior.csv"
    taobao.write_text(TAOBAO)
    first, _, _ = replay([ali, taobao], negatives=2)
    second, _, _ = replay([ali, taobao], negatives=2)
    assert [e.event_id for e in first] == [e.event_id for e in second]
    assert len({e.event_id for e in first}) == len(first)


def test_files_merge_in_event_time_with_stable_ties(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b" / "a.csv"
    b.parent.mkdir()
    a.write_text("user_id,item_id,category_id,ts\n1,1,1,1700000002\n1,2,1,1700000001\n")
    b.write_text("user_id,item_id,category_id,ts\n2,3,1,1700000001\n2,4,1,1700000003\n")
    events, _, infos = replay([a, b])
    assert [(e.item_id, e.event_id) for e in events] == [(2, "a.csv:3:i"), (3, "a.csv#2:2:i"), (1, "a.csv:2:i"),
                                                         (4, "a.csv#2:3:i")]
    assert [i.order for i in infos] == ["sorted in memory", "in order"]


def test_presorted_streams_and_drops_out_of_order_rows(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text("user_id,item_id,category_id,ts\n1,1,1,1700000002\n1,2,1,1700000001\n1,3,1,1700000003\n")
    events, bad, _ = replay([f], presorted=True)
    assert [e.item_id for e in events] == [1, 3]
    assert bad.count == 1 and bad.first[0][1] == 3 and "out of event-time order" in bad.first[0][2]


def test_from_until_window(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text("user_id,item_id,category_id,ts\n" + "".join(f"1,{i},1,{1700000000 + i}\n" for i in range(10)))
    events, _, _ = replay([f], from_ms=1_700_000_003_000, until_ms=1_700_000_006_000)
    assert [e.item_id for e in events] == [3, 4, 5]


def test_movielens_features_agree_with_the_trainers_offline_importer(movielens_dir):
    """Online (replay) and offline (trainer importer) MovieLens events carry the same category,
    item features and user profile, so a model trained on one reads the other the same way."""
    importers = pytest.importorskip("trainer.importers")
    if not hasattr(importers, "movielens_samples"):
        pytest.skip("trainer importer not available")
    samples = importers.movielens_samples(movielens_dir, limit=3000)
    events, _, _ = replay([movielens_dir])
    imps = [e for e in events if isinstance(e, Impression)][:3000]
    for imp, s in zip(imps, samples):
        assert (imp.user_id, imp.item_id, imp.ts) == (s.user_id, s.item_id, s.ts)
        assert (imp.category_id, imp.item_features, imp.user_profile) == (s.category_id, s.item_features,
                                                                           s.user_profile)
