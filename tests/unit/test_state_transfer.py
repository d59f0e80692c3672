"""A newcomer's download of its stage's weights is sized by bytes: its deadline grows with the state at
a minimum rate, and the weights travel in bfloat16 when the run says so, read back by hivemind's own
deserializer."""

import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor

from agora.config import load_run_config
from agora_server.optim.averaging import BFloat16State
from agora_server.optim.state_download import download_deadline


def test_the_deadline_is_the_size_at_the_minimum_rate_and_never_below_a_rounds_timeout():
    assert download_deadline(10_000_000, 50.0, 60.0) == 60.0  # small states keep the round's timeout
    tail_bf16 = int(1.91e9 * 2)
    assert download_deadline(tail_bf16, 50.0, 60.0) == tail_bf16 * 8 / 50e6  # ~611 s, not the old fixed 60 s


def test_llama_8b_serves_newcomers_bfloat16_and_a_200_mbit_link_is_well_within_its_deadline():
    averaging = load_run_config("llama-8b").server.averaging
    assert averaging.state_dtype == "bfloat16"
    tail_bytes = int(1.91e9 * 2)
    at_guide_rate = tail_bytes * 8 / 200e6
    assert download_deadline(tail_bytes, averaging.download_min_mbit, averaging.averaging_timeout) >= 2 * at_guide_rate


def test_bfloat16_state_halves_the_bytes_and_reads_back_as_bfloat16():
    master = torch.randn(300, 7)
    info = CompressionInfo.from_tensor(master)
    sent = BFloat16State().compress(master, info)
    assert len(sent.buffer) == master.numel() * 2
    received = deserialize_torch_tensor(sent)
    assert received.dtype == torch.bfloat16 and received.shape == master.shape
    assert torch.equal(received, master.to(torch.bfloat16))
    steps = torch.tensor([3, 4])  # integer tensors pass as they are
    assert torch.equal(deserialize_torch_tensor(BFloat16State().compress(steps, CompressionInfo.from_tensor(steps))), steps)


def test_download_lines_show_percent_rate_and_time_left():
    from agora_server.telemetry import events as ev
    from agora_server.telemetry.console import console_lines

    line, = console_lines(ev.DownloadProgress(bytes_done=1_000 * 2**20, bytes_total=4_000 * 2**20, bytes_per_second=25e6))
    assert line == "[DOWNLOAD] 25% (1,000.0 of 4,000.0 MiB), 25.0 MB/s, 2m06s left"
    line, = console_lines(ev.DownloadProgress(bytes_done=2**20, bytes_total=2 * 2**20))
    assert line == "[DOWNLOAD] 50% (1.0 of 2.0 MiB)"


def test_a_peer_download_shows_percent_rate_and_time_left():
    from agora_server.telemetry import events as ev
    from agora_server.telemetry.console import console_lines

    line, = console_lines(ev.StateDownloadProgress(stage="tail", bytes_done=1_000 * 2**20, bytes_total=4_000 * 2**20, seconds=40.0))
    assert line == "[DOWNLOAD] Stage weights from a peer: 25% (1,000.0 of 4,000.0 MiB), 26.2 MB/s, 2m00s left"


def test_a_continued_download_says_so_and_its_rate_counts_only_the_new_bytes():
    from agora_server.telemetry import events as ev
    from agora_server.telemetry.console import console_lines

    line, = console_lines(ev.StateDownloadProgress(stage="tail", bytes_done=1_600 * 2**20, bytes_total=4_000 * 2**20, seconds=0.0,
                                                   resumed_at=1_600 * 2**20))
    assert line == "[DOWNLOAD] Connection back: continuing the stage weights at 40% (1,600.0 of 4,000.0 MiB already here)"
    line, = console_lines(ev.StateDownloadProgress(stage="tail", bytes_done=2_000 * 2**20, bytes_total=4_000 * 2**20, seconds=16.0,
                                                   resumed_at=1_600 * 2**20))
    assert "26.2 MB/s" in line


def test_a_peer_streams_from_the_resume_point_only_for_the_state_it_was_asked_about():
    from hivemind.compression import NoCompression
    from hivemind.proto import averaging_pb2

    from agora_server.optim.state_download import PartialState, ResumePoint, StreamStart, stream_state

    tensors = [torch.randn(600_000), torch.randn(300_000)]  # 3 and 2 parts of 1 MiB
    infos = [CompressionInfo.from_tensor(t) for t in tensors]
    whole = list(stream_state(b"epoch 12", tensors, infos, NoCompression(), ResumePoint()))
    assert StreamStart.from_bytes(whole[0].metadata) == StreamStart(b"epoch 12", 0, 0) and len(whole) == 5

    partial = PartialState()
    assert partial.begin(StreamStart.from_bytes(whole[0].metadata))
    for message in whole[:4]:
        partial.add(message.tensor_part)
    asked = ResumePoint.from_message(partial.resume_point().to_message())
    assert asked == ResumePoint(b"epoch 12", 1, 1)
    rest = list(stream_state(b"epoch 12", tensors, infos, NoCompression(), asked))
    assert StreamStart.from_bytes(rest[0].metadata) == StreamStart(b"epoch 12", 1, 1) and len(rest) == 1
    assert partial.begin(StreamStart.from_bytes(rest[0].metadata)) and partial.resumes == 1
    partial.add(rest[0].tensor_part)
    partial.finish_tensor()
    assert all(torch.equal(a, b) for a, b in zip(partial.tensors, tensors))

    moved_on = list(stream_state(b"epoch 13", tensors, infos, NoCompression(), asked))
    assert StreamStart.from_bytes(moved_on[0].metadata) == StreamStart(b"epoch 13", 0, 0) and len(moved_on) == 5
    assert ResumePoint.from_message(averaging_pb2.DownloadData(metadata=b"\xc1garbage")) == ResumePoint()


def test_the_state_digest_covers_every_value_dtype_and_shape():
    from agora_server.optim.state_download import state_digest

    weights = [torch.randn(64, 8), torch.randn(10)]
    same = state_digest([w.clone() for w in weights])
    assert state_digest(weights) == same
    nudged = [weights[0].clone(), weights[1].clone()]
    nudged[1][7] = torch.nextafter(nudged[1][7], torch.tensor(1e9))  # one value, by its last bit
    assert state_digest(nudged) != same
    assert state_digest([weights[0].reshape(8, 64), weights[1]]) != same
    assert state_digest([w.to(torch.bfloat16) for w in weights]) != same
    assert state_digest([w.to(torch.bfloat16) for w in weights]) == state_digest([w.to(torch.bfloat16).clone() for w in weights])
