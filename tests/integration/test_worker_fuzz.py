"""Hypothesis sends random malformed requests to one live body1 worker: each one is refused with a
message that names what was wrong, none hangs the worker or makes it fail, and after each one a
correct request still gets the answer it got first.

Requests go out as raw protobuf parts rather than through the pipeline client, so the fuzzer
reaches the worker with dtypes, chunkings and headers that the client never produces."""

import asyncio
import contextlib
import dataclasses
import math
import threading

import msgpack
import pytest
import torch
from hivemind import DHT
from hivemind.proto import runtime_pb2
from hivemind.utils.streaming import split_for_streaming
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agora.config import load_run_config
from agora_server.models import PipelineStage, StageKind, build_boundary_codec
from agora_server.pipeline.remote import StageCallFailed, StageCaller
from agora_server.telemetry import events as ev
from agora_server.tensor_stream import ALLOWED_DTYPES, CHUNK_BYTES, deserialize
from agora_server.wire import (
    RequestMeta,
    Rpc,
    id_slots,
    pack_boundary,
    request_fields,
    unpack_boundary,
    unpack_response_error,
)
from tests.helpers.swarms import SwarmHarness
from tests.helpers.worker_rpc import find_worker, send_raw, valid_inputs

CONFIG = load_run_config("local-tiny")  # the swarm's own config differs only in timings
RUN, STAGE, WORKER = CONFIG.run_name, "body1", "body1#0"
VOCAB, WIDTH = CONFIG.model.vocab_size, CONFIG.boundary_width
MAX_BATCH, MAX_SEQ = CONFIG.server.max_batch_size, CONFIG.model.max_seq_len
WIRE = torch.float32
ROW = WIDTH + id_slots(WIRE)
CALL_TIMEOUT = 20.0  # answers take milliseconds; only a hung worker comes near this
# Now and then (about once in 2,000 calls, only on a loaded machine) a stream ends empty although
# the worker is fine and answers the same request when asked again: most likely p2pd resets the
# stream as the worker closes its end right after answering. Such a call is asked again, a few
# times at most; a request that never gets an answer still fails.
LOST = unpack_response_error(b"")
ATTEMPTS = 3
REFUSED_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.float64, torch.complex64)

# derandomized: CI runs the same examples every time, and a failure there reproduces here
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example, HealthCheck.filter_too_much],
)


class Case:
    """One raw request and what its refusal must say. A plain class: hypothesis prints a failing
    example's repr, and this one is a line where a dataclass's would be megabytes of tensor parts."""

    def __init__(self, what: str, rpc: Rpc, parts: list | None, metadata: bytes, expect: str = ""):
        self.what, self.rpc, self.metadata = what, rpc, metadata
        self.parts = parts
        """Tensor parts, one per message; None sends a stream without a single message."""
        self.expect = expect
        """Text the refusal must contain: it says what was wrong (empty for a request to accept)."""

    def __repr__(self) -> str:
        return f"{self.rpc.value}: {self.what}"


def encode(tensor: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> list[runtime_pb2.Tensor]:
    """By hand rather than with tensor_stream.serialize, so that dtypes the worker refuses can be sent."""
    raw = tensor.contiguous()
    if raw.dtype == torch.bfloat16:  # numpy has no bfloat16; the bit patterns go, as tensor_stream sends them
        raw = raw.view(torch.int16)
    proto = runtime_pb2.Tensor(buffer=raw.numpy().tobytes(), size=list(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."))
    return list(split_for_streaming(proto, chunk_bytes))


def meta(rpc: Rpc) -> bytes:
    return RequestMeta(RUN, STAGE, rpc).pack()


# --- strategies ------------------------------------------------------------------------------


@st.composite
def valid_requests(draw, rpc: Rpc, max_seq: int = MAX_SEQ):
    """(tokens, values, tensors) of a request the worker must accept."""
    batch, seq = draw(st.integers(1, MAX_BATCH)), draw(st.integers(1, max_seq))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    values = torch.randn(batch, seq, WIDTH, generator=generator)
    tensors = [pack_boundary(values, tokens, WIRE)]
    if rpc is Rpc.BACKWARD:
        tensors.append(torch.randn(batch, seq, WIDTH, generator=generator))
    return tokens, values, tensors


def zero_boundary(batch: int, seq: int, width: int) -> torch.Tensor:
    """A boundary that is wrong in its shape only: finite values, valid ids wherever there is room for them."""
    if width < id_slots(WIRE):
        return torch.zeros(batch, seq, width)
    return pack_boundary(torch.zeros(batch, seq, width - id_slots(WIRE)), torch.zeros(batch, seq, dtype=torch.long), WIRE)


TENSOR_FLAWS = ("dtype", "rank", "size", "NaN/Inf", "token ids", "tensor count")
PAYLOAD_FLAWS = ("cut", "extended", "lost chunks", "lost first chunk", "chunk count", "size", "dtype", "compression")
METADATA_FLAWS = ("stage", "run", "rpc", "garbage", "cut", "fields", "not a map", "no messages")


@st.composite
def malformed_tensors(draw, rpc: Rpc, flaw: str) -> Case:
    tokens, values, tensors = draw(valid_requests(rpc))
    fields = request_fields(StageKind.BODY, rpc)
    index = draw(st.integers(0, len(tensors) - 1))
    name, (batch, seq) = fields[index], tokens.shape

    if flaw == "dtype":
        # half-width dtypes are valid wire dtypes: only a boundary laid out for float32 is wrong in one
        halves = (torch.float16, torch.bfloat16) if name == "boundary" else ()
        dtype = draw(st.sampled_from(REFUSED_DTYPES + halves))
        short = str(dtype).removeprefix("torch.")
        tensors[index] = tensors[index].to(dtype)
        if short not in ALLOWED_DTYPES:
            expect = f"tensor {index} has unsupported dtype '{short}'"
        elif dtype == torch.int64:
            expect = f"{name} has dtype int64"
        else:  # a 2-byte boundary stores each id in two slots, so its rows are one wider
            expect = f"boundary has shape [{batch}, {seq}, {ROW}], expected [{batch}, {seq}, {WIDTH + id_slots(dtype)}]"
        what = f"{name} as {short}"
    elif flaw == "rank":
        rank = draw(st.sampled_from([0, 1, 2, 4, 5]))
        extra = draw(st.lists(st.integers(1, 2), min_size=max(0, rank - 3), max_size=max(0, rank - 3)))
        shape = [*tensors[index].shape[:rank], *extra]
        tensors[index] = torch.zeros(shape)
        what, expect = f"{name} of shape {shape}", f"{name} has rank {rank}, expected 3"
    elif flaw == "size":
        dim = draw(st.integers(0, 2))
        shape = list(tensors[index].shape)
        if name == "boundary" and dim == 0:  # one past each limit, where an off-by-one would let it in
            shape[0] = draw(st.sampled_from([0, MAX_BATCH + 1]) | st.integers(MAX_BATCH + 1, 2 * MAX_BATCH))
            expect = f"batch size {shape[0]} is outside 1..{MAX_BATCH}"
        elif name == "boundary" and dim == 1:
            shape[1] = draw(st.sampled_from([0, MAX_SEQ + 1]) | st.integers(MAX_SEQ + 1, 2 * MAX_SEQ))
            expect = f"sequence length {shape[1]} is outside 1..{MAX_SEQ}"
        else:
            right = shape[dim]
            shape[dim] = draw(st.integers(0, 2 * right + 1).filter(lambda n: n != right))
            expect = f"{name} has shape {shape}, expected"
        tensors[index] = zero_boundary(*shape) if name == "boundary" else torch.zeros(shape)
        what = f"{name} of shape {shape}"
    elif flaw == "NaN/Inf":
        spot = st.tuples(st.integers(0, batch * seq - 1), st.integers(0, tensors[index].shape[-1] - 1))  # (row, column)
        spots = draw(st.lists(spot, min_size=1, max_size=4, unique=True))
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        rows = tensors[index].clone().view(batch * seq, -1)
        for row, column in spots:
            rows[row, column] = value
        tensors[index] = rows.view(tensors[index].shape)
        if name == "grad":
            expect = "grad contains NaN or Inf"
        elif any(column < WIDTH for _, column in spots):
            expect = "boundary contains NaN or Inf"
        else:  # a token id's slot: NaN and Inf bit patterns read as ids far outside the vocabulary
            expect = f"token ids holds ids outside 0..{VOCAB - 1}"
        what = f"{value} in {name} at (row, column) {spots}"
    elif flaw == "token ids":
        outside = st.integers(-(2**31), -1) | st.integers(VOCAB, 2**31 - 1)
        spots = draw(st.lists(st.tuples(st.integers(0, batch - 1), st.integers(0, seq - 1), outside), min_size=1, max_size=4))
        ids = tokens.clone()
        for b, t, token in spots:
            ids[b, t] = token
        tensors[0] = pack_boundary(values, ids, WIRE)
        what, expect = f"ids {spots}", f"token ids holds ids outside 0..{VOCAB - 1}"
    else:
        # forward with a grad, backward without one, nothing at all, or one tensor too many
        count = draw(st.sampled_from([n for n in range(4) if n != len(fields)]))
        tensors = (tensors + [torch.zeros(batch, seq, WIDTH), tokens])[:count]
        what, expect = f"{count} tensors", f"body {rpc.value} takes {len(fields)} tensors ({', '.join(fields)}), got {count}"

    parts = [part for tensor in tensors for part in encode(tensor)]
    return Case(f"{flaw}: {what}", rpc, parts, meta(rpc), expect)


@st.composite
def garbled_payloads(draw, rpc: Rpc, flaw: str) -> Case:
    """A valid request whose bytes or part headers were damaged on the way."""
    _, _, tensors = draw(valid_requests(rpc, max_seq=32))
    index = draw(st.integers(0, len(tensors) - 1))
    name, numel = request_fields(StageKind.BODY, rpc)[index], tensors[index].numel()
    nbytes = numel * WIRE.itemsize
    # at least two parts where a part goes missing or the count is wrong
    several = flaw in ("lost chunks", "lost first chunk", "chunk count")
    chunk = draw(st.integers(max(1, nbytes // 8), nbytes // 2 if several else nbytes))
    encoded = [encode(tensor, chunk) for tensor in tensors]
    parts, count = encoded[index], len(encoded[index])
    head, undecodable = parts[0], f"tensor {index} could not be decoded"

    if flaw in ("cut", "extended"):
        part = parts[draw(st.integers(0, count - 1))]
        if flaw == "cut":
            part.buffer = part.buffer[: draw(st.integers(0, len(part.buffer) - 1))]
        else:
            part.buffer += draw(st.binary(min_size=1, max_size=16))
        what, expect = f"{name} part of {len(part.buffer)} bytes", undecodable
    elif flaw == "lost chunks":
        lost = draw(st.sets(st.integers(1, count - 1), min_size=1))
        encoded[index] = [part for k, part in enumerate(parts) if k not in lost]
        what = f"{name} without chunks {sorted(lost)} of {count}"
        expect = f"tensor {index} arrived in {count - len(lost)} of {count} chunks (truncated)"
    elif flaw == "lost first chunk":
        encoded[index] = parts[1:]
        if index == 0:
            expect = "payload starts with a continuation chunk"
        else:  # the rest of the grad reads as more of the boundary
            before = len(encoded[0])
            expect = f"tensor 0 arrived in {before + count - 1} chunks, its header declared {before}"
        what = f"{name} without its first of {count} chunks"
    elif flaw == "chunk count":
        head.chunks = draw(st.integers(-3, count + 5).filter(lambda n: n not in (0, count)))  # 0: "not chunked"
        what = f"{name} in {count} chunks declared as {head.chunks}"
        if head.chunks > count:
            expect = f"tensor {index} arrived in {count} of {head.chunks} chunks (truncated)"
        else:
            expect = f"tensor {index} arrived in {count} chunks, its header declared {head.chunks}"
    elif flaw == "size":
        size = draw(st.lists(st.integers(0, 2**32 - 1), max_size=5).filter(lambda s: math.prod(s) != numel))
        del head.size[:]
        head.size.extend(size)
        what, expect = f"{name} declared as {size}", undecodable
    elif flaw == "dtype":
        named = st.sampled_from(["int64", "float16", "int32", "uint8", "float64", "bool", "complex64", "Float32", "float", "<f4"])
        unknown = st.text(min_size=1, max_size=12).filter(lambda s: s not in ALLOWED_DTYPES)
        dtype = draw(named | unknown | (st.just("bfloat16") if name == "boundary" else st.nothing()))
        head.dtype = dtype
        if dtype == "bfloat16":  # 4 bytes per element reads as hivemind's legacy bfloat16, one id slot short
            expect = "boundary has shape"
        elif dtype in ALLOWED_DTYPES:  # the element count no longer matches the declared size
            expect = undecodable
        else:
            expect = f"tensor {index} has unsupported dtype"
        what = f"{name} declared as {dtype!r}"
    else:
        # FLOAT16 doubles the element count; the others name no compression at all
        head.compression = draw(st.sampled_from([runtime_pb2.CompressionType.FLOAT16, 6, 99]))
        what, expect = f"{name} with compression {head.compression}", undecodable

    parts = [part for tensor_parts in encoded for part in tensor_parts]
    return Case(f"{flaw}: {what}", rpc, parts, meta(rpc), expect)


@st.composite
def bad_envelopes(draw, rpc: Rpc, flaw: str) -> Case:
    """Valid tensors under wrong or damaged request metadata."""
    _, _, tensors = draw(valid_requests(rpc, max_seq=8))
    parts = [part for tensor in tensors for part in encode(tensor)]
    malformed = "malformed request metadata"
    if flaw == "stage":
        near = st.sampled_from(["head", "tail", "body2", "Body1", "body1 ", ""])
        stage = draw((near | st.text(max_size=16)).filter(lambda s: s != STAGE))
        metadata, what, expect = RequestMeta(RUN, stage, rpc).pack(), repr(stage), f"this worker serves stage {STAGE!r}, not {stage!r}"
    elif flaw == "run":
        run = draw(st.text(max_size=16).filter(lambda s: s != RUN))
        metadata, what, expect = RequestMeta(run, STAGE, rpc).pack(), repr(run), f"this worker serves run {RUN!r}, not {run!r}"
    elif flaw == "rpc":
        said = Rpc.BACKWARD if rpc is Rpc.FORWARD else Rpc.FORWARD
        metadata, what, expect = meta(said), f"says {said.value}", f"metadata says {said.value}, but {rpc.value} was called"
    elif flaw == "garbage":
        metadata = draw(st.binary(max_size=64))
        what, expect = metadata.hex(), malformed
    elif flaw == "cut":
        metadata = meta(rpc)[: draw(st.integers(0, len(meta(rpc)) - 1))]
        what, expect = f"{len(metadata)} bytes", malformed
    elif flaw == "fields":
        fields = {"run": RUN, "stage": STAGE, "rpc": rpc.value, "mb": -1, "access": ""}
        key = draw(st.sampled_from(["run", "stage", "rpc", "mb"]))
        if key in ("run", "stage"):  # str() takes any value, so only a missing one is malformed
            del fields[key]
        else:  # values that neither Rpc() nor int() can take
            fields[key] = draw(st.sampled_from([None, [1], {"a": 1}, "sideways"]))
        metadata, what, expect = msgpack.packb(fields), repr(fields), malformed
    elif flaw == "not a map":
        number = st.integers(-(2**63), 2**64 - 1)  # what msgpack can pack
        value = draw(st.none() | number | st.text(max_size=8) | st.lists(number, max_size=4) | st.binary(max_size=8))
        metadata, what, expect = msgpack.packb(value), repr(value), malformed
    else:
        metadata, parts, what, expect = b"", None, "an empty stream", malformed
    return Case(f"{flaw}: {what}", rpc, parts, metadata, expect)


# --- the live worker -----------------------------------------------------------------------


@dataclasses.dataclass
class LiveWorker:
    swarm: object
    loop: asyncio.AbstractEventLoop
    peer: str = ""
    p2p: object = None
    caller: StageCaller | None = None
    local: PipelineStage | None = None
    request: list = dataclasses.field(default_factory=list)
    """A correct forward request (boundary) and its backward's gradient."""
    forward: torch.Tensor | None = None
    """The first answer to the correct forward: every later one must match it."""
    backward: torch.Tensor | None = None
    """The boundary gradient the correct backward must get: the stage run here."""
    refused: int = 0
    """Refusals received; the worker's log must record as many."""
    lost: int = 0
    """Raw requests whose answer p2pd lost (see LOST); the log may record refusals of those too."""

    def run(self, coroutine, timeout: float = CALL_TIMEOUT):
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coroutine, timeout), self.loop).result()

    def call(self, rpc: Rpc, tensors) -> torch.Tensor:
        for attempt in range(ATTEMPTS):
            try:
                call = self.caller.call(self.peer, STAGE, StageKind.BODY, rpc, tensors, timeout=CALL_TIMEOUT)
                (answer,) = self.run(call, CALL_TIMEOUT + 5)
                return answer
            except StageCallFailed as e:
                if str(e) != LOST or attempt == ATTEMPTS - 1:
                    raise

    def exchange(self, case: Case) -> tuple[str | None, list]:
        """Send a request as raw parts: (the worker's error or None, the answer's parts)."""
        for _ in range(ATTEMPTS):
            try:
                error, answer = self.run(send_raw(self.p2p, self.peer, RUN, STAGE, case.rpc, case.metadata, case.parts))
            except TimeoutError:
                raise AssertionError(f"{case!r}: no answer within {CALL_TIMEOUT:.0f}s") from None
            except Exception as e:  # p2p errors: the handler raised instead of answering
                raise AssertionError(f"{case!r}: the stream broke instead of an answer: {type(e).__name__}: {e}") from None
            if error != LOST:
                break
            self.lost += 1
        return error, answer

    def refusal(self, case: Case) -> str:
        error, _ = self.exchange(case)
        assert error is not None, f"{case!r}: accepted"
        self.refused += error.startswith("refused: ")
        return error

    def assert_still_serving(self) -> None:
        assert self.swarm.process(WORKER).popen.poll() is None, "the worker exited"
        again = self.call(Rpc.FORWARD, self.request[:1])
        assert torch.allclose(again, self.forward, atol=1e-5), "a correct request got a different answer than before"


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    harness = SwarmHarness(tmp_path_factory.mktemp("fuzz"))
    loop = asyncio.new_event_loop()  # one loop and one p2p for every example: starting p2pd costs seconds
    thread = threading.Thread(target=loop.run_forever, name="fuzz-loop", daemon=True)
    with contextlib.ExitStack() as cleanup:  # unwinds in reverse, each step even when an earlier one failed
        cleanup.callback(assert_no_leftovers, harness)
        thread.start()
        cleanup.callback(stop_loop, loop, thread)
        swarm = harness.create(workers={"head": 0, "body1": 1, "tail": 0})
        assert (swarm.config.model, swarm.config.boundary_width, swarm.config.server.max_batch_size) == (CONFIG.model, WIDTH, MAX_BATCH)
        swarm.start(trainer=False)
        assert swarm.wait_for(WORKER, ev.ServerStarted, timeout=120)
        dht = DHT(initial_peers=swarm.seed_maddrs, client_mode=True, start=True)
        cleanup.callback(dht.shutdown)
        live = LiveWorker(swarm, loop)
        live.peer = live.run(find_worker(dht, swarm.config), 60)
        live.p2p = live.run(dht.replicate_p2p(), 60)
        cleanup.callback(lambda: live.run(live.p2p.shutdown()))
        live.caller = StageCaller(live.p2p, RUN, WIRE, WIDTH)
        spec = swarm.config.stage(STAGE)
        codec = build_boundary_codec(swarm.config.boundary, swarm.config.model, swarm.config.seed)
        live.local = PipelineStage(swarm.config.model, spec, codec, swarm.config.seed)
        remember_correct_answers(live)
        yield live


def stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def assert_no_leftovers(harness: SwarmHarness) -> None:
    leftovers = harness.stop_all()
    assert not leftovers, f"processes left running: {leftovers}"


def remember_correct_answers(live: LiveWorker) -> None:
    """The first answer to a correct forward, checked against the same stage run here, and what its
    backward must answer. No backward is sent until the end: any accepted backward makes the stage
    step once hivemind's progress tracker expects the batch complete, and the weights move."""
    tokens, values = valid_inputs(live.swarm.config)
    grad = torch.randn(values.shape, generator=torch.Generator().manual_seed(7))
    live.request = [pack_boundary(values, tokens, WIRE), grad]
    live.forward = live.call(Rpc.FORWARD, live.request[:1])

    remote_values, remote_ids = unpack_boundary(live.forward, WIDTH)
    inputs = values.clone().requires_grad_(True)
    expected = live.local(tokens, inputs)
    expected.backward(grad)
    live.backward = inputs.grad
    assert torch.equal(remote_ids, tokens)
    assert torch.allclose(remote_values, expected.detach(), atol=1e-5), "remote forward differs from the same stage run locally"


def assert_refused(live: LiveWorker, case: Case) -> None:
    error = live.refusal(case)
    assert error.startswith("refused: "), f"{case!r}: not a refusal: {error}"
    assert case.expect in error, f"{case!r}: the refusal does not say {case.expect!r}: {error}"
    live.assert_still_serving()


# --- tests ---------------------------------------------------------------------------------


@settings(FUZZ, max_examples=16)
@given(data=st.data())
def test_valid_requests_in_any_wire_dtype_and_chunking_are_served(worker, data):
    """The control group: the fuzzers' unbroken requests, sent the same raw way, are answered
    exactly like the stage run here, so what the fuzzers break is what makes the worker refuse."""
    tokens, values, _ = data.draw(valid_requests(Rpc.FORWARD))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    boundary = pack_boundary(values, tokens, dtype)
    parts = encode(boundary, data.draw(st.integers(max(1, boundary.numel() * dtype.itemsize // 8), CHUNK_BYTES)))
    parts[0].requires_grad = data.draw(st.booleans())

    error, answer = worker.exchange(Case(f"{dtype} in parts of {len(parts[0].buffer)} bytes", Rpc.FORWARD, parts, meta(Rpc.FORWARD)))
    assert error is None, error
    (remote,) = deserialize(answer)
    remote_values, remote_ids = unpack_boundary(remote, WIDTH)
    with torch.no_grad():
        expected = worker.local(tokens, values.to(dtype).float())
    assert torch.equal(remote_ids, tokens)
    assert torch.allclose(remote_values, expected, atol=1e-5)


# one hypothesis run per RPC and flaw, so that every flaw is tried on both RPCs, whatever the draws
@pytest.mark.parametrize("flaw", TENSOR_FLAWS)
@pytest.mark.parametrize("rpc", Rpc)
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_malformed_tensors_are_refused(worker, rpc, flaw, data):
    assert_refused(worker, data.draw(malformed_tensors(rpc, flaw)))


@pytest.mark.parametrize("flaw", PAYLOAD_FLAWS)
@pytest.mark.parametrize("rpc", Rpc)
@settings(FUZZ, max_examples=20)
@given(data=st.data())
def test_garbled_payloads_are_refused(worker, rpc, flaw, data):
    assert_refused(worker, data.draw(garbled_payloads(rpc, flaw)))


@pytest.mark.parametrize("flaw", METADATA_FLAWS)
@pytest.mark.parametrize("rpc", Rpc)
@settings(FUZZ, max_examples=12)
@given(data=st.data())
def test_wrong_or_damaged_metadata_is_refused(worker, rpc, flaw, data):
    assert_refused(worker, data.draw(bad_envelopes(rpc, flaw)))


def test_worker_survives_with_unchanged_weights_and_no_traceback(worker):
    # runs last: the fuzzers must have left no trace but refusals
    worker.assert_still_serving()
    backward = worker.call(Rpc.BACKWARD, worker.request)
    assert torch.allclose(backward, worker.backward, atol=1e-5), "remote backward differs from the same stage run locally"
    # a traceback is text, never an event: neither the console nor the log may carry one
    texts = worker.swarm.texts_of(WORKER)
    assert not [line for line in texts if "Traceback" in line], "\n".join(texts[-40:])
    log = (worker.swarm.log_dir / "server_body1_0.log").read_text()
    assert "Traceback" not in log, log[-4000:]
    # events are sent before the answer leaves, so every refusal received is on its way (the wait
    # covers the pipe), and a lost answer was lost in transit if the worker sent a refusal for it
    assert worker.refused and worker.swarm.wait_for(WORKER, ev.RequestRefused, count=worker.refused, timeout=30)
    assert len(worker.swarm.events_of(WORKER, ev.RequestRefused)) <= worker.refused + worker.lost
    assert not worker.swarm.events_of(WORKER, ev.ComputeFailed)
