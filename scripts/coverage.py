"""Build, export and verify architectures for real, and write docs/architectures.md's table.

Each architecture runs in its own process (two tasks, random init, exported to every format at
the smallest size where every stage keeps features of at least 2x2, each artifact verified at
another batch and size), so its peak memory is measured on its own. Results are merged into
docs/coverage.json; the table between the coverage markers of docs/architectures.md is
regenerated from that file alone, so it only ever shows runs that happened.

Run: python scripts/coverage.py [ARCH ...]   (no ARCH: all 80; --missing: those not yet recorded;
     --table: only rewrite the table from docs/coverage.json)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "coverage.json"
TABLE_FILE = ROOT / "docs" / "architectures.md"
START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"
FORMATS = ("onnx", "torchscript", "pt2")


def run_one(arch: str) -> dict:
    """Build ``arch`` with two tasks and export it to every format; one result per format."""
    import torch

    from crossstitch import CrossStitchBackbone
    from crossstitch.exporters.common import ExportOptions
    from crossstitch.exporters.pipeline import export_verified
    from crossstitch.stages import arch_spec

    spec = arch_spec(arch)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = CrossStitchBackbone.from_torchvision(arch, tasks=["seg", "depth"]).eval()
    with torch.no_grad():
        for unit in model.cross_stitch.values():
            unit.weight.uniform_(-1, 1)
    size = model.smallest_export_size(spec.min_size)
    result: dict = {
        "arch": arch,
        "family": spec.family,
        "stages": len(spec.stages),
        "export_size": size,
        "build_seconds": round(time.perf_counter() - start, 1),
        "formats": {},
    }
    with tempfile.TemporaryDirectory(dir=os.environ.get("COVERAGE_TMP")) as folder:
        for fmt in FORMATS:
            start = time.perf_counter()
            try:
                export = export_verified(
                    model, fmt, Path(folder) / f"model.{fmt}", (size, size), ExportOptions()
                )
                outcome = {
                    "passed": export.passed,
                    "how": export.details.get("exporter") or export.details.get("method"),
                    "max_abs_error": max(o.max_abs_error for o in export.comparison.outputs),
                }
                for key in ("opset", "external_data"):
                    if key in export.details:
                        outcome[key] = export.details[key]
            except Exception as exc:  # recorded in the table with its reason
                outcome = {"passed": False, "error": str(exc).strip().splitlines()[0][:300]}
            outcome["seconds"] = round(time.perf_counter() - start, 1)
            result["formats"][fmt] = outcome
            for path in Path(folder).iterdir():
                path.unlink()
    return result


def run_child(arch: str) -> dict:
    """Run one architecture in a child process and add its peak resident memory."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--one", arch], stdout=subprocess.PIPE, text=True
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    lines = output.strip().splitlines()
    if process.returncode != 0 or not lines:
        return {"arch": arch, "error": f"the run exited with code {process.returncode}"}
    result = json.loads(lines[-1])
    result["peak_rss_gb"] = round(usage.ru_maxrss / 1024**2, 2)
    return result


def _cell(results: list[dict], fmt: str) -> str:
    passed = [r for r in results if r.get("formats", {}).get(fmt, {}).get("passed")]
    failed = [r for r in results if r not in passed]
    cell = f"{len(passed)}/{len(results)}"
    hows = sorted({r["formats"][fmt]["how"] for r in passed if r["formats"][fmt].get("how")})
    if fmt == "torchscript" and hows:
        cell += f" ({', '.join(hows)})"
    for r in failed:
        reason = r.get("formats", {}).get(fmt, {}).get("error") or r.get("error") or "mismatch"
        cell += f"; {r['arch']}: {reason}"
    return cell


def table(results: dict[str, dict]) -> str:
    """The coverage table: one row per family, from the recorded runs only."""
    from crossstitch.stages import architectures

    families: dict[str, list[str]] = {}
    for name, spec in architectures().items():
        families.setdefault(spec.family, []).append(name)
    lines = [
        "| family | architectures run / listed | stages | onnx | torchscript | pt2 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for family, names in sorted(families.items()):
        ran = [results[n] for n in names if n in results]
        stages = sorted({str(r["stages"]) for r in ran if "stages" in r})
        lines.append(
            f"| {family} | {len(ran)}/{len(names)}: {', '.join(r['arch'] for r in ran) or '-'} "
            f"| {', '.join(stages) or '-'} | "
            + " | ".join(_cell(ran, fmt) if ran else "not run" for fmt in FORMATS)
            + " |"
        )
    peaks = sorted(
        (r for r in results.values() if "peak_rss_gb" in r), key=lambda r: -r["peak_rss_gb"]
    )[:3]
    if peaks:
        largest = ", ".join(f"{r['arch']} {r['peak_rss_gb']:.1f} GB" for r in peaks)
        lines += [
            "",
            f"Highest peak memory (resident set of the whole run: build with two tasks, export "
            f"to the three formats, verification): {largest}.",
        ]
    return "\n".join(lines)


def write_table(results: dict[str, dict]) -> None:
    """Replace the text between the coverage markers of docs/architectures.md."""
    text = TABLE_FILE.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    TABLE_FILE.write_text(f"{head}{START}\n{table(results)}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", help="architectures to run [default: all]")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--table", action="store_true", help="only rewrite the coverage table")
    parser.add_argument(
        "--missing", action="store_true", help="run only the architectures not yet recorded"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.table:
        from crossstitch.stages import architectures

        archs = args.archs or list(architectures())
        if args.missing:
            archs = [arch for arch in archs if arch not in results]
        for arch in archs:
            result = run_child(arch)
            results[arch] = result
            print(json.dumps(result), flush=True)
            RESULTS.parent.mkdir(exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    write_table(results)


if __name__ == "__main__":
    main()
