"""Every malformed kind of request is refused before it reaches the model, with a message that says why."""

import pytest
import torch

from agora_server.models import StageKind
from agora_server.server.validation import BadRequest, RequestLimits, StageSignature
from agora_server.tensor_stream import PayloadError, deserialize, serialize
from agora_server.wire import GraphUse, Rpc, id_slots, pack_boundary, unpack_boundary

VOCAB, WIDTH = 100, 16
LIMITS = RequestLimits(max_batch_size=4, max_seq_len=32, max_request_bytes=16 * 1024)


def signature(kind):
    return StageSignature(kind=kind, vocab_size=VOCAB, boundary_width=WIDTH, limits=LIMITS)


def packed(batch=2, seq=8, dtype=torch.float32, tokens=None):
    tokens = torch.randint(0, VOCAB, (batch, seq)) if tokens is None else tokens
    return pack_boundary(torch.randn(batch, seq, WIDTH), tokens, dtype)


def good(kind, rpc, batch=2, seq=8):
    tensors = [torch.randint(0, VOCAB, (batch, seq)) if kind is StageKind.HEAD else packed(batch, seq)]
    if kind is StageKind.TAIL:
        tensors.append(torch.randint(0, VOCAB, (batch, seq)))
    if rpc is Rpc.BACKWARD:
        tensors.append(torch.rand(batch, seq) if kind is StageKind.TAIL else torch.randn(batch, seq, WIDTH))
    return tensors


@pytest.mark.parametrize("kind", list(StageKind))
@pytest.mark.parametrize("rpc", list(Rpc))
def test_well_formed_requests_pass(kind, rpc):
    named = signature(kind).validate(rpc, good(kind, rpc))
    assert named["tokens"].shape == (2, 8) and named["tokens"].dtype == torch.int64
    if kind is not StageKind.HEAD:
        assert named["boundary"].shape == (2, 8, WIDTH)


def with_boundary(change):
    tensors = good(StageKind.BODY, Rpc.BACKWARD)
    tensors[0] = change(tensors[0])
    return tensors


def with_grad(change):
    tensors = good(StageKind.BODY, Rpc.BACKWARD)
    tensors[1] = change(tensors[1])
    return tensors


def nan_at(t, value):
    t = t.clone()
    t[0, 0, 0] = value
    return t


def with_ids(ids):
    return [packed(tokens=torch.full((2, 8), ids))]


MALFORMED = {
    "tokens of dtype int32": ([torch.randint(0, VOCAB, (2, 8), dtype=torch.int32)], StageKind.HEAD, Rpc.FORWARD, "dtype int32"),
    "tokens as floats": ([torch.rand(2, 8)], StageKind.HEAD, Rpc.FORWARD, "dtype float32"),
    "tokens of rank 3": ([torch.randint(0, VOCAB, (2, 8, 1))], StageKind.HEAD, Rpc.FORWARD, "rank 3"),
    "token id past the vocabulary": ([torch.full((2, 8), VOCAB)], StageKind.HEAD, Rpc.FORWARD, "outside 0..99"),
    "rank-1 tokens": ([torch.randint(0, VOCAB, (8,))], StageKind.HEAD, Rpc.FORWARD, "rank 1"),
    "negative token id": ([torch.full((2, 8), -1)], StageKind.HEAD, Rpc.FORWARD, "outside 0..99"),
    "batch over the limit": ([torch.randint(0, VOCAB, (5, 8))], StageKind.HEAD, Rpc.FORWARD, "batch size 5"),
    "sequence over the limit": ([torch.randint(0, VOCAB, (1, 33))], StageKind.HEAD, Rpc.FORWARD, "sequence length 33"),
    "empty batch": ([torch.randint(0, VOCAB, (0, 8))], StageKind.HEAD, Rpc.FORWARD, "batch size 0"),
    "missing tensor": (good(StageKind.BODY, Rpc.BACKWARD)[:1], StageKind.BODY, Rpc.BACKWARD, "takes 2 tensors"),
    "extra tensor": (good(StageKind.BODY, Rpc.FORWARD) * 2, StageKind.BODY, Rpc.FORWARD, "takes 1 tensors"),
    "boundary without ids": (with_boundary(lambda t: t[..., :WIDTH]), StageKind.BODY, Rpc.BACKWARD, "expected [2, 8, 17]"),
    "boundary of rank 2": (with_boundary(lambda t: t[..., 0]), StageKind.BODY, Rpc.BACKWARD, "rank 2"),
    "boundary as int64": (with_boundary(lambda t: t.long()), StageKind.BODY, Rpc.BACKWARD, "dtype int64"),
    "boundary as float64": (with_boundary(lambda t: t.double()), StageKind.BODY, Rpc.BACKWARD, "dtype float64"),
    "NaN in the boundary": (with_boundary(lambda t: nan_at(t, float("nan"))), StageKind.BODY, Rpc.BACKWARD, "NaN or Inf"),
    "Inf in the boundary": (with_boundary(lambda t: nan_at(t, float("inf"))), StageKind.BODY, Rpc.BACKWARD, "NaN or Inf"),
    "NaN in the gradient": (with_grad(lambda t: nan_at(t, float("nan"))), StageKind.BODY, Rpc.BACKWARD, "grad contains NaN"),
    "gradient of the wrong width": (with_grad(lambda t: t[..., :-1]), StageKind.BODY, Rpc.BACKWARD, "grad has shape"),
    "boundary id past the vocabulary": (with_ids(VOCAB), StageKind.BODY, Rpc.FORWARD, "token ids holds ids"),
    "negative boundary id": (with_ids(-7), StageKind.BODY, Rpc.FORWARD, "token ids holds ids"),
    "oversized request": ([packed(4, 32), torch.randn(4, 32, WIDTH) * 2], StageKind.BODY, Rpc.BACKWARD, "exceeds the limit"),
    "labels out of range": ([packed(), torch.full((2, 8), -5)], StageKind.TAIL, Rpc.FORWARD, "labels holds ids"),
    "loss weights of the wrong shape": (
        [packed(), torch.randint(0, VOCAB, (2, 8)), torch.rand(2, 9)], StageKind.TAIL, Rpc.BACKWARD, "loss_weights has shape",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_are_refused(case):
    tensors, kind, rpc, message = MALFORMED[case]
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        signature(kind).validate(rpc, tensors)


def test_ignored_labels_are_accepted():
    tensors = good(StageKind.TAIL, Rpc.FORWARD)
    tensors[1][:, :3] = -100
    signature(StageKind.TAIL).validate(Rpc.FORWARD, tensors)


def test_payload_round_trip_keeps_values_and_ids_exact():
    tokens = torch.tensor([[0, 1, 2**17, 2**40]])
    acts = torch.randn(2, 3, 5).to(torch.bfloat16)
    parts = serialize([tokens, acts])
    assert len(parts[1].buffer) == acts.numel() * 2, "bfloat16 must cross as 2 bytes per value"
    out_tokens, out_acts = deserialize(parts)
    assert torch.equal(out_tokens, tokens) and out_acts.dtype == torch.bfloat16 and torch.equal(out_acts, acts)


def test_truncated_payload_is_refused():
    parts = serialize([torch.randn(600, 1024)])  # several 1 MiB chunks
    assert len(parts) > 2
    with pytest.raises(PayloadError, match="truncated"):
        deserialize(parts[:-1])


def test_corrupt_buffer_is_refused():
    parts = serialize([torch.randn(4, 4)])
    parts[0].buffer = parts[0].buffer[:-3]
    with pytest.raises(PayloadError, match="could not be decoded"):
        deserialize(parts)


def test_unsupported_dtype_is_refused():
    parts = serialize([torch.randn(4, 4)])
    parts[0].dtype = "object"
    with pytest.raises(PayloadError, match="unsupported dtype"):
        deserialize(parts)


def test_stream_starting_mid_tensor_is_refused():
    parts = serialize([torch.randn(600, 1024)])
    with pytest.raises(PayloadError, match="continuation"):
        deserialize(parts[1:])


def test_token_ids_cross_any_wire_dtype_bit_exactly():
    ids = torch.tensor([[0, 1, 255, 256, 2**17, 2**17 + 1, 128255, 2**31 - 1]])
    values = torch.randn(1, 8, 3)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        wire = pack_boundary(values, ids, dtype)
        assert wire.shape == (1, 8, 3 + id_slots(dtype)) and wire.dtype == dtype
        (received,) = deserialize(serialize([wire]))  # through the real serialisation, NaN-looking patterns included
        out_values, out_ids = unpack_boundary(received, 3)
        assert torch.equal(out_ids, ids), dtype
        assert torch.equal(out_values, values.to(dtype))


@pytest.mark.parametrize("kind", [StageKind.HEAD, StageKind.BODY])
def test_a_backward_on_a_kept_graph_carries_the_gradient_alone_and_is_checked_as_strictly(kind):
    named = signature(kind).validate(Rpc.BACKWARD, [torch.randn(2, 8, WIDTH)], GraphUse.KEPT)
    assert set(named) == {"grad"}
    with pytest.raises(BadRequest, match="takes 1 tensors"):
        signature(kind).validate(Rpc.BACKWARD, good(kind, Rpc.BACKWARD), GraphUse.KEPT)
    with pytest.raises(BadRequest, match="NaN or Inf"):
        signature(kind).validate(Rpc.BACKWARD, [torch.full((2, 8, WIDTH), float("nan"))], GraphUse.KEPT)
    with pytest.raises(BadRequest, match="expected \\[2, 8, 16\\]"):
        signature(kind).validate(Rpc.BACKWARD, [torch.randn(2, 8, WIDTH + 1)], GraphUse.KEPT)
    with pytest.raises(BadRequest, match="batch size 5"):
        signature(kind).validate(Rpc.BACKWARD, [torch.randn(5, 8, WIDTH)], GraphUse.KEPT)


def test_a_stream_that_sends_nothing_is_given_up_after_the_first_message_deadline():
    import asyncio

    from hivemind.proto import runtime_pb2

    from agora_server.tensor_stream import FirstMessageLate, collect

    async def silent():
        await asyncio.Event().wait()  # a caller who opened the stream and never writes
        yield runtime_pb2.ExpertRequest()

    async def prompt():
        yield runtime_pb2.ExpertRequest(metadata=b"meta", tensors=serialize([torch.ones(3)]))

    checked: list[bytes] = []
    with pytest.raises(FirstMessageLate):
        asyncio.run(collect(silent(), 2**20, check_metadata=checked.append, first_within=0.2))
    assert checked == [], "nothing was read, nothing checked"
    metadata, parts, _ = asyncio.run(collect(prompt(), 2**20, check_metadata=checked.append, first_within=0.2))
    assert metadata == b"meta" and checked == [b"meta"] and torch.equal(deserialize(parts)[0], torch.ones(3))
