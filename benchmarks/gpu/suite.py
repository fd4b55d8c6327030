"""The GPU readiness suite's steps (``bash benchmarks/gpu/run.sh`` runs this after installing ``.whl/``).

    python benchmarks/gpu/suite.py --out DIR [--smoke] [--only imports,kernels,masking,peers,train,data]

Steps, each a subprocess with its own time limit, in this order:

0. ``imports``: everything the other steps import resolves (deepspeed, lightly, transformers, pydantic,
   webdataset, maskray's modules) and neither Ray nor MLflow gets imported; versions and the device.
1. ``kernels``: ``tests/test_kernels.py`` with compiled kernels on CUDA (``MASKRAY_TRITON_DEVICE=cuda``), fp32
   and bf16 cases.
2. ``masking``: ``benchmarks/masking.py`` (ViT-S/16 and ViT-B/16, 224 px, batch 64 and 256, bf16) against the MAE
   reference and ``torch.compile`` of it, percentages of the copy bandwidth measured in the same run.
3. ``peers``: ``benchmarks/peers_step.py``: one ViT-B/16 MAE step in bf16, maskray vs HF ViTMAE vs lightly at
   batch 256: images/s, ``max_memory_allocated``, the same-weights first-step losses, MFU against the bf16 matmul
   peak measured in the same run.
4. ``train``: ``benchmarks/gpu/train_steps.py``: 100 DeepSpeed steps, ZeRO-0 and ZeRO-2, bf16, one rank.
5. ``data``: ``benchmarks/gpu/data_path.py``: JPEG decode + augmentation per core, GPU decode.

Each step writes ``DIR/<step>.json`` as soon as it ends (with ``targets``: each target of issue 21, met or not,
and the figure), prints one summary line, and everything it prints goes to ``DIR/suite.log``;
``DIR/summary.json`` is rewritten after every step. A step that fails or runs out of time is recorded as such and
the next one runs. ``--smoke``: the same on CPU with tiny shapes, interpreted kernels and short limits (the test
``tests/test_gpu_suite.py``). At most 8 files land in DIR (the device tool brings back 8).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
STEPS = ("imports", "kernels", "masking", "peers", "train", "data")
# the modules the steps import, checked by ``imports`` (and by tests/test_gpu_suite.py)
SUITE_MODULES = ("deepspeed", "lightly.models.modules", "lightly.models.utils", "transformers", "timm", "pydantic",
                 "webdataset", "maskray.engine.step", "maskray.engine.deepspeed_setup", "maskray.masking.ops",
                 "maskray.data.transforms", "peers", "peers_step", "masking", "train_steps", "data_path")
FORBIDDEN = ("ray", "mlflow")
# benchmarks/masking.py's op -> the maskray.masking.ops function it times
OP_NAMES = {"indices": "random_mask_indices", "gather": "embed_visible_patches", "encoder": "embed_visible_patches",
            "decoder": "decoder_unshuffle", "loss": "masked_patch_loss"}
# Ray and MLflow are absent on the GPU machine: the check makes them absent here too (an import of either raises
# ModuleNotFoundError), so a module of ours that needs one fails to import, while a library's guarded optional
# import (DeepSpeed's autotuner tries MLflow) is only recorded.
IMPORTS_CHECK = f"""
import importlib, json, sys
sys.path[:0] = [{str(BENCH)!r}, {str(BENCH / 'gpu')!r}, {str(REPO)!r}]

class Absent:
    attempts = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {FORBIDDEN!r}:
            self.attempts.append(name)
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)", name=name)
        return None

sys.meta_path.insert(0, Absent())
import torch
missing = {{}}
for name in {SUITE_MODULES!r}:
    try:
        importlib.import_module(name)
    except Exception as err:
        missing[name] = f"{{type(err).__name__}}: {{err}}"
def version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None
forbidden = sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
versions = {{n: version(n) for n in ("torch", "triton", "deepspeed", "transformers", "timm", "lightly", "pydantic",
                                    "typing_extensions", "torchvision", "numpy")}}
print(f"python {{sys.version.split()[0]}}, gpu {{gpu}}, cuda {{torch.version.cuda}}, "
      + ", ".join(f"{{k}} {{v}}" for k, v in versions.items()))
print(json.dumps({{"python": sys.version.split()[0], "gpu": gpu, "cuda": torch.version.cuda, "versions": versions,
                  "missing": missing, "forbidden_imported": forbidden, "blocked_attempts": Absent.attempts}}))
"""


def step_commands(step: str, smoke: bool, tmp: Path, out: Path) -> tuple[list[str], dict[str, str], int, Path | None]:
    """(command, extra environment, time limit in s, the JSON file the command writes or None: its last line)."""
    py = sys.executable
    json_out = out / f"{step}.json"
    if step == "imports":
        return [py, "-c", IMPORTS_CHECK], {}, 60, None
    if step == "kernels":
        xml = tmp / "kernels.xml"
        command = [py, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "not slow", f"--junitxml={xml}",
                   str(REPO / "tests" / "test_kernels.py")]
        if smoke:
            return command + ["-k", "in_dtype or unshuffle_half"], {}, 240, xml
        try:
            import xdist  # noqa: F401

            command += ["-n", "4"]  # Triton compiles on 4 cores at once
        except ImportError:
            pass
        return command, {"MASKRAY_TRITON_DEVICE": "cuda"}, 90, xml
    if step == "masking":
        command = [py, str(BENCH / "masking.py"), "--json-out", str(json_out)]
        if smoke:
            return (command + ["--device", "cpu", "--models", "vit_s16", "--batch", "2", "--img-size", "32",
                               "--reps", "1", "--warmup", "0"], {}, 240, json_out)
        # ViT-B/16 first: a run stopped at its limit keeps the cases done (torch.compile's first calls dominate)
        # the kernels themselves against torch.compile of the reference, whatever ops.COMPILED_REFERENCE says
        return (command + ["--models", "vit_b16,vit_s16", "--batch", "256,64"], {"MASKRAY_MASKING_COMPILED": "none"},
                120, json_out)
    if step == "peers":
        command = [py, str(BENCH / "peers_step.py"), "--precision", "bf16", "--rounds", "1", "--json-out",
                   str(json_out)]
        if smoke:
            return command + ["--device", "cpu", "--arch", "demo", "--batch", "2", "--steps", "1", "--warmup",
                              "0"], {}, 300, json_out
        return (command + ["--device", "cuda", "--arch", "vit_b16", "--batch", "256", "--steps", "10", "--warmup",
                           "3"], {"DS_ACCELERATOR": "cuda"}, 100, json_out)
    if step == "train":
        command = [py, str(BENCH / "gpu" / "train_steps.py"), "--json-out", str(json_out)]
        if smoke:
            return command + ["--device", "cpu", "--arch", "demo", "--batch", "4", "--steps", "10"], {}, 240, json_out
        return (command + ["--device", "cuda", "--arch", "vit_b16", "--batch", "128", "--steps", "100"],
                {"DS_ACCELERATOR": "cuda"}, 75, json_out)
    if step == "data":
        command = [py, str(BENCH / "gpu" / "data_path.py"), "--json-out", str(json_out)]
        if smoke:
            return command + ["--device", "cpu", "--images", "8", "--workers", "2"], {}, 120, json_out
        return command + ["--images", "512"], {}, 40, json_out
    raise ValueError(step)


def verbose_result(lines: list[str]) -> dict:
    """Counts from ``pytest -v`` lines, for a run stopped before it wrote its JUnit report."""
    outcomes: dict[str, str] = {}
    kinds = "(PASSED|FAILED|ERROR|SKIPPED)"
    for line in lines:
        found = re.search(rf"(\S+::\S+)\s+{kinds}|{kinds}\s+(\S+::\S+)", line)
        if found:
            test, outcome = (found.group(1), found.group(2)) if found.group(1) else (found.group(4), found.group(3))
            outcomes[test] = outcome
    count = lambda kind: sum(1 for o in outcomes.values() if o == kind)  # noqa: E731
    return {"tests": len(outcomes), "passed": count("PASSED"), "failures": count("FAILED"), "errors": count("ERROR"),
            "skipped": count("SKIPPED"), "failed": [t for t, o in outcomes.items() if o in ("FAILED", "ERROR")],
            "incomplete": True}


def junit_result(xml: Path) -> dict:
    """Counts and the failed tests' names of a pytest JUnit XML report."""
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed, "time_s": float(suite.get("time", 0.0))}


def _target(value, threshold, above: bool = True) -> dict:
    met = None if value is None else (value >= threshold if above else value <= threshold)
    return {"value": value, "target": f"{'>=' if above else '<='} {threshold}", "met": met}


def targets(step: str, result: dict) -> dict:
    """Issue 21's targets that this step's figures decide (met: None when the figure is missing)."""
    found: dict = {}
    if step == "imports":
        found["all imports resolve"] = {"value": sorted(result.get("missing", {})), "met": not result.get("missing")}
        found["no ray / mlflow"] = {"value": result.get("forbidden_imported"),
                                    "met": not result.get("forbidden_imported")}
    if step == "kernels":
        found["kernel tests pass"] = {"value": f"{result.get('passed')}/{result.get('tests')}",
                                      "met": result.get("tests", 0) > 0 and not result.get("failed")}
    if step == "masking":
        for case in result.get("cases", []):
            name = f"{case['model']} b{case['batch']}"
            rows = case["results"]
            found[f"{name}: embedding fwd+bwd vs MAE reference"] = _target(
                rows["encoder"].get("speedup_vs_reference_fwd_bwd"), 5.0)
            found[f"{name}: gather % of copy bandwidth"] = _target(rows["gather"]["maskray"].get("pct_peak_fwd"), 60.0)
            losing = [op for op, row in rows.items()
                      if row.get("speedup_vs_compiled_fwd_bwd", row.get("speedup_vs_compiled_fwd", 2.0)) < 1.0]
            # the ops of maskray.masking.ops.COMPILED_REFERENCE for this GPU (gather is part of the embedding)
            found[f"{name}: ops slower than torch.compile of the reference"] = {
                "value": losing, "met": not losing,
                "ops_for_compiled_reference": sorted({OP_NAMES[op] for op in losing})}
    if step == "peers":
        rows = {row["library"]: row for row in result.get("rows", [])}
        ours = rows.get("maskray")
        for peer in ("hf", "lightly"):
            if ours and peer in rows:
                found[f"images/s maskray / {peer}"] = _target(rows[peer]["maskray_speed_ratio"], 1.3)
                found[f"memory maskray / {peer}"] = _target(rows[peer]["maskray_training_memory_ratio"], 1.0, False)
        if ours:
            found["maskray MFU (bf16 matmul peak)"] = _target(ours["peak_fraction"], 0.4)
        losses = result.get("same_weights_losses") or {}
        if losses:
            spread = (max(losses.values()) - min(losses.values())) / max(abs(losses["maskray"]), 1e-12)
            tolerance = 2e-2 if result.get("same_weights_precision") == "bf16" else 1e-4
            found["same first-step loss (relative spread)"] = _target(spread, tolerance, False)
    if step == "train":
        for stage in result.get("stages", []):
            found[f"ZeRO-{stage['zero_stage']}: loss falls, finite"] = {
                "value": [stage["first_tenth_mean"], stage["last_tenth_mean"]], "met": stage["ok"]}
    if step == "data" and "gpu_vs_cpu_all" in result:
        found["GPU decode faster than all cores"] = _target(result["gpu_vs_cpu_all"], 1.0)
    return found


def summary_line(step: str, record: dict) -> str:
    result, status = record.get("result") or {}, record["status"]
    marks = record.get("targets", {})
    met = sum(1 for t in marks.values() if t["met"])
    head = f"[{step}] {status} in {record['seconds']:.0f}s; targets met {met}/{len(marks)}"
    missed = [name for name, t in marks.items() if t["met"] is False]
    detail = ""
    if step == "imports" and result:
        detail = f"gpu {result.get('gpu')}, torch {result['versions'].get('torch')}"
    elif step == "kernels" and result:
        detail = (f"{result.get('passed')} passed, {len(result.get('failed', []))} failed, "
                  f"{result.get('skipped')} skipped")
    elif step == "peers" and result:
        detail = ", ".join(f"{row['library']} {row['images_per_s']:.1f} img/s {row['training_mib']:.0f} MiB "
                           f"MFU {100 * row['peak_fraction']:.0f}%" for row in result.get("rows", []))
    elif step == "train" and result:
        detail = ", ".join(f"ZeRO-{s['zero_stage']} {s['first_loss']:.3f}->{s['last_loss']:.3f} "
                           f"{s['images_per_s'] or 0:.1f} img/s" for s in result.get("stages", []))
    elif step == "data" and result:
        detail = f"{result['cpu_all_per_core_images_per_s']:.0f} img/s per core"
        if "gpu_decode_images_per_s" in result:
            detail += f", GPU decode {result['gpu_decode_images_per_s']:.0f} img/s"
    elif step == "masking" and result:
        detail = f"{len(result.get('cases', []))} cases, {result.get('peak_note')}"
    return head + (f"; {detail}" if detail else "") + (f"; missed: {', '.join(missed)}" if missed else "")


def run_step(step: str, smoke: bool, out: Path, tmp: Path, log) -> dict:
    command, env, limit, json_file = step_commands(step, smoke, tmp, out)
    env = {**os.environ, **env}
    if smoke:  # CPU: kernels through Triton's interpreter, DeepSpeed's CPU accelerator
        env.update(TRITON_INTERPRET="1", MASKRAY_TRITON_INTERPRET="1", DS_ACCELERATOR="cpu")
    log.write(f"\n===== {step}: {' '.join(command[:3])} ... (limit {limit}s)\n")
    log.flush()
    start = time.perf_counter()
    status, lines = "ok", []
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        stdout, _ = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)  # the step's own process group (its subprocesses too)
        stdout, _ = process.communicate()
        status = f"timed out after {limit}s"
    log.write(stdout or "")
    lines = (stdout or "").splitlines()
    if status == "ok" and process.returncode:
        status = f"exit {process.returncode}"
    seconds = time.perf_counter() - start
    result = None
    try:
        if step == "kernels":
            result = junit_result(json_file) if json_file.exists() else verbose_result(lines)
        elif json_file is not None and json_file.exists():
            result = json.loads(json_file.read_text())
        else:
            result = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
    except (StopIteration, ValueError, OSError, ET.ParseError) as err:
        if status == "ok":
            status = f"no result ({type(err).__name__})"
    if status != "ok":
        log.write("".join(f"  | {line}\n" for line in lines[-30:]))
    record = {"step": step, "status": status, "seconds": seconds, "command": command, "result": result}
    record["targets"] = targets(step, result or {})
    (out / f"{step}.json").write_text(json.dumps(record) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "outputs" / "gpu-suite"))
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, interpreted kernels")
    parser.add_argument("--only", default=",".join(STEPS), help="comma list of steps: " + ",".join(STEPS))
    args = parser.parse_args(argv)
    only = [step.strip() for step in args.only.split(",") if step.strip()]
    unknown = set(only) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; choose from {STEPS}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="maskray-gpu-suite-") as tmp, open(out / "suite.log", "a") as log:
        log.write(f"\n##### suite {'--smoke ' if args.smoke else ''}{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        for step in [step for step in STEPS if step in only]:
            record = run_step(step, args.smoke, out, Path(tmp), log)
            records[step] = record
            line = summary_line(step, record)
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()
            summary = {"smoke": args.smoke, "seconds": time.perf_counter() - started,
                       "steps": {name: {"status": r["status"], "seconds": r["seconds"], "targets": r["targets"]}
                                 for name, r in records.items()}}
            (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"suite done in {time.perf_counter() - started:.0f}s; results in {out}", flush=True)
    return 0 if all(r["status"] == "ok" for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
