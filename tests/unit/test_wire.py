import msgpack

from agora_server.server.handler import StageServicer
from agora_server.wire import (
    SERVICE_NAME,
    Rpc,
    ServerPhase,
    StageServerInfo,
    answer_parts,
    handler_name,
    pack_error,
    pack_ok,
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


def test_an_answer_says_how_many_parts_the_caller_reads_before_it_closes_the_stream():
    assert answer_parts(pack_ok(3)) == 3
    assert answer_parts(pack_ok(0)) == 0
    assert answer_parts(pack_error("refused: bad")) == 0, "a refusal is all there is"
    assert answer_parts(msgpack.packb({"ok": True})) is None, "an answer that does not say ends with the stream"
    assert answer_parts(b"") is None and answer_parts(b"\xc1") is None
