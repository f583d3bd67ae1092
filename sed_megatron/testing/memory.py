"""Peak memory of a block of code, for the benchmarks: CUDA's allocator on a GPU, the resident
set's high-water mark on the CPU."""

import torch


def rss_bytes(field):
    """A field of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


class PeakMemory:
    """Peak rise above the current footprint during the with-block, in bytes (`.rise`)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # reset the resident high-water mark to the current size
            self.base = rss_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.rise = torch.cuda.max_memory_allocated() - self.base
        else:
            self.rise = rss_bytes("VmHWM") - self.base
        return False
