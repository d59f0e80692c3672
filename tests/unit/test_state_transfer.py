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
