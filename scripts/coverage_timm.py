"""Run a sample of timm models through build, identity check, export and verify; write the table.

Each model runs in its own process (two tasks, random init): built with ``from_timm``, checked
against ``timm.create_model(name, features_only=True)`` with identity units (every stage output of
both tasks, bit for bit), then exported to ONNX and pt2 at the smallest size from 64 px up where
every stage keeps features of at least 2x2 (a fixed-size model: its size), each artifact verified
at another batch and size. Refusals are recorded with their reason. Results are merged into
docs/coverage-timm.json after every model, so a run can stop and resume (--missing); the table
between the timm markers of docs/architectures.md is regenerated from that file alone.

Run: python scripts/coverage_timm.py [NAME ...]   (no NAME: the whole sample; --missing: those
     not yet recorded; --table: only rewrite the table)
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
RESULTS = ROOT / "docs" / "coverage-timm.json"
TABLE_FILE = ROOT / "docs" / "architectures.md"
START, END = "<!-- coverage-timm:start -->", "<!-- coverage-timm:end -->"
FORMATS = ("onnx", "pt2")
SMALLEST = 64
# Small variants of the families the sample covers, by family.
SAMPLE = {
    "ResNet-D": ["resnet10t", "resnet18d", "resnet26d", "resnet50d"],
    "ResNeSt": ["resnest14d"],
    "Res2Net": ["res2net50_14w_8s"],
    "RegNet": ["regnetx_002", "regnety_002"],
    "EfficientNet": ["efficientnet_b0", "efficientnet_lite0", "tinynet_e"],
    "EfficientNetV2": ["tf_efficientnetv2_b0", "efficientnetv2_rw_t"],
    "MobileNetV3": ["mobilenetv3_small_050", "mobilenetv3_large_100"],
    "MobileNetV4": ["mobilenetv4_conv_small"],
    "MixNet": ["mixnet_s"],
    "GhostNet": ["ghostnet_050"],
    "RexNet": ["rexnet_100"],
    "DLA": ["dla34", "dla46_c"],
    "CSPNet": ["cspresnet50", "cs3darknet_s"],
    "DenseNet": ["densenet121"],
    "RepVGG": ["repvgg_a0"],
    "ConvNeXt": ["convnext_atto", "convnextv2_atto"],
    "EdgeNeXt": ["edgenext_xx_small"],
    "EfficientViT": ["efficientvit_b0", "efficientvit_m0"],
    "FastViT": ["fastvit_t8"],
    "Swin": ["swin_tiny_patch4_window7_224"],
    "CoAtNet": ["coatnet_nano_rw_224"],
    "MaxViT": ["maxvit_pico_rw_256"],
    "LCNet": ["lcnet_050"],
    "MNASNet / FBNet": ["mnasnet_small", "fbnetc_100"],
    "VoVNet": ["ese_vovnet19b_slim_dw"],
    "SelecSLS": ["selecsls42b"],
    "HGNet": ["hgnetv2_b0"],
    "PoolFormer": ["poolformer_s12"],
    "PVT-v2": ["pvt_v2_b0"],
    "MobileViT": ["mobilevit_xxs"],
    "Inception": ["inception_v3"],
    "HRNet": ["hrnet_w18_small"],
    "ViT": ["vit_tiny_patch16_224"],
    "LeViT": ["levit_128s"],
}


def identity_check(name: str, model, size: int) -> bool:
    """With identity units, every task's stage outputs equal timm's features-only model's."""
    import timm
    import torch

    reference = timm.create_model(name, features_only=True).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    identical = True
    with torch.no_grad():
        for unit in model.cross_stitch.values():
            unit.weight.fill_(0.0)
            unit.weight.diagonal(0, 0, 1).fill_(1.0)
        out = model(x)
        for task in model.tasks:
            state = model.backbones[task].state_dict()
            keys = list(reference.state_dict())
            if len(keys) != len(state):
                return False
            reference.load_state_dict(dict(zip(keys, state.values(), strict=True)))
            expected = reference(x)
            got = [out[f"{task}.{stage}"] for stage in model.cross_stitch]
            identical &= len(got) == len(expected) and all(
                torch.equal(a, b) for a, b in zip(got, expected, strict=True)
            )
    return identical


def run_one(name: str) -> dict:
    """Build ``name`` with two tasks, check identity, export and verify; one result."""
    import torch

    from crossstitch import CrossStitchBackbone, CrossStitchError
    from crossstitch.exporters.common import ExportOptions
    from crossstitch.exporters.pipeline import export_verified

    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        model = CrossStitchBackbone.from_timm(name, tasks=["seg", "depth"], features="all").eval()
    except CrossStitchError as exc:
        return {"name": name, "refused": exc.detail}
    size = model.smallest_export_size(SMALLEST)
    result: dict = {
        "name": name,
        "family": model.config.family,
        "stages": [[s.name, s.channels, s.reduction] for s in model.stages],
        "layout": model.layout,
        "export_size": size,
        "build_seconds": round(time.perf_counter() - start, 1),
        "formats": {},
    }
    start = time.perf_counter()
    result["identical"] = identity_check(name, model, size)
    result["identity_seconds"] = round(time.perf_counter() - start, 1)
    with torch.no_grad():
        for unit in model.cross_stitch.values():
            unit.weight.uniform_(-1, 1)
    with tempfile.TemporaryDirectory(dir=os.environ.get("COVERAGE_TMP")) as folder:
        for fmt in FORMATS:
            start = time.perf_counter()
            try:
                export = export_verified(
                    model, fmt, Path(folder) / f"model.{fmt}", (size, size), ExportOptions()
                )
                outcome = {
                    "passed": export.passed,
                    "max_abs_error": max(o.max_abs_error for o in export.comparison.outputs),
                }
            except Exception as exc:  # recorded in the table with its reason
                outcome = {"passed": False, "error": str(exc).strip().splitlines()[0][:300]}
            outcome["seconds"] = round(time.perf_counter() - start, 1)
            result["formats"][fmt] = outcome
            for path in Path(folder).iterdir():
                path.unlink()
    return result


def run_child(name: str) -> dict:
    """Run one model in a child process and add its peak resident memory."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--one", name], stdout=subprocess.PIPE, text=True
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    lines = output.strip().splitlines()
    if code != 0 or not lines:
        return {"name": name, "error": f"the run exited with code {code}"}
    result = json.loads(lines[-1])
    result["peak_rss_gb"] = round(usage.ru_maxrss / 1024**2, 2)
    return result


def _status(result: dict) -> str:
    if "refused" in result:
        return f"refused: {result['refused']}"
    if "error" in result:
        return f"failed: {result['error']}"
    formats = result.get("formats", {})
    cells = []
    for fmt in FORMATS:
        outcome = formats.get(fmt, {})
        cells.append(
            f"{fmt} {'PASS' if outcome.get('passed') else 'FAIL'}"
            + (f" ({outcome['error']})" if outcome.get("error") else "")
        )
    identity = "identity PASS" if result.get("identical") else "identity FAIL"
    return ", ".join([identity, *cells])


def table(results: dict[str, dict]) -> str:
    """One row per sampled model, from the recorded runs only."""
    lines = [
        "| family | timm model | stages (channels/reduction) | size | result | build s | peak GB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for family, names in SAMPLE.items():
        for name in names:
            result = results.get(name)
            if result is None:
                lines.append(f"| {family} | {name} | - | - | not run | - | - |")
                continue
            stages = " ".join(f"{c}/{r}" for _, c, r in result.get("stages", [])) or "-"
            lines.append(
                f"| {family} | {name} | {stages} | {result.get('export_size', '-')} | "
                f"{_status(result)} | {result.get('build_seconds', '-')} | "
                f"{result.get('peak_rss_gb', '-')} |"
            )
    ran = [r for r in results.values() if "formats" in r]
    working = [
        r
        for r in ran
        if r.get("identical") and all(r["formats"].get(f, {}).get("passed") for f in FORMATS)
    ]
    refused = [r for r in results.values() if "refused" in r]
    lines += [
        "",
        f"{len(results)} models recorded: {len(working)} pass identity, ONNX and pt2; "
        f"{len(refused)} refused with the reason; {len(results) - len(working) - len(refused)} "
        "other. Peak GB: resident set of the whole run (two tasks, identity check, both exports, "
        "verification).",
    ]
    return "\n".join(lines)


def write_table(results: dict[str, dict]) -> None:
    """Replace the text between the timm coverage markers of docs/architectures.md."""
    text = TABLE_FILE.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    TABLE_FILE.write_text(f"{head}{START}\n{table(results)}\n{END}{tail}")


def sample_order() -> list[str]:
    """The whole sample, one model of every family first, each group smallest first (refused
    models, which cost nothing, before all), so a partial run covers the most families."""
    from crossstitch import CrossStitchError
    from crossstitch.timm_backbones import plan

    def cost(name: str) -> int:
        try:
            return plan(name).weights_bytes
        except CrossStitchError:
            return 0

    first = [names[0] for names in SAMPLE.values()]
    rest = [n for names in SAMPLE.values() for n in names[1:]]
    return sorted(first, key=cost) + sorted(rest, key=cost)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="timm models to run [default: the sample]")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--table", action="store_true", help="only rewrite the table")
    parser.add_argument(
        "--missing", action="store_true", help="run only the models not yet recorded"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.table:
        names = args.names or sample_order()
        if args.missing:
            names = [n for n in names if n not in results]
        for name in names:
            result = run_child(name)
            results[name] = result
            print(json.dumps(result), flush=True)
            RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    write_table(results)


if __name__ == "__main__":
    main()
