"""What the daemon asks of its host: how the allocator keeps freed memory, and which interface
addresses to advertise."""

from __future__ import annotations

from meshd.state.config import Config


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed big blocks for reuse (False where that is not glibc).

    A channel allocates a frame of up to 16 MiB per message and frees it once acknowledged.
    By default glibc maps blocks that big afresh and trims the heap as they are freed, so each
    frame's pages are faulted in and zeroed by the kernel again: measured, that made the sending
    daemon spend about as long in page faults as in AES-GCM.  With the thresholds raised, freed
    frames are reused; the cost is that the daemon's heap stays at its peak (bounded by the
    channel windows, see docs/performance.md) instead of shrinking after a burst."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold,
                                                                     1 << 30))


def advertised_addresses(cfg: Config, bound: str | None) -> list[str]:
    """The addresses to put in this site's record (see ``Config.advertise``)."""
    if cfg.advertise:
        return list(cfg.advertise)
    if bound is None:
        return []
    host, _, port = bound.rpartition(":")
    if host not in ("0.0.0.0", "*", "[::]"):
        return [bound]
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                out.append(f"{ip.ip}:{port}")
    return out[:8] or [f"127.0.0.1:{port}"]
