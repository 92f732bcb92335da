"""Turn ``routing_kernel.json`` (from ``bench/routing_kernel.py``) into a Markdown table and a plot.

    python bench/plot_routing.py bench/results/routing_kernel.json [--out DIR]

Writes ``routing_kernel.md`` (one table per router case and EPLB on/off: time
per call of every implementation, the bytes-moved floor, the kernel's share of
the floor and its speedups) and ``routing_kernel.png`` (one log-log panel per
case and EPLB setting: time per call vs tokens, one line per implementation,
the floor dashed). The PNG is drawn with numpy and zlib (``bench/_png.py``);
no plotting library is needed.

``--baseline OLD.json`` adds the implementations only OLD measured (eager and
vanilla ``torch.compile``, whose code does not change between kernel runs),
marked as taken from OLD, so a run can time only what changed.

Input: the JSON's ``timings`` list, each entry with ``case``, ``eplb``,
``num_tokens``, ``impl``, ``us_per_call`` (null on error) and ``floor_us``;
``device``, ``torch``, ``triton`` and optionally ``date`` at the top level.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _png import Panel, Series, plot_panels  # noqa: E402

FLOOR = "floor (bytes moved)"
PREFERRED_ORDER = (
    "eager",
    "torch_compile",
    "moe_compile_inductor",
    "moe_compile_kernel",
    "kernel",
    "kernel_compiled",
)


def load_report(path: Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the routing benchmark JSON {path}: {error}") from error
    timings = report.get("timings") if isinstance(report, dict) else None
    if not isinstance(timings, list):
        raise ValueError(f"{path} has no 'timings' list (is it routing_kernel.py's output?)")
    required = ("case", "eplb", "num_tokens", "impl", "us_per_call")
    for index, entry in enumerate(timings):
        missing = [key for key in required if key not in entry]
        if missing:
            raise ValueError(f"timings[{index}] in {path} lacks {missing}")
    if "date" not in report:
        modified = dt.datetime.fromtimestamp(Path(path).stat().st_mtime, dt.timezone.utc)
        report["date"] = modified.strftime("%Y-%m-%d") + " (file time)"
    return report


def merge_baseline(report: dict, baseline: dict, source: str) -> dict:
    """``report`` plus the timings of the implementations only ``baseline`` has."""
    mine = {t["impl"] for t in report["timings"]}
    added = sorted({t["impl"] for t in baseline["timings"]} - mine)
    if baseline.get("device") != report.get("device"):
        raise ValueError(
            f"baseline ran on {baseline.get('device')!r}, this run on {report.get('device')!r}"
        )
    merged = dict(report)
    merged["timings"] = report["timings"] + [t for t in baseline["timings"] if t["impl"] in added]
    merged["baseline_note"] = (
        f"Columns {', '.join(added)} are from {source} (same card, torch "
        f"{baseline.get('torch')}, triton {baseline.get('triton')}, {baseline.get('date')})."
    )
    return merged


def implementations(timings: list[dict]) -> list[str]:
    names = {t["impl"] for t in timings}
    ordered = [name for name in PREFERRED_ORDER if name in names]
    return ordered + sorted(names - set(ordered))


def grouped(timings: list[dict]) -> dict[tuple[str, bool], dict[int, dict[str, dict]]]:
    """``(case, eplb) -> num_tokens -> impl -> entry``, in first-seen order."""
    groups: dict[tuple[str, bool], dict[int, dict[str, dict]]] = {}
    for entry in timings:
        key = (entry["case"], bool(entry["eplb"]))
        groups.setdefault(key, defaultdict(dict))[int(entry["num_tokens"])][entry["impl"]] = entry
    return groups


def _us(value) -> str:
    if value is None:
        return "err"
    return f"{value:.2f}" if value < 1000 else f"{value:,.0f}"


def markdown(report: dict) -> str:
    timings = report["timings"]
    impls = implementations(timings)
    lines = [
        "# Routing kernel benchmark",
        "",
        f"Device: {report.get('device', 'unknown')}; torch {report.get('torch', '?')}; "
        f"triton {report.get('triton', '?')}; date {report.get('date')}.",
        "",
        "Microseconds per call (lower is better). "
        f"Method: {report.get('method', 'see bench/routing_kernel.py')}. "
        "Floor = bytes one call must move / measured copy bandwidth"
        + (
            f" ({report['copy_bandwidth_GBps']:.0f} GB/s)."
            if isinstance(report.get("copy_bandwidth_GBps"), (int, float))
            else "."
        ),
        "",
    ]
    if report.get("baseline_note"):
        lines += [report["baseline_note"], ""]
    for (case, eplb), by_tokens in grouped(timings).items():
        lines += [f"## {case}, EPLB {'on' if eplb else 'off'}", ""]
        header = ["T", *impls, "floor", "kernel % of floor", "kernel vs eager"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---:|" * len(header))
        for num_tokens in sorted(by_tokens):
            row = by_tokens[num_tokens]
            cells = [str(num_tokens)]
            for impl in impls:
                entry = row.get(impl)
                cells.append("-" if entry is None else _us(entry.get("us_per_call")))
            floor = next((e.get("floor_us") for e in row.values() if e.get("floor_us")), None)
            cells.append("-" if floor is None else _us(floor))
            kernel, eager = row.get("kernel"), row.get("eager")
            kernel_us = kernel.get("us_per_call") if kernel else None
            eager_us = eager.get("us_per_call") if eager else None
            cells.append(f"{100 * floor / kernel_us:.0f}%" if floor and kernel_us else "-")
            cells.append(f"{eager_us / kernel_us:.1f}x" if eager_us and kernel_us else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    errors = [t for t in timings if t.get("us_per_call") is None]
    if errors:
        lines += ["## Errors", ""]
        for entry in errors:
            reason = (entry.get("error") or "no time recorded").splitlines()[-1][:160]
            lines.append(
                f"- {entry['case']} EPLB {'on' if entry['eplb'] else 'off'} "
                f"T={entry['num_tokens']} {entry['impl']}: {reason}"
            )
        lines.append("")
    return "\n".join(lines)


def panels(report: dict) -> list[Panel]:
    impls = implementations(report["timings"])
    result = []
    for (case, eplb), by_tokens in grouped(report["timings"]).items():
        tokens = sorted(by_tokens)
        series = []
        for impl in impls:
            ys = [by_tokens[t].get(impl, {}).get("us_per_call") for t in tokens]
            if any(y is not None for y in ys):
                series.append(Series(impl, tokens, ys))
        floors = [
            next((e.get("floor_us") for e in by_tokens[t].values() if e.get("floor_us")), None)
            for t in tokens
        ]
        if any(f is not None for f in floors):
            series.append(Series(FLOOR, tokens, floors, dashed=True, colour=(90, 90, 90)))
        result.append(
            Panel(
                f"{case}  EPLB {'ON' if eplb else 'OFF'}",
                series,
                x_label="tokens",
                y_label="us per call",
            )
        )
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="routing_kernel.json")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: beside)")
    parser.add_argument("--columns", type=int, default=2, help="panels per row in the PNG")
    parser.add_argument(
        "--baseline", type=Path, default=None, help="an older run's JSON for the missing columns"
    )
    args = parser.parse_args(argv)
    try:
        report = load_report(args.json)
        if args.baseline is not None:
            report = merge_baseline(report, load_report(args.baseline), args.baseline.name)
    except ValueError as error:
        parser.error(str(error))
    out = args.out or args.json.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = args.json.stem
    (out / f"{stem}.md").write_text(markdown(report))
    title = (
        f"Routing: time per call vs tokens, {report.get('device', '?')}, "
        f"torch {report.get('torch', '?')}, triton {report.get('triton', '?')}"
    )
    plot_panels(panels(report), out / f"{stem}.png", title=title, columns=args.columns)
    print(f"wrote {out / f'{stem}.md'} and {out / f'{stem}.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
