"""`fusecache top` and the plain text of `fusecache stats`: what an operator reads."""

from __future__ import annotations

from typing import Any


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def hit_ratio(c: dict[str, Any]) -> float | None:
    total = c.get("hit_bytes", 0) + c.get("peer_bytes", 0) + c.get("backing_bytes", 0)
    return (c.get("hit_bytes", 0) + c.get("peer_bytes", 0)) / total if total else None


def summary_lines(stats: dict[str, Any]) -> list[str]:
    """A few lines for `fusecache stats MOUNTPOINT` (the --json form has everything)."""
    lines = [f"{stats['mountpoint']}: backing {stats['backing']}, daemon pid {stats['pid']}, {stats['open_files']} open files"]
    store = stats.get("store")
    if not store:
        lines.append("no cache (--no-cache): every read goes to the backing")
        return lines
    lines.append(
        f"cache: {human(store['bytes_stored'])} of {human(store['capacity'])} stored, "
        f"{human(store['logical_bytes'])} logical, dedup {store['dedup_ratio']:.2f}x, "
        f"{store['chunks']} blocks, {store.get('evicted_chunks', 0)} evicted"
    )
    lines.append(f"admission: {stats['admission']['mode']}")
    images = stats.get("images", {})
    if images:
        width = max(12, *(len(n) for n in images))
        lines.append(f"{'image':<{width}}  {'reads':>8}  {'hit%':>6}  {'hit':>10}  {'peer':>10}  {'backing':>10}  {'admitted':>8}")
        for name, c in images.items():
            r = hit_ratio(c)
            lines.append(
                f"{name:<{width}}  {c['reads']:>8}  {'-' if r is None else f'{100 * r:.1f}':>6}  {human(c['hit_bytes']):>10}  "
                f"{human(c['peer_bytes']):>10}  {human(c['backing_bytes']):>10}  {c['admitted_chunks']:>8}"
            )
    return lines


def main(mountpoints: list[str], once: bool = False, interval: float = 1.0) -> int:
    """`fusecache top` (being written): for now, the stats summary of each mount."""
    from fusecache import control, mounts

    targets = mountpoints or [m.mountpoint for m in mounts.fusecache_mounts()]
    for mp in targets:
        print("\n".join(summary_lines(control.request(mp, "stats"))))
    return 0
