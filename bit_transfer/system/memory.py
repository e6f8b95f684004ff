"""Will a batch fit in memory? An estimate of inference's peak memory for a batch of images at a size,
checked against what the machine has before any image is decoded (`predict`, `eval`).

`--image-size 4000` on 4 images took 6.5 GB and could push a machine into swap or the OOM killer; a
size or batch that cannot fit is refused in one line that names a batch (or size) that does.

The estimate, per image and input pixel: 40 + 64·w·(2 + d1) bytes, w the width factor and d1 the
units of stage 1 (the stem and stage 1 run at 1/2 and 1/4 of the input size with 64w and 256w
channels: the largest activations; later stages are smaller). Fitted to peak RSS growth of `predict`
on CPU (MindSpore 2.8, 1024 and 2048 px, batch 1 and 2): measured 79, 126 and 225 B/px for width
0.25, 0.5 and 1 with one unit per stage, 336 B/px for R50x1; the formula gives 88, 136, 232 and 360.
"""

from __future__ import annotations

import os
from pathlib import Path

from bit_transfer.errors import UsageError

GB = 1 << 30


def bytes_per_pixel(depths, width: float) -> float:
    """Peak inference memory per image and input pixel (module docstring)."""
    return 40 + 64 * float(width) * (2 + int(depths[0]))


def batch_bytes(depths, width: float, size: int, batch: int) -> int:
    return int(bytes_per_pixel(depths, width) * size * size * batch)


def available_bytes() -> int | None:
    """Memory this process can still take: MemAvailable, capped by a cgroup (v2 or v1) limit; None if unknown."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap, now = Path(limit).read_text().strip(), int(Path(used).read_text())
        except (OSError, ValueError):
            continue
        if cap.isdigit() and int(cap) < 1 << 60:  # "max" or a huge number: no limit
            found.append(max(0, int(cap) - now))
    return min(found) if found else None


def check_batch(depths, width: float, size: int, batch: int, *, batch_fix: str, size_fix: str,
                available: int | None = None) -> None:
    """Refuse, in one line, a batch of `batch` images at `size` px that cannot fit in the memory left.

    `batch_fix` is how the user sets the batch, with {n} for it ("--batch-size {n}"); `size_fix` names
    the size's setting ("--image-size"). The line proposes the largest batch that fits, or the largest
    size for one image.
    """
    available = available_bytes() if available is None else available
    need = batch_bytes(depths, width, size, batch)
    if available is None or need <= available:
        return
    per_image = batch_bytes(depths, width, size, 1)
    head = (f"a batch of {batch} image{'s' if batch != 1 else ''} at {size}x{size} px needs about "
            f"{need / GB:.1f} GB of memory but {available / GB:.1f} GB is available")
    if per_image <= available:
        fits = int(available // per_image)
        about = batch_bytes(depths, width, size, fits) / GB
        raise UsageError(f"{head}; use {batch_fix.format(n=fits)} (about {about:.1f} GB) or a smaller {size_fix}")
    largest = max(1, int((available / bytes_per_pixel(depths, width)) ** 0.5))
    raise UsageError(f"{head}; even one image needs {per_image / GB:.1f} GB: use a smaller {size_fix} "
                     f"(at most {largest} fits)")
