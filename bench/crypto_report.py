"""The report of bench/crypto.py: table, targets line and JSON summary (its keys are fixed by the issue)."""

from __future__ import annotations

from typing import Any

from crypto_memory import bench_threads
from crypto_util import MIB, Timing, label


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _fmt(value: float | None, suffix: str = "") -> str:
    """MiB/s and MiB without decimals; ratios (suffix "x") with two."""
    if value is None:
        return "-"
    return f"{value:.2f}x" if suffix == "x" else f"{value:,.0f}{suffix}"


ROW_ORDER = (
    "vfed",
    "vfed_1thread",
    "limit",
    "limit_threads",
    "limit_reuse",
    "vfed_chunks",
    "vfed_committed",
    "v6_str",
    "v6_stream",
)


def print_table(results: dict[str, dict[str, Timing]], notes: list[str]) -> None:
    print(
        f"{'payload':>9} {'method':<15}{'wall enc':>9}{'dec':>8}{'x limit':>13}"
        f"{'CPU enc':>9}{'dec':>8}{'x limit':>13}{'peak RSS':>10}   (MiB/s)"
    )
    for size, rows in results.items():
        for name in ROW_ORDER:
            row = rows.get(name)
            if row is None:
                continue
            base = rows.get("limit", {})
            cells = []
            for suffix in ("", "_cpu"):
                enc, dec = row.get(f"enc{suffix}"), row.get(f"dec{suffix}")
                ratios = (_ratio(enc, base.get(f"enc{suffix}")), _ratio(dec, base.get(f"dec{suffix}")))
                cells.append(
                    f"{_fmt(enc):>9}{_fmt(dec):>8}{_fmt(ratios[0], 'x'):>7}/{_fmt(ratios[1], 'x'):<5}"
                )
            rss = _fmt(row.get("rss_mib"), " MiB")
            print(f"{label(int(size)):>9} {name:<15}{cells[0]}{cells[1]}{rss:>10}")
    for note in notes:
        print(f"note: {note}")


def summary(results: dict[str, dict[str, Timing]], mid: int, big: int, notes: list[str]) -> dict[str, Any]:
    rows = results.get(str(mid), {})

    def get(method: str, field: str) -> float | None:
        return rows.get(method, {}).get(field)

    out: dict[str, Any] = {
        f"{m}_{d}_mibps": get(src, d)
        for m, src in (("vfed", "vfed"), ("limit", "limit"), ("v6_str", "v6_str"), ("v6_stream", "v6_stream"))
        for d in ("enc", "dec")
    }
    out["stream_1gib_peak_rss_mib"] = results.get(str(big), {}).get("vfed", {}).get("rss_mib")
    extra = ("limit_reuse", "limit_threads", "vfed_1thread", "vfed_chunks", "vfed_committed")
    for method in extra:
        out[f"{method}_enc_mibps"], out[f"{method}_dec_mibps"] = get(method, "enc"), get(method, "dec")
    for method in ("vfed", "limit", "v6_str", *extra):
        for d in ("enc", "dec"):
            out[f"{method}_{d}_cpu_mibps"] = get(method, f"{d}_cpu")
    for d in ("enc", "dec"):
        out[f"ratio_vfed_limit_{d}_cpu"] = _ratio(out[f"vfed_{d}_cpu_mibps"], out[f"limit_{d}_cpu_mibps"])
        out[f"ratio_vfed_v6_str_{d}_cpu"] = _ratio(out[f"vfed_{d}_cpu_mibps"], out[f"v6_str_{d}_cpu_mibps"])
    out["ratio_vfed_limit_enc"] = _ratio(out["vfed_enc_mibps"], out["limit_enc_mibps"])
    out["ratio_vfed_limit_dec"] = _ratio(out["vfed_dec_mibps"], out["limit_dec_mibps"])
    out["ratio_vfed_v6_str_enc"] = _ratio(out["vfed_enc_mibps"], out["v6_str_enc_mibps"])
    out["ratio_vfed_v6_str_dec"] = _ratio(out["vfed_dec_mibps"], out["v6_str_dec_mibps"])
    for d in ("enc", "dec"):
        out[f"ratio_vfed_limit_reuse_{d}"] = _ratio(out[f"vfed_{d}_mibps"], out[f"limit_reuse_{d}_mibps"])
    out["figures_payload_mib"], out["stream_payload_mib"] = mid // MIB, big // MIB
    out["threads"] = bench_threads()
    out["results"], out["notes"] = results, notes
    return out


def print_targets(s: dict[str, Any]) -> None:
    def pair(key: str) -> str:
        return f"{_fmt(s[f'{key}_enc'], 'x')}/{_fmt(s[f'{key}_dec'], 'x')}"

    def pair_cpu(key: str) -> str:
        return f"{_fmt(s[f'{key}_enc_cpu'], 'x')}/{_fmt(s[f'{key}_dec_cpu'], 'x')}"

    print(
        f"targets at {s['figures_payload_mib']} MiB (enc/dec, wall | CPU): "
        f"vfed/limit {pair('ratio_vfed_limit')} | {pair_cpu('ratio_vfed_limit')} (>= 0.80x); "
        f"vfed/vantage6-string {pair('ratio_vfed_v6_str')} | {pair_cpu('ratio_vfed_v6_str')} (>= 10x)"
    )
    print(
        f"peak RSS of the vfed {s['stream_payload_mib']} MiB stream: "
        f"{_fmt(s['stream_1gib_peak_rss_mib'], ' MiB')} (target <= 64 MiB)"
    )
