"""Builds the trainer from its arguments and runs it."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from agora.config import ConfigError, load_run_config
from agora.processes import setup_process, start_metrics_push


def run_trainer(args: argparse.Namespace) -> int:
    from hivemind import DHT

    from agora_server.data import PackedBatches
    from agora_server.pipeline import PipelineTrainer

    events = setup_process(args.log_file)
    try:
        config = load_run_config(args.config)
    except ConfigError as e:
        print(f"[TRAINER] {e}", file=sys.stderr)
        return 1
    packed = PackedBatches(config.data, config.trainer.micro_batch_size, rank=args.rank, world_size=args.world_size)
    if packed.vocab_size > config.model.vocab_size:
        print(
            f"[TRAINER] tokenizer {config.data.tokenizer!r} has {packed.vocab_size} tokens but model.vocab_size is"
            f" {config.model.vocab_size}; set model.vocab_size to at least {packed.vocab_size}",
            file=sys.stderr,
        )
        return 1
    batches = iter(packed)
    dht = DHT(initial_peers=args.initial_peers, host_maddrs=args.host_maddrs, client_mode=True, start=True)
    trainer = PipelineTrainer(
        dht=dht,
        run=config.run_name,
        stages=config.stages,
        config=config.trainer,
        wire_dtype=config.boundary.torch_wire_dtype,
        boundary_width=config.boundary_width,
        events=events,
    )
    pusher = start_metrics_push(events, args.prom_gateway, config, "trainer", dht.peer_id.to_base58())
    steps = args.steps or sys.maxsize

    async def _train():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        return await trainer.train(batches, steps, stop)

    try:
        summary = asyncio.run(_train())
    except TimeoutError as e:
        print(f"[TRAINER] {e}", file=sys.stderr)
        return 1
    finally:
        if pusher is not None:
            pusher.stop()
        dht.shutdown()
    if args.summary_path:
        Path(args.summary_path).write_text(json.dumps(summary.to_json()))
    return 0
