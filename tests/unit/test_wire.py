import dataclasses

import msgpack
import pytest

from agora_server.models import StageKind
from agora_server.server.handler import StageServicer
from agora_server.wire import (
    SERVICE_NAME,
    BackwardGraph,
    GraphUse,
    RequestMeta,
    ResponseStatus,
    Rpc,
    ServerPhase,
    StageServerInfo,
    answer_parts,
    graph_use_error,
    handler_name,
    pack_error,
    pack_ok,
    request_fields,
    unpack_response,
    unpack_response_error,
)


def test_client_handler_names_match_the_servicer():
    assert StageServicer.__name__ == SERVICE_NAME
    for rpc in Rpc:
        assert handler_name("run-a", rpc) == StageServicer._get_handle_name("run-a", f"rpc_{rpc.value}")


def test_servicer_registers_streaming_handlers():
    StageServicer._collect_rpc_handlers()
    handlers = {h.method_name: h for h in StageServicer._rpc_handlers}
    for rpc in Rpc:
        assert handlers[f"rpc_{rpc.value}"].stream_input and handlers[f"rpc_{rpc.value}"].stream_output


def test_records_tolerate_fields_from_newer_peers():
    record = StageServerInfo("tail", ServerPhase.ONLINE, 12.5, 8, "bfloat16").to_record()
    record["gpu"] = "H100"  # a future field
    info = StageServerInfo.from_record(record)
    assert info.stage == "tail" and info.throughput == 12.5 and info.phase is ServerPhase.ONLINE


def test_response_status_distinguishes_success_refusal_and_a_dropped_stream():
    assert unpack_response_error(pack_ok(3)) is None
    assert unpack_response_error(pack_error("refused: bad")) == "refused: bad"
    assert "closed before the worker answered" in unpack_response_error(b"")
    assert "malformed" in unpack_response_error(b"\xc1")


def test_request_metadata_carries_the_graph_use_and_session_and_reads_older_callers_as_none():
    meta = RequestMeta("run-a", "body1", Rpc.FORWARD, microbatch=7, graph=GraphUse.KEEP, session="ab12")
    assert RequestMeta.unpack(meta.pack()) == meta
    older = msgpack.packb({"run": "run-a", "stage": "body1", "rpc": "backward", "mb": 3})
    assert RequestMeta.unpack(older).graph is GraphUse.NONE
    with pytest.raises(ValueError, match="session"):
        RequestMeta.unpack(dataclasses.replace(meta, session="x" * 65).pack())


def test_graph_uses_are_checked_against_the_stage_and_rpc():
    assert graph_use_error(StageKind.BODY, Rpc.FORWARD, GraphUse.KEEP) is None
    assert graph_use_error(StageKind.HEAD, Rpc.BACKWARD, GraphUse.KEPT) is None
    assert "for a forward" in graph_use_error(StageKind.BODY, Rpc.BACKWARD, GraphUse.KEEP)
    assert "for a backward" in graph_use_error(StageKind.HEAD, Rpc.FORWARD, GraphUse.KEPT)
    for graph in (GraphUse.KEEP, GraphUse.KEPT):
        assert "tail keeps no graph" in graph_use_error(StageKind.TAIL, Rpc.BACKWARD, graph)
    assert request_fields(StageKind.BODY, Rpc.BACKWARD, GraphUse.KEPT) == ("grad",)


def test_an_answer_says_how_a_backward_ran():
    assert unpack_response(pack_ok(1, BackwardGraph.KEPT)) == ResponseStatus(None, BackwardGraph.KEPT)
    assert unpack_response(pack_ok(1)) == ResponseStatus(None, None)
    assert unpack_response(pack_ok(1, kept=True)) == ResponseStatus(None, None, kept=True)
    assert unpack_response(msgpack.packb({"ok": True, "graph": "stolen"})).error.startswith("failed: malformed")


def test_an_answer_says_how_many_parts_the_caller_reads_before_it_closes_the_stream():
    assert answer_parts(pack_ok(3)) == 3
    assert answer_parts(pack_ok(0)) == 0
    assert answer_parts(pack_error("refused: bad")) == 0, "a refusal is all there is"
    assert answer_parts(msgpack.packb({"ok": True})) is None, "an answer that does not say ends with the stream"
    assert answer_parts(b"") is None and answer_parts(b"\xc1") is None
