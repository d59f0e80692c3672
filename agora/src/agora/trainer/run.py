"""Builds the trainer from its options and runs it."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

from agora.config import ConfigError, load_run_config
from agora.peer_options import TrainerOptions
from agora.processes import setup_process, start_metrics_push


def run_trainer(options: TrainerOptions) -> int:
    events = setup_process(options.log_file)
    try:
        config = load_run_config(options.config)
    except ConfigError as e:
        return _fail(events, str(e))
    session = validator = None
    if options.auth_server:
        try:
            session, validator = _admit_trainer(options, config, events)
        except RuntimeError as e:
            return _fail(events, str(e))
    try:
        return _run(options, config, events, session, validator)
    finally:
        if session is not None:
            session.stop()


def _run(options: TrainerOptions, config, events, session, validator) -> int:
    from hivemind import DHT

    from agora_server.data import PackedBatches, validation_batches
    from agora_server.data.retrying import DataSourceGaveUp
    from agora_server.p2p_frames import install_frame_limit
    from agora_server.pipeline import PipelineTrainer, in_flight_limit
    from agora_server.telemetry.events import CoordinatorStop, DataShardChosen, ProcessError

    if session is not None:
        rank, shards = session.access.data_shard, session.access.data_shards
        if rank is None or shards is None:
            return _fail(events, "the coordinator gave this trainer no data shard (it runs an older version); update the coordinator")
    else:
        rank, shards = options.rank or 0, config.trainer.data_shards
        if rank >= shards:
            return _fail(events, f"--rank {rank} is not a shard of this run: trainer.data_shards is {shards}, so use --rank 0 to"
                                 f" {shards - 1} or raise trainer.data_shards in the run config")
    events.emit(DataShardChosen(rank=rank, shards=shards, by_coordinator=session is not None))
    packed = PackedBatches(config.data, config.trainer.micro_batch_size, rank=rank, world_size=shards)
    if packed.vocab_size > config.model.vocab_size:
        return _fail(events, f"tokenizer {config.data.tokenizer!r} has {packed.vocab_size} tokens but model.vocab_size is"
                             f" {config.model.vocab_size}; set model.vocab_size to at least {packed.vocab_size}")
    batches, keep_position = _resumable_batches(options, config, packed, events)
    held_out = None
    if config.trainer.validation_every and config.data.validation_fraction > 0:
        try:
            held_out = validation_batches(config.data, config.trainer.micro_batch_size, config.trainer.validation_batches,
                                          tokenizer=packed.tokenizer)
        except ValueError as e:
            return _fail(events, f"no validation: {e}")
    install_frame_limit()  # before the DHT forks its processes: they keep it
    dht = DHT(
        initial_peers=options.initial_peers,
        host_maddrs=options.host_maddrs,
        client_mode=True,
        identity_path=options.identity_path if session else None,
        record_validators=[validator] if validator else [],
        start=True,
    )
    if session is not None:
        session.peer_access.on_renew(lambda token: validator.renew_in(dht, token))
        events.subscribe(session)  # its reports feed the coordinator's dashboard
        session.start(None)
    trainer = PipelineTrainer(
        dht=dht,
        run=config.run_name,
        stages=config.stages,
        config=config.trainer,
        wire_dtype=config.boundary.torch_wire_dtype,
        boundary_width=config.boundary_width,
        events=events,
        access=session.peer_access if session else None,
        on_finished=keep_position,
        in_flight=in_flight_limit(config.trainer, config.server.target_batch_size, shards),
    )
    pusher = start_metrics_push(events, options.prom_gateway, config, "trainer", dht.peer_id.to_base58())
    steps = options.steps or sys.maxsize

    async def _train():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)

        def on_event(event) -> None:  # access lost for good: workers would refuse every call from now on
            if isinstance(event, CoordinatorStop):
                events.emit(ProcessError(tag="TRAINER", message=event.reason))
                loop.call_soon_threadsafe(stop.set)

        events.subscribe(on_event)
        return await trainer.train(batches, steps, stop, validation=held_out, total_steps=options.steps)

    try:
        summary = asyncio.run(_train())
    except (TimeoutError, DataSourceGaveUp) as e:
        return _fail(events, str(e))
    finally:
        if pusher is not None:
            pusher.stop()
        dht.shutdown()
    if options.summary_path:
        Path(options.summary_path).write_text(json.dumps(summary.to_json()))
    return 0


def _fail(events, message: str) -> int:
    from agora_server.telemetry.events import ProcessError

    events.emit(ProcessError(tag="TRAINER", message=message))
    return 1


def _resumable_batches(options: TrainerOptions, config, packed, events):
    """The rank's micro-batches from where its saved position left them, reopened after data errors,
    and what records a finished micro-batch in the position file."""
    from agora_server.data.position import PositionFile, stream_key
    from agora_server.data.retrying import RetryingStream
    from agora_server.telemetry.events import DataPositionDiscarded, DataPositionNotSaved, DataResumed, DataSourceFailed

    position_file = PositionFile(options.data_position_path, stream_key(config.data, config.trainer.micro_batch_size, packed.rank, packed.world_size))
    position, discarded = position_file.load()
    if discarded:
        events.emit(DataPositionDiscarded(reason=discarded))
    elif position.finished:
        events.emit(DataResumed(finished=position.finished, next_index=position.finished_below, path=str(position_file.path)))
    if position.point is not None:  # the stream is taken up there, not tokenized from its beginning
        packed.points.add(position.point)
    data = config.data
    batches = RetryingStream(
        # the live position: what finishes during this run was handed out already, and stays skipped on a reopen
        packed.numbered, skip=position.is_finished, start=position.finished_below,
        on_failure=lambda f: events.emit(DataSourceFailed(error=f.error, failures=f.failures, retry_in=f.retry_in, next_index=f.next_index)),
        first_wait=data.retry_first_seconds, max_wait=data.retry_max_seconds, give_up_after=data.retry_give_up_seconds,
    )
    unsaved = [False]  # said once per run of failures, not once per micro-batch

    def keep_position(data_index: int) -> None:
        position.finish(data_index)
        position.point = packed.point_for(position.finished_below)
        try:
            position_file.save(position)
        except OSError as e:  # training goes on; a restart would repeat what is not saved
            if not unsaved[0]:
                events.emit(DataPositionNotSaved(path=str(position_file.path), error=e.strerror or str(e)))
            unsaved[0] = True
        else:
            unsaved[0] = False

    return iter(batches), keep_position


def _admit_trainer(options: TrainerOptions, config, events):
    """Access from the coordinator for this trainer's identity, and the session that renews it."""
    from agora.membership.client import AdmissionError
    from agora.membership.join import TrainerRole, join

    token = options.token
    if not token:
        raise RuntimeError("--auth_server needs an operator's HuggingFace token: pass --token or set AGORA_TOKEN")
    try:
        membership = join(TrainerRole(), config, coordinator_url=options.auth_server, token=token, identity_path=options.identity_path,
                          emit=events.emit)
    except AdmissionError as e:
        raise RuntimeError(f"the coordinator refused this trainer: {e}") from None
    return membership.session, membership.validator
