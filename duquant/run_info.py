"""What every results.json records beside its numbers: versions, peak memory; and the one seeding call."""
from __future__ import annotations

import platform
import random
import resource

import numpy as np
import torch


def versions() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> dict:
    out = {"host_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["device"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
