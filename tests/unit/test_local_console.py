"""What the local swarm prints: the quiet view keeps what needs attention and the trainer's progress;
--verbose keeps everything; the outcome line says how the run went. And the loss it reports."""

import io

import pytest

from agora.local_console import SwarmConsole, outcome_line
from agora_server.pipeline.trainer import SmoothedLoss
from agora_server.telemetry import events as ev
from agora_server.telemetry.console import console_lines

STARTED = ev.ServerStarted(stage="head", peer_id="QmABCDEFGHIJKLMNOPQRSTUV", maddrs=())
REPORT = ev.TrainerReport(step=10, loss=8.9, tokens_per_second=2000, sent=15, completed=10, dropped=0, retried=0,
                          total_steps=60, smoothed_loss=8.95, validation_loss=9.02, validation_step=0,
                          stages_served=3, stages_total=3, workers=3)


def shown(verbose: bool, feed) -> list[str]:
    out = io.StringIO()
    console = SwarmConsole(out, verbose=verbose)
    for name, item in feed:
        if isinstance(item, str):
            console.child_text(name, item)
        else:
            console.child_event(name, item, console_lines(item))
    return out.getvalue().splitlines()


FEED = [
    ("head#0", ev.AccessGranted(username="me", stage="head", expires_at=0)),
    ("head#0", STARTED),
    ("head#0", ev.OptimizerStepped(stage="head", step=1, grad_norm=1.0, lr=1e-3)),
    ("head#0", ev.ProgressReport(stage="head", window_seconds=10, forward_batches=0, backward_batches=0, total_samples=0, contribution_samples=0)),
    ("head#0", "UserWarning: something a library said"),
    ("tail#0", ev.AuthQueued(position=1, estimated_wait_seconds=None)),
    ("tail#0", ev.AuthQueued(position=1, estimated_wait_seconds=None)),
    ("trainer", ev.WaitingForStages(stages=("tail",))),
    ("trainer", REPORT),
    ("body1#0", ev.HealthStop(rule="ram", message="RAM usage exceeded threshold. Exiting run.", detail="96%")),
]


def test_the_quiet_view_shows_progress_and_problems_only():
    lines = shown(False, FEED)
    assert lines == [
        "head#0    | [SERVER] Training started on stage head (peer QmABCDEF…QRSTUV)",
        "tail#0    | [AUTH] Authorization queue: position 1, estimated wait: unknown (no place has freed up yet to measure it)",
        "trainer   | [TRAINER] micro-batches 10/60 | loss 8.950 | validation 9.020 (at 0) | 2,000 tokens/s | stages served 3/3 (3 workers) | dropped 0",
        "body1#0   | [SERVER] RAM usage exceeded threshold. Exiting run.",
        "body1#0   | [SERVER] Reason: 96%",
    ]


def test_verbose_shows_every_line_of_every_child():
    lines = shown(True, FEED)
    assert "head#0    | [TRAINING] Training step 1" in lines and "head#0    | UserWarning: something a library said" in lines
    assert sum("[PROGRESS]" in line for line in lines) == 4 and sum("Authorization queue" in line for line in lines) == 2


def test_a_failed_child_shows_its_last_lines_in_the_quiet_view():
    out = io.StringIO()
    SwarmConsole(out, verbose=False).child_exited("trainer", 1, ["Traceback (most recent call last):", "ValueError: boom"])
    assert out.getvalue().splitlines() == ["[LOCAL] trainer exited with code 1; its last lines:",
                                           "trainer   | Traceback (most recent call last):", "trainer   | ValueError: boom"]


def test_the_outcome_line():
    done = ev.TrainerFinished(completed=60, sent=61, dropped={"failed:tail": 1}, retried=2, final_loss=7.1, first_loss=8.94,
                              validation_first=9.02, validation_last=7.25, seconds=41.2, tokens=30720)
    line = outcome_line(done, trainer_code=0, stopped_by_user=False, log_dir="logs/local/",
                        summary="logs/local/trainer-summary.json", dashboard="logs/local/dashboard.html")
    assert line == ("[LOCAL] Done: 60 micro-batches in 41s (746 tokens/s), loss 8.94 → 7.10, validation 9.02 → 7.25, 1 dropped."
                    " Logs: logs/local/; summary: logs/local/trainer-summary.json; dashboard: logs/local/dashboard.html.")
    failed = outcome_line(None, trainer_code=1, stopped_by_user=False, log_dir="logs/local/", summary=None, dashboard=None,
                          trainer_error="no worker announced stage(s) tail within 60s")
    assert failed == "[LOCAL] The trainer failed (exit code 1): no worker announced stage(s) tail within 60s. Logs: logs/local/."


def test_the_smoothed_loss_is_unbiased_from_the_first_value_and_follows_a_trend():
    smoothed = SmoothedLoss(span=20)
    assert smoothed.value is None
    for _ in range(3):
        smoothed.add(9.0)
    assert smoothed.value == pytest.approx(9.0), "no pull towards zero at the start"
    for _ in range(200):
        smoothed.add(6.0)
    assert smoothed.value == pytest.approx(6.0, abs=1e-6)
    noisy = SmoothedLoss(span=50)
    for i in range(400):
        noisy.add(7.0 + (1.5 if i % 2 else -1.5))  # swings of ±1.5 between neighbours
    assert noisy.value == pytest.approx(7.0, abs=0.1)
