"""Checkpoints over real HTTP: a node with access uploads its stage's state, newcomers download it
with the resumable, checksum-verified client."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agora_server.access import AccessClaims, issue_access_token

from agora.membership.checkpoint_download import CheckpointDownloadError, ChecksumMismatch, download_checkpoint

from .conftest import stage_state
from .test_api import join, poll

LIMIT = 64_000


@pytest.fixture
def coord(harness, tmp_path):
    return harness.start(checkpoints={"directory": str(tmp_path / "checkpoints"), "max_upload_bytes": LIMIT},
                         access_token_lifetime_s=600, operators=["carol"])


def admitted(coord, harness, listener, user="alice"):
    node = harness.node(user)
    access = join(coord, node, listener.port).json()
    assert access["status"] == "access", access
    return access


def upload(coord, stage, token, content, **headers):
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    return coord.http.put(f"/api/checkpoints/{stage}", content=content, headers={**auth, **headers})


def auth_of(harness, user="alice"):
    """A participant's token: the checkpoint of a stage goes only to accounts with a node on it."""
    return {"Authorization": f"Bearer {harness.tokens[user]}"}


def stored_files(tmp_path, stage):
    return sorted(p.name for p in (tmp_path / "checkpoints" / stage).iterdir())


def test_a_node_with_access_uploads_and_newcomers_must_download_it(coord, harness, listener, tmp_path):
    access = admitted(coord, harness, listener)  # nothing uploaded yet: admitted at once
    assert access["stage"] == "head"
    assert access["checkpoint_url"] == f"{coord.url}/api/checkpoints/head"
    assert coord.http.get("/api/checkpoints/head").status_code == 404

    state = stage_state(20_000, epoch=7)
    stored = upload(coord, "head", access["access_token"], state, **{"X-Checkpoint-Epoch": "7"})
    assert stored.status_code == 200, stored.text
    sha = hashlib.sha256(state).hexdigest()
    assert stored.json() | {"uploaded_at": None} == {"stage": "head", "sha256": sha, "size": len(state), "epoch": 7,
                                                    "uploader": "alice", "uploaded_at": None}
    served = coord.http.get("/api/checkpoints/head", headers=auth_of(harness))
    assert served.content == state
    assert (served.headers["etag"], served.headers["x-checkpoint-sha256"], served.headers["x-checkpoint-epoch"]) == (f'"{sha}"', sha, "7")

    # a stage nobody has uploaded for yet has nothing to wait for
    other = join(coord, harness.node("bob"), listener.port).json()
    assert (other["status"], other["stage"]) == ("access", "body1")

    # replacing keeps the previous file one upload longer, and no more
    newer, newest = stage_state(1000), stage_state(1000)
    for content in (newer, newest):
        assert upload(coord, "head", access["access_token"], content).status_code == 200
    assert coord.http.get("/api/checkpoints/head", headers=auth_of(harness)).content == newest
    assert stored_files(tmp_path, "head") == sorted(hashlib.sha256(c).hexdigest() for c in (newer, newest))


def test_a_stage_with_a_checkpoint_admits_newcomers_after_their_download(harness, listener, tmp_path):
    coord = harness.start(checkpoints={"directory": str(tmp_path / "checkpoints")},
                          stages=[{"name": "head", "need": 2}, {"name": "body1", "need": 1}, {"name": "tail", "need": 1}])
    access = admitted(coord, harness, listener)
    state = stage_state(5000)
    assert upload(coord, "head", access["access_token"], state).status_code == 200
    assert [admitted(coord, harness, listener)["stage"] for _ in range(2)] == ["body1", "tail"]  # no checkpoints there

    newcomer = harness.node("bob")
    queued = join(coord, newcomer, listener.port).json()
    assert (queued["status"], queued["stage"], queued["download_required"]) == ("queued", "head", True)
    assert queued["checkpoint_url"] == f"{coord.url}/api/checkpoints/head"
    result = download_checkpoint(queued["checkpoint_url"], tmp_path / "head.ckpt", headers=auth_of(harness, "bob"))
    assert (tmp_path / "head.ckpt").read_bytes() == state and result.size == len(state)
    granted = poll(coord, newcomer, queued, bytes_done=result.size, bytes_total=result.size, complete=True).json()
    assert granted["status"] == "access"


def test_uploads_without_valid_access_to_that_stage_are_refused(coord, harness, listener):
    access = admitted(coord, harness, listener)  # head
    original = stage_state(3000)
    assert upload(coord, "head", access["access_token"], original).status_code == 200

    assert upload(coord, "head", None, b"x").status_code == 401
    hf_token = harness.tokens["alice"]  # an account token is not an access token
    assert upload(coord, "head", hf_token, b"x").status_code == 401
    wrong_stage = upload(coord, "tail", access["access_token"], b"x")
    assert wrong_stage.status_code == 403 and "for stage head, not tail" in wrong_stage.json()["detail"]
    forged = issue_access_token(AccessClaims(peer_id=access["peer_id"], stage="head", username="alice", uid=access["uid"],
                                             issued_at=harness.clock.now, expires_at=harness.clock.now + 600),
                                Ed25519PrivateKey.generate())
    assert upload(coord, "head", forged, b"x").status_code == 401
    assert upload(coord, "nope", access["access_token"], b"x").status_code == 404
    harness.clock.advance(601)
    expired = upload(coord, "head", access["access_token"], b"x")
    assert expired.status_code == 401 and "expired" in expired.json()["detail"]
    assert access["access_token"] not in expired.text
    # alice's access has run out: an operator looks
    assert coord.http.get("/api/checkpoints/head", headers=auth_of(harness, "carol")).content == original, "refused uploads change nothing"


def test_oversize_and_damaged_uploads_are_refused_and_leave_nothing_behind(coord, harness, listener, tmp_path):
    token = admitted(coord, harness, listener)["access_token"]
    original = stage_state(2000)
    assert upload(coord, "head", token, original).status_code == 200

    announced = upload(coord, "head", token, os.urandom(LIMIT + 1))
    assert announced.status_code == 413 and f"{LIMIT} bytes" in announced.json()["detail"]

    def unannounced():  # chunked: no Content-Length, so the limit is enforced while the bytes arrive
        for _ in range(LIMIT // 1000 + 2):
            yield os.urandom(1000)
    assert upload(coord, "head", token, unannounced()).status_code == 413

    other = os.urandom(100)
    wrong_sum = upload(coord, "head", token, other, **{"X-Checkpoint-SHA256": hashlib.sha256(b"else").hexdigest()})
    assert wrong_sum.status_code == 400 and hashlib.sha256(other).hexdigest() in wrong_sum.json()["detail"]
    assert upload(coord, "head", token, b"").status_code == 400

    assert coord.http.get("/api/checkpoints/head", headers=auth_of(harness)).content == original
    assert stored_files(tmp_path, "head") == [hashlib.sha256(original).hexdigest()], "no partial upload left over"


def test_ranges_and_their_limits(coord, harness, listener):
    state = stage_state(10_000)
    assert upload(coord, "head", admitted(coord, harness, listener)["access_token"], state).status_code == 200
    part = coord.http.get("/api/checkpoints/head", headers={**auth_of(harness), "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == state[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(state)}"
    beyond = coord.http.get("/api/checkpoints/head", headers={**auth_of(harness), "Range": f"bytes={len(state)}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(state)}"
    stale = coord.http.get("/api/checkpoints/head", headers={**auth_of(harness), "Range": "bytes=100-", "If-Range": '"not-the-etag"'})
    assert stale.status_code == 200 and stale.content == state, "a changed file comes whole"


def test_download_resumes_a_partial_file(coord, harness, listener, tmp_path):
    state = stage_state(50_000)
    assert upload(coord, "head", admitted(coord, harness, listener)["access_token"], state).status_code == 200
    dest = tmp_path / "head.ckpt"
    (tmp_path / "head.ckpt.part").write_bytes(state[:12_345])
    progress = []
    result = download_checkpoint(f"{coord.url}/api/checkpoints/head", dest, headers=auth_of(harness), on_progress=lambda d, t: progress.append((d, t)),
                                 chunk_size=4096)
    assert result.resumed_from == 12_345 and dest.read_bytes() == state
    assert progress[0] == (12_345, len(state)) and progress[-1] == (len(state), len(state))
    assert not (tmp_path / "head.ckpt.part").exists()


def test_a_corrupted_partial_file_is_caught_by_the_checksum(coord, harness, listener, tmp_path):
    state = stage_state(30_000)
    assert upload(coord, "head", admitted(coord, harness, listener)["access_token"], state).status_code == 200
    dest, part = tmp_path / "head.ckpt", tmp_path / "head.ckpt.part"
    part.write_bytes(bytes(b ^ 0xFF for b in state[:1000]))
    with pytest.raises(ChecksumMismatch, match=hashlib.sha256(state).hexdigest()):
        download_checkpoint(f"{coord.url}/api/checkpoints/head", dest, headers=auth_of(harness))
    assert not part.exists() and not dest.exists()
    assert download_checkpoint(f"{coord.url}/api/checkpoints/head", dest, headers=auth_of(harness)).resumed_from == 0
    assert dest.read_bytes() == state


class Interrupted(Exception):
    pass


def test_a_checkpoint_replaced_between_attempts_is_downloaded_from_the_start(coord, harness, listener, tmp_path):
    token = admitted(coord, harness, listener)["access_token"]
    old, new = stage_state(40_000), stage_state(45_000)
    assert upload(coord, "head", token, old).status_code == 200
    dest, part = tmp_path / "head.ckpt", tmp_path / "head.ckpt.part"

    def stop_after_8k(done, _total):
        if done >= 8192:
            raise Interrupted
    with pytest.raises(Interrupted):
        download_checkpoint(f"{coord.url}/api/checkpoints/head", dest, headers=auth_of(harness), on_progress=stop_after_8k, chunk_size=4096)
    assert part.read_bytes() == old[:part.stat().st_size] and part.stat().st_size >= 8192
    assert (tmp_path / "head.ckpt.part.etag").read_text() == f'"{hashlib.sha256(old).hexdigest()}"'

    assert upload(coord, "head", token, new).status_code == 200
    result = download_checkpoint(f"{coord.url}/api/checkpoints/head", dest, headers=auth_of(harness))
    assert result.resumed_from == 0 and dest.read_bytes() == new


def test_a_coordinator_without_a_checkpoint_directory_serves_none(harness, listener):
    coord = harness.start()
    access = admitted(coord, harness, listener)
    assert access["checkpoint_url"] is None
    assert upload(coord, "head", access["access_token"], b"x").status_code == 404
    assert coord.http.get("/api/checkpoints/head").status_code == 404


def test_a_refused_download_keeps_the_partial_file(tmp_path, coord):
    dest = tmp_path / "x.ckpt"
    (tmp_path / "x.ckpt.part").write_bytes(b"abc")
    with pytest.raises(CheckpointDownloadError, match="answered 404: No checkpoint has been uploaded for stage head"):
        download_checkpoint(f"{coord.url}/api/checkpoints/head", dest)
    assert (tmp_path / "x.ckpt.part").read_bytes() == b"abc"


def part(coord, token, content, upload_id, offset, total, stage="head", **headers):
    return upload(coord, stage, token, content, **{"X-Upload-Id": upload_id, "X-Upload-Offset": str(offset),
                                                   "X-Upload-Total": str(total), **headers})


def held(coord, token, upload_id, stage="head"):
    answer = coord.http.put(f"/api/checkpoint_uploads/{stage}", json={"upload_id": upload_id},
                            headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
    return answer.json()["received"]


def partial_files(tmp_path, stage="head"):
    return [name for name in stored_files(tmp_path, stage) if name.startswith(".upload-")]


def test_a_resumable_upload_arrives_in_parts_and_is_checked_once_whole(coord, harness, listener, tmp_path):
    token = admitted(coord, harness, listener)["access_token"]
    state, first = stage_state(30_000, epoch=4), "a" * 32
    half = len(state) // 2
    assert held(coord, token, first) == 0
    begun = part(coord, token, state[:half], first, 0, len(state), **{"X-Checkpoint-Epoch": "4"})
    assert begun.status_code == 202 and begun.json() == {"upload_id": first, "received": half, "total": len(state)}
    assert held(coord, token, first) == half
    assert coord.http.get("/api/checkpoints/head", headers=auth_of(harness)).status_code == 404, "nothing served before it is whole"

    behind = part(coord, token, state[:10], first, 10, len(state))
    assert behind.status_code == 409 and f"has {half} bytes" in behind.json()["detail"]
    assert held(coord, token, first) == half, "a refused part changes nothing"
    done = part(coord, token, state[half:], first, half, len(state), **{"X-Checkpoint-Epoch": "4"})
    assert done.status_code == 200, done.text
    assert (done.json()["sha256"], done.json()["epoch"]) == (hashlib.sha256(state).hexdigest(), 4)
    assert coord.http.get("/api/checkpoints/head", headers=auth_of(harness)).content == state
    assert partial_files(tmp_path) == [] and held(coord, token, first) == 0


def test_a_resumable_upload_is_verified_whole_bounded_and_one_per_node(harness, listener, tmp_path):
    coord = harness.start(checkpoints={"directory": str(tmp_path / "checkpoints"), "max_upload_bytes": LIMIT,
                                       "partial_upload_expiry_s": 60}, access_token_lifetime_s=600, operators=["carol"])
    token = admitted(coord, harness, listener)["access_token"]
    original = stage_state(2000)
    assert upload(coord, "head", token, original).status_code == 200

    junk = os.urandom(3000)  # every part accepted, the whole refused: it is no stage state
    assert part(coord, token, junk[:1000], "b" * 32, 0, len(junk)).status_code == 202
    refused = part(coord, token, junk[1000:], "b" * 32, 1000, len(junk))
    assert refused.status_code == 400 and "not a valid checkpoint of stage head" in refused.json()["detail"]

    too_large = part(coord, token, b"x", "c" * 32, 0, LIMIT + 1)
    assert too_large.status_code == 413 and partial_files(tmp_path) == []
    past_end = part(coord, token, b"x" * 20, "c" * 32, 0, 10)
    assert past_end.status_code == 400 and partial_files(tmp_path) == []
    assert part(coord, token, b"x" * 10, "d" * 32, 10, 100).status_code == 409, "a part of an upload never begun"

    assert part(coord, token, b"x" * 10, "e" * 32, 0, 100).status_code == 202
    assert part(coord, token, b"y" * 10, "f" * 32, 0, 100).status_code == 202  # the node's newer upload replaces it
    assert len(partial_files(tmp_path)) == 1 and held(coord, token, "e" * 32) == 0 and held(coord, token, "f" * 32) == 10

    harness.clock.advance(61)  # received nothing for longer than partial_upload_expiry_s
    assert held(coord, token, "f" * 32) == 0 and partial_files(tmp_path) == []
    assert coord.http.get("/api/checkpoints/head", headers=auth_of(harness, "carol")).content == original
