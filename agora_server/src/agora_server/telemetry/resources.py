"""RAM and VRAM of this process and machine, sampled for metrics and the RAM health rule."""

from __future__ import annotations

import dataclasses

import psutil
import torch


@dataclasses.dataclass(frozen=True)
class ResourceSample:
    ram_used_percent: float
    process_rss_bytes: int
    vram_allocated_bytes: int | None


def sample_resources(device: torch.device) -> ResourceSample:
    vram = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    return ResourceSample(
        ram_used_percent=psutil.virtual_memory().percent,
        process_rss_bytes=psutil.Process().memory_info().rss,
        vram_allocated_bytes=vram,
    )
