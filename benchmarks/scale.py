"""Scale benchmark: `lancet locate` and `lancet repair` on an ImageNet-size model, for time and peak memory.

The model is ResNet-18 as torchvision defines it (7x7 stride-2 stem, max pool, widths 64-512, 1,000
classes, 224 x 224 inputs, 11.7 M weights), with random weights (seeded; BatchNorm statistics spread so
that outputs vary): no package here ships trained ImageNet weights. A random network has no backdoor, so
the case is built from what it does: its two most frequent labels on random images, the error inputs
being images it gives the first label (their 'right' label the second), each with a companion it gives
the second. Locating then has a real error to remove, not a planted one, and the figures are for the
engine's work at this size (scores over 11.7 M weights, the ablation search, fine-tuning), not for a
repair's quality.

    python benchmarks/scale.py [--pairs 40] [--clean 100] [--repair-timeout 3600] [--out FILE]

Each lancet command runs in its own process; its peak memory is that process's max RSS. The repair
(fine-tuning candidate sets of an ImageNet-size network on 2 CPU cores) is stopped after
`--repair-timeout` seconds and recorded as such.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, write_json  # noqa: E402


def imagenet_resnet18(seed: int = 0):
    """torchvision's ResNet-18 layout from the zoo's BasicBlock, random weights, spread BN statistics."""
    import torch
    from torch import nn

    from lancet.models.torch_zoo import BasicBlock

    torch.manual_seed(seed)

    class ResNet18(nn.Module):
        def __init__(self, width: int = 64, classes: int = 1000):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            blocks, cin = [], width
            for stage, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
                for index in range(2):
                    blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and index == 0 else 1))
                    cin = cout
            self.blocks, self.head = nn.Sequential(*blocks), nn.Linear(cin, classes)

        def forward(self, x):
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))

    net = ResNet18().eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 1.5)
                module.running_mean.uniform_(-0.1, 0.1)
    return net


def build(folder: Path, pairs: int, clean: int, seed: int = 0) -> tuple[Path, Path, dict]:
    """The ONNX file and case.npz (see the module docstring); facts about them."""
    import onnx

    from lancet.converters.torch_export import export_torch
    from lancet.runtime import ort_session

    rng = np.random.default_rng(seed)
    model = folder / "resnet18-imagenet.onnx"
    export_torch(imagenet_resnet18(seed), rng.standard_normal((2, 3, 224, 224)).astype(np.float32), model)
    session = ort_session(model)
    name = session.get_inputs()[0].name
    pool = rng.standard_normal((clean + 4 * pairs, 3, 224, 224)).astype(np.float32)
    labels = np.concatenate([session.run(None, {name: pool[i:i + 32]})[0].argmax(1) for i in range(0, len(pool), 32)])
    first, second = np.bincount(labels).argsort()[::-1][:2]
    wrong, right = np.where(labels == first)[0], np.where(labels == second)[0]
    if len(wrong) < pairs or not len(right):
        raise SystemExit(f"the random network labels too few images {first} / {second}; try another --seed")
    error_rows = wrong[:pairs]
    clean_rows = np.setdiff1d(np.arange(len(pool)), error_rows)[:clean]
    case = folder / "case.npz"
    np.savez(case, x_clean=pool[clean_rows], y_clean=labels[clean_rows].astype(np.int64), x_error=pool[error_rows],
             y_error=np.full(pairs, second, np.int64), x_companion=pool[right[np.arange(pairs) % len(right)]])
    weights = sum(int(np.prod(init.dims)) for init in onnx.load(str(model)).graph.initializer)
    return model, case, {"labels": [int(first), int(second)], "parameters": weights, "pairs": pairs, "clean": clean}


def run(command: list[str], timeout: float | None = None) -> dict:
    """Run a lancet command in a process of its own (through a child of this script, so that the peak
    memory measured is that command's alone): wall seconds, exit code (None: stopped at `timeout`), peak
    memory."""
    child = [sys.executable, __file__, "--child", str(timeout or 0), *command]
    done = subprocess.run(child, capture_output=True, text=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return {"command": "lancet " + " ".join(command), **measured}


def _child(timeout: float, command: list[str]) -> None:
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "lancet.cli", *command], capture_output=True, text=True,
                              timeout=timeout or None)
        code, tail = done.returncode, done.stderr[-400:]
    except subprocess.TimeoutExpired:
        code, tail = None, f"stopped after {timeout:.0f} s"
    print(json.dumps({"exit": code, "seconds": round(time.perf_counter() - start, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0, 1),
                      "stderr_tail": tail}))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return _child(float(sys.argv[2]), sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--clean", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repair-timeout", type=float, default=3600.0, help="seconds before the repair is stopped")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "scale.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, case, facts = build(folder, args.pairs, args.clean, args.seed)
        locate = run(["locate", str(model), "--data", str(case), "--report", str(folder / "locate.json")])
        stages = json.loads((folder / "locate.json").read_text()).get("seconds", {}) if locate["exit"] == 0 else {}
        repair = run(["repair", str(model), "--data", str(case), "--out", str(folder / "repaired.onnx"),
                      "--report", str(folder / "repair.json"), "--force"], args.repair_timeout)
        report = json.loads((folder / "repair.json").read_text()) if (folder / "repair.json").exists() else {}
    result = {"environment": environment(), "model": "ResNet-18, ImageNet layout, random weights", **facts,
              "locate": {**locate, "stages": stages},
              "repair": {**repair, "status": report.get("status"), "stages": report.get("seconds", {})}}
    write_json(Path(args.out), result)
    print(f"{'command':8s} {'exit':>4s} {'seconds':>8s} {'peak MB':>8s}  stages")
    for key in ("locate", "repair"):
        entry = result[key]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in entry["stages"].items())
        code = "stop" if entry["exit"] is None else str(entry["exit"])
        print(f"{key:8s} {code:>4s} {entry['seconds']:>8.1f} {entry['peak_rss_mb']:>8.1f}  {stages}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
