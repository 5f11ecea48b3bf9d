"""Limits and the report of kernels/aot.py: which compiled specialisations are unfit for their
architecture, and the table and per-kernel summary printed by the test and the CLI."""
from __future__ import annotations

# Spill stores / loads per thread (ptxas -v) above this fail: a word or two spilled outside the vocabulary
# loop is harmless, a spilled block of the loop is not (and would show as tens to hundreds of bytes).
MAX_SPILL_BYTES = 8
# Per-block limits: 255 registers per thread and 64K registers per block on both; shared memory per block
# (static + dynamic) at most 163 KiB on sm_80 (A100: 164 KiB per SM) and 227 KiB on sm_90 (H100 / H200).
LIMITS = {80: {"regs": 255, "block_regs": 65536, "smem": 163 * 1024},
          90: {"regs": 255, "block_regs": 65536, "smem": 227 * 1024}}


def violations(row: dict, max_spill: int = MAX_SPILL_BYTES) -> list[str]:
    """What makes a compiled specialisation unfit for `row["arch"]` (empty: fine)."""
    if row.get("error"):
        return [f"compile error: {row['error']}"]
    lim = LIMITS[row["arch"]]
    missing = [k for k in ("regs", "spill_stores", "spill_loads", "smem_static") if row.get(k) is None]
    if missing:
        return [f"ptxas -v reported no {', '.join(missing)} (cannot check the limits)"]
    out = []
    if row["regs"] > lim["regs"]:
        out.append(f"{row['regs']} registers per thread > {lim['regs']}")
    if -(-row["regs"] // 8) * 8 * 32 * row["warps"] > lim["block_regs"]:  # allocated 8 per thread at a time
        out.append(f"{row['regs']} registers x {32 * row['warps']} threads > {lim['block_regs']} per block")
    if max(row["spill_stores"], row["spill_loads"]) > max_spill:
        out.append(f"spills {row['spill_stores']} B stored / {row['spill_loads']} B loaded > {max_spill} B")
    if row["smem"] > lim["smem"]:
        out.append(f"{row['smem']} B shared memory > {lim['smem']} B")
    return out


_COLUMNS = (("kernel", 14), ("arch", 5), ("regs", 5), ("spill st/ld", 11), ("smem B", 7), ("compile s", 9),
            ("specialisation", 0))


def format_table(rows: list[dict]) -> str:
    """One line per compiled specialisation, violations flagged at the end of the line."""
    lines = ["  ".join(f"{name:<{w}}" for name, w in _COLUMNS)]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["spec"], r["arch"])):
        bad = violations(r)
        cells = (r["kernel"], f"sm{r['arch']}", r.get("regs"), f"{r.get('spill_stores')}/{r.get('spill_loads')}",
                 r.get("smem"), r.get("compile_s"), r["spec"])
        line = "  ".join(f"{'-' if c is None else c!s:<{w}}" for c, (_, w) in zip(cells, _COLUMNS))
        if "driver_regs" in r:  # --load: what the driver reports for the loaded kernel
            line += f"   driver: {r['driver_regs']} regs, {r['driver_local_bytes']} B local"
        lines.append(line + ("   <-- " + "; ".join(bad) if bad else ""))
    return "\n".join(lines)


def format_summary(rows: list[dict]) -> str:
    """Per kernel and arch: specialisations, and their cold (first-call) compile time, total and worst."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r.get("compile_s") or 0.0)
    return "\n".join(f"{k:<14}  sm{a}  {len(t):3d} specialisations  first-call compile {sum(t):6.2f} s total, "
                     f"{max(t):5.2f} s worst" for (k, a), t in sorted(groups.items()))
