"""Events cross from a child process to its launcher as JSON lines and come back as the same objects."""

import math

from agora_server.telemetry import events as ev
from agora_server.telemetry.eventstream import decode_event, encode_event


def test_events_round_trip_with_their_types():
    sent = [
        ev.TrainerFinished(completed=3, sent=4, dropped={"failed:tail": 1}, retried=2, final_loss=7.5, first_loss=9.0,
                           cancelled=1, stopped=True, seconds=12.5, tokens=1536),
        ev.TrainingStarted(stages=("head", "body1", "tail"), total_steps=60),
        ev.AuthQueued(position=2, estimated_wait_seconds=None, joins_paused=True),
        ev.ServerStarted(stage="head", peer_id="QmX", maddrs=("/ip4/127.0.0.1/tcp/1",)),
    ]
    for event in sent:
        line = encode_event(event)
        assert "\n" not in line
        assert decode_event(line + "\n") == event
    back = decode_event(encode_event(sent[1]))
    assert isinstance(back.stages, tuple), "tuples stay tuples (events are hashable, compared by value)"


def test_non_finite_numbers_survive_the_trip():
    event = ev.TrainerReport(step=10, loss=float("nan"), tokens_per_second=float("inf"), sent=10, completed=10, dropped=0, retried=0)
    back = decode_event(encode_event(event))
    assert math.isnan(back.loss) and back.tokens_per_second == float("inf")


def test_other_lines_are_not_events():
    for line in ("[SERVER] Training started", "Traceback (most recent call last):", '{"seed_maddrs": []}',
                 '{"agora_event": "NoSuchEvent", "x": 1}', '{"agora_event": "TrainingStarted"}', '{"agora_event": broken'):
        assert decode_event(line) is None, line


def test_fields_from_a_newer_writer_are_ignored():
    line = encode_event(ev.WaitingForStages(stages=("tail",)))[:-1] + ',"added_later":true}'
    assert decode_event(line) == ev.WaitingForStages(stages=("tail",), time=decode_event(line).time)
