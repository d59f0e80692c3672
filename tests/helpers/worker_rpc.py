"""A live worker reached the way a hostile caller would: found in the DHT, sent valid inputs through
the pipeline client or raw protobuf messages that the client never produces."""

from __future__ import annotations

import asyncio

import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from agora_server.pipeline.directory import read_stage_records
from agora_server.pipeline.remote import read_answer
from agora_server.wire import Rpc, handler_name, pack_boundary, unpack_response_error


async def find_worker(dht, config, stage: str = "body1") -> str:
    for _ in range(100):  # the record is stored before the worker reports ready; this is only DHT lookup lag
        records = await read_stage_records(dht, config.run_name, stage)
        if records:
            return next(iter(records))
        await asyncio.sleep(0.3)
    raise AssertionError(f"{stage} worker never appeared in the DHT")


def valid_inputs(config, batch=2, seq=16) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, boundary values) of a request a body worker accepts, the same on every call."""
    tokens = torch.randint(0, config.model.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(5))
    values = torch.randn(batch, seq, config.model.hidden_size, generator=torch.Generator().manual_seed(6))
    return tokens, values


def packed(values, tokens):
    return pack_boundary(values, tokens, torch.float32)


async def send_raw(p2p, peer: str, run: str, stage: str, rpc: Rpc, metadata: bytes, parts: list | None):
    """One request as raw messages, ``metadata`` with the first part: (the worker's error or None, the
    answer's parts). ``parts`` None sends a stream without a single message."""

    async def messages():
        if parts is None:
            return
        yield runtime_pb2.ExpertRequest(uid=stage, tensors=parts[:1], metadata=metadata)
        for part in parts[1:]:
            yield runtime_pb2.ExpertRequest(tensors=[part])

    stream = await p2p.iterate_protobuf_handler(PeerID.from_base58(peer), handler_name(run, rpc), messages(), runtime_pb2.ExpertResponse)
    answer, answer_parts, _ = await read_answer(stream, 1 << 30)
    return unpack_response_error(answer), answer_parts
