"""Attacks on the model store and on model updates against a RUNNING scorer that serves a good
version: pickle payloads (pickle bytes and a torch ``.pt`` file where safetensors belong, with a
payload that would leave a mark if it were ever unpickled), path traversal / absolute / ``file://``
URIs (one pointing at a perfectly valid model outside the store), a sha256 mismatch, truncated and
oversized (sparse 8 GiB) files, shape bombs (a header declaring 2^31 x 2^31, a header length of
2^62, a tensor shaped wrong for the model), unknown and wrong dtypes, a delta whose base is
missing, NaN weights, and malformed model-update messages. Every one is refused (counted in
``dmrstream_scorer_refusals_total`` / ``dmrstream_dead_letters_total``) and dead-lettered with its
reason; the serving version does not change; the scorer keeps answering and still swaps in the
next good version. Unit-level tests cover ``trainer/modelstore.py``'s checks directly.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from dmrstream.contracts import Codec, ModelUpdate, Score, decode_dead_letter, encode  # noqa: E402
from dmrstream.kafkaio import create_topics, make_producer  # noqa: E402
from test_hostile_input import TopicReader, _cli, _free_port, _metric, _settings, _start, _stop  # noqa: E402
from trainer import modelstore  # noqa: E402
from trainer.modelstore import ModelStore, ModelStoreError, apply_delta, sha256_of, split_delta  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.kafka]

T0 = 1_700_000_000_000


class Mark:
    """A pickle payload that creates a directory when unpickled: proof it never ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _header_file(header: dict, data: bytes = b"\0" * 16) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _state(settings) -> dict[str, torch.Tensor]:
    from trainer.model import build_model

    return {k: v.detach().clone() for k, v in build_model(settings, settings.scorer.model_kind).state_dict().items()}


# -- unit level: trainer/modelstore.py ---------------------------------------------------------
@pytest.fixture
def store(tmp_path):
    st = ModelStore(str(tmp_path / "models"))
    tensors = {"emb.weight": torch.randn(16, 4), "lin.weight": torch.randn(3, 4)}
    st.publish(1, "full", tensors, base_version=None, trained_until_ts=T0, samples_seen=1)
    return st


@pytest.mark.parametrize("uri", [
    "../../etc/passwd", "/etc/passwd", "file:///etc/passwd", "v00000001.full.safetensors/../../../etc/passwd",
    "..\\..\\v00000001.full.safetensors", "%2e%2e%2fv00000001.full.safetensors", "v00000001.full.safetensors\x00.pkl",
    "v00000001.full.pt", "v00000001.full.pkl", "v1.full.safetensors", "sub/v00000001.full.safetensors",
    "s3://bucket/v00000001.full.safetensors", "", ".", "v00000001.json", "ROOT/../outside/v00000001.full.safetensors",
    "file://ROOT/v00000001.full.safetensors", "ROOT/v00000001.full.safetensors/..", "v00000001.full.safetensors\n"])
def test_resolve_refuses_uris_outside_the_store(store, uri):
    with pytest.raises(ModelStoreError, match="^uri"):
        store.resolve(uri.replace("ROOT", store.root))


def test_resolve_accepts_the_store_s_own_files(store):
    assert store.resolve(store.root + "/v00000001.full.safetensors") == "v00000001.full.safetensors"
    assert store.resolve("v00000002.delta.safetensors") == "v00000002.delta.safetensors"


def _plant(store: ModelStore, name: str, data: bytes) -> str:
    Path(store.path, name).write_bytes(data)
    return sha256_of(data)


@pytest.mark.parametrize("attack", ["pickle", "torch_pt", "truncated", "shape_bomb", "header_length_bomb",
                                    "unknown_dtype", "overlapping_offsets", "empty", "json_only"])
def test_read_verified_refuses_what_is_not_safetensors(store, tmp_path, attack):
    marker = tmp_path / "unpickled"
    good = Path(store.path, "v00000001.full.safetensors").read_bytes()
    buf = io.BytesIO()
    torch.save({"emb.weight": torch.randn(16, 4), "mark": Mark(str(marker))}, buf)
    data = {
        "pickle": pickle.dumps({"emb.weight": Mark(str(marker))}),
        "torch_pt": buf.getvalue(),
        "truncated": good[: len(good) - 7],
        "shape_bomb": _header_file({"emb.weight": {"dtype": "F32", "shape": [1 << 31, 1 << 31], "data_offsets": [0, 16]}}),
        "header_length_bomb": struct.pack("<Q", 1 << 62) + b"{}",
        "unknown_dtype": _header_file({"emb.weight": {"dtype": "Q9", "shape": [2, 2], "data_offsets": [0, 16]}}),
        "overlapping_offsets": _header_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                             "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}),
        "empty": b"",
        "json_only": b'{"emb.weight": [1, 2, 3]}',
    }[attack]
    sha = _plant(store, "v00000002.full.safetensors", data)
    with pytest.raises(ModelStoreError, match="^format"):
        store.read_verified("v00000002.full.safetensors", sha)
    assert not marker.exists(), "a pickle payload was executed"


def test_read_verified_refuses_checksum_mismatch_missing_and_oversized_files(store, monkeypatch):
    meta = store.meta(1)
    with pytest.raises(ModelStoreError, match="^sha256"):
        store.read_verified(meta.file, "f" * 64)
    with pytest.raises(ModelStoreError, match="^missing"):
        store.read_verified("v00000009.full.safetensors", meta.sha256)
    # a sparse file just over the limit: refused by its size, before a byte is read
    big = Path(store.path, "v00000003.full.safetensors")
    with open(big, "wb") as f:
        f.truncate(modelstore.MAX_FILE_BYTES + 1)
    with pytest.raises(ModelStoreError, match="^size"):
        store.read_verified(big.name, "0" * 64)
    big.unlink()


def test_delta_with_missing_base_or_rows_outside_the_table_is_refused(store):
    base = store.read_verified(store.meta(1).file, store.meta(1).sha256)
    delta = split_delta(base, {"emb.weight": torch.tensor([1, 3])}, ["emb.weight"])
    store.publish(3, "delta", delta, base_version=2, trained_until_ts=T0, samples_seen=2)  # v2 does not exist
    with pytest.raises(ModelStoreError, match="^missing"):
        store.load(3)
    for rows in (torch.tensor([16]), torch.tensor([-1]), torch.tensor([1 << 40])):
        bad = {"emb.weight::rows": rows, "emb.weight::values": torch.zeros(1, 4), "lin.weight": base["lin.weight"]}
        with pytest.raises(ModelStoreError, match="^shape"):
            apply_delta(base, bad)
    with pytest.raises(ModelStoreError, match="^shape"):  # values of the wrong width
        apply_delta(base, {"emb.weight::rows": torch.tensor([1]), "emb.weight::values": torch.zeros(1, 5)})
    with pytest.raises(ModelStoreError, match="^shape"):  # a dense tensor of another shape
        apply_delta(base, {"lin.weight": torch.zeros(4, 4)})


# -- a running scorer ------------------------------------------------------------------------
def test_running_scorer_refuses_every_model_attack_and_keeps_serving(broker, tmp_path):
    from test_scoring_helpers import SMALL, FastPublisher, request

    s = _settings(broker, tmp_path, "ma", **SMALL)
    create_topics(s)
    pub = FastPublisher(s)
    store = pub.store
    root = store.root
    updates_topic = s.topics.name("model_updates")
    producer = make_producer(s)
    producer.send(updates_topic, key=b"model", value=encode(pub.next("full"))).get(10)
    port = _free_port()
    log = tmp_path / "scorer.log"
    proc = _start(_cli(s, SMALL, ["scorer", "--metrics-port", str(port)]), log)
    scores, dead = TopicReader(s, "scores"), TopicReader(s, "dead_letters")
    codec = Codec(Score)
    asked = [0]

    def ask(n: int = 5, timeout: float = 90) -> set[int]:
        """Send n requests; the versions that answered them (each answered exactly once)."""
        reqs = [request(10_000 + asked[0] + i, n=3) for i in range(n)]
        asked[0] += n
        for q in reqs:
            producer.send(s.topics.name("score_requests"), key=str(q.user_id).encode(), value=encode(q))
        producer.flush()
        want = {q.request_id for q in reqs}
        scores.until(lambda rs: want <= {codec.decode(r.value).request_id for r in rs}, timeout, settle=0.5)
        got = [codec.decode(r.value) for r in scores.records]
        mine = [x for x in got if x.request_id in want]
        assert sorted(x.request_id for x in mine) == sorted(want), "a request was not answered (once)"
        return {x.model_version for x in mine}

    marker = tmp_path / "unpickled"
    state = _state(s)
    good_bytes = st_save({k: v.contiguous() for k, v in pub.state.items()})

    def update(version: int, uri: str, sha: str, kind: str = "full", base: int | None = None) -> ModelUpdate:
        return ModelUpdate(version=version, kind=kind, base_version=base, uri=uri, sha256=sha, created_at=T0,
                           trained_until_ts=T0, samples_seen=1)

    def plant(version: int, data: bytes, kind: str = "full") -> tuple[str, str]:
        name = f"v{version:08d}.{kind}.safetensors"
        Path(store.path, name).write_bytes(data)
        return f"{root}/{name}", sha256_of(data)

    try:
        assert ask() == {1}, log.read_text()[-2000:]
        attacks: list[tuple[str, str, bytes]] = []  # (name, expected refusal reason, message)
        buf = io.BytesIO()
        torch.save({k: v for k, v in state.items()} | {"mark": Mark(str(marker))}, buf)
        attacks.append(("pickle", "format", encode(update(2, *plant(2, pickle.dumps({"w": Mark(str(marker))}))))))
        attacks.append(("torch .pt bytes", "format", encode(update(3, *plant(3, buf.getvalue())))))
        Path(store.path, "v00000004.full.pt").write_bytes(buf.getvalue())
        attacks.append((".pt uri", "uri", encode(update(4, f"{root}/v00000004.full.pt", sha256_of(buf.getvalue())))))
        attacks.append(("traversal", "uri", encode(update(5, "../../etc/passwd", "0" * 64))))
        attacks.append(("absolute", "uri", encode(update(6, "/etc/passwd", "0" * 64))))
        attacks.append(("file://", "uri", encode(update(7, "file:///etc/passwd", "0" * 64))))
        outside = Path(tmp_path, "outside")
        outside.mkdir()
        (outside / "v00000008.full.safetensors").write_bytes(good_bytes)  # a valid model, outside the store
        attacks.append(("valid model outside the store", "uri", encode(update(
            8, f"{root}/../outside/v00000008.full.safetensors", sha256_of(good_bytes)))))
        uri, _ = plant(9, good_bytes)
        attacks.append(("sha256 mismatch", "sha256", encode(update(9, uri, "f" * 64))))
        attacks.append(("truncated", "format", encode(update(10, *plant(10, good_bytes[: len(good_bytes) // 2])))))
        big = Path(store.path, "v00000011.full.safetensors")
        with open(big, "wb") as f:  # sparse: 8 GiB + 1 on paper, nothing on disk
            f.truncate(modelstore.MAX_FILE_BYTES + 1)
        attacks.append(("oversized (8 GiB + 1)", "size", encode(update(11, f"{root}/{big.name}", "0" * 64))))
        name0 = next(iter(state))
        attacks.append(("shape bomb header", "format", encode(update(12, *plant(12, _header_file(
            {name0: {"dtype": "F32", "shape": [1 << 31, 1 << 31], "data_offsets": [0, 16]}}))))))
        attacks.append(("header length bomb", "format", encode(update(13, *plant(13, struct.pack("<Q", 1 << 62) + b"{}")))))
        dense = next(k for k, v in state.items() if v.dim() == 2 and v.is_floating_point() and k not in pub.sparse)
        wrong_shape = dict(pub.state) | {dense: torch.zeros(state[dense].shape[0] + 1, state[dense].shape[1])}
        attacks.append(("tensor of the wrong shape", "shape", encode(update(14, *plant(14, st_save(
            {k: v.contiguous() for k, v in wrong_shape.items()}))))))
        attacks.append(("unknown dtype", "format", encode(update(15, *plant(15, _header_file(
            {name0: {"dtype": "Q9", "shape": [2, 2], "data_offsets": [0, 16]}}))))))
        wrong_dtype = dict(pub.state) | {dense: pub.state[dense].double()}
        attacks.append(("wrong dtype", "dtype", encode(update(16, *plant(16, st_save(
            {k: v.contiguous() for k, v in wrong_dtype.items()}))))))
        delta = split_delta(pub.state, {t: torch.tensor([1, 2]) for t in pub.sparse}, pub.sparse)
        meta = store.publish(18, "delta", delta, base_version=17, trained_until_ts=T0, samples_seen=1)  # no v17
        attacks.append(("delta with missing base", "missing", encode(update(18, store.uri_of(meta), meta.sha256,
                                                                            "delta", 17))))
        nan = dict(pub.state) | {dense: torch.full_like(pub.state[dense], float("nan"))}
        attacks.append(("NaN weights", "nonfinite", encode(update(19, *plant(19, st_save(
            {k: v.contiguous() for k, v in nan.items()}))))))
        good_update = json.loads(encode(update(20, f"{root}/v00000020.full.safetensors", "a" * 64)))
        for name, msg in [("not json", b"\x80not json"), ("kind pickle", {"kind": "pickle"}),
                          ("sha256 not hex", {"sha256": "../../" + "a" * 58}), ("empty uri", {"uri": ""}),
                          ("delta without base", {"kind": "delta"}), ("uri of 5000 chars", {"uri": "a" * 5000}),
                          ("unknown field", {"exec": "rm -rf /"}), ("null", None)]:
            raw = msg if isinstance(msg, bytes) or msg is None else json.dumps(good_update | msg).encode()
            attacks.append((f"message: {name}", "message", raw))
        sent = []
        for name, reason, raw in attacks:
            md = producer.send(updates_topic, key=b"model", value=raw).get(10)
            sent.append((name, reason, raw, md.offset))

        # every attack dead-lettered exactly once, with its reason
        dead.until(lambda rs: {(decode_dead_letter(r.value).source_topic, decode_dead_letter(r.value).offset)
                               for r in rs} >= {(updates_topic, off) for *_, off in sent}, 120)
        envelopes: dict[int, list] = {}
        for r in dead.records:
            env = decode_dead_letter(r.value)
            if env.source_topic == updates_topic:
                envelopes.setdefault(env.offset, []).append(env)
        assert sorted(envelopes) == sorted(off for *_, off in sent), \
            [name for name, _, _, off in sent if off not in envelopes]
        mcodec = Codec(ModelUpdate, s.limits)
        for name, reason, raw, off in sent:
            (env,) = envelopes[off]
            assert env.component == "scorer" and env.original == (raw or b""), name
            if reason == "message":  # refused by the contract: the decoder's own reason
                with pytest.raises(Exception) as e:
                    mcodec.decode(raw)
                assert env.reason == e.value.reason, name
            else:
                assert env.reason.split(":")[0] == reason, (name, env.reason)
        refusals = _metric(port, "dmrstream_scorer_refusals_total")
        for reason in {r for _, r, _, _ in sent if r != "message"}:
            n = sum(1 for _, r, _, _ in sent if r == reason)
            assert refusals.get(f'dmrstream_scorer_refusals_total{{reason="{reason}"}}') == n, (reason, refusals)
        dl = _metric(port, "dmrstream_dead_letters_total")
        assert sum(v for k, v in dl.items() if "model-updates" in k) == len(sent)
        assert not marker.exists(), "a pickle payload was executed"

        # the good version keeps serving, then the next good version is swapped in
        assert ask(20) == {1}
        assert proc.poll() is None, log.read_text()[-3000:]
        pub.version = 20
        producer.send(updates_topic, key=b"model", value=encode(pub.next("full"))).get(10)
        deadline = time.monotonic() + 90
        versions: set[int] = set()
        while 21 not in versions and time.monotonic() < deadline:
            versions = ask(3)
        assert versions == {21}, versions
    finally:
        rc = _stop(proc, log)
        producer.close()
    assert rc == 0, log.read_text()[-3000:]
