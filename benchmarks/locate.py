"""Locate-time benchmark: the JAX ablation search against the straightforward port.

The straightforward port evaluates each candidate ablation set by writing a model with the top-k weights
zeroed, opening an onnxruntime session on it and running every pair and clean input through it. Ours
evaluates the same candidate sets in the jitted, k-vmapped ablation search. Both evaluate the same k values
(those our doubling + bisection search visits, every scope); the port is run on the first `--port-limit`
of them and its per-candidate time is extrapolated to the full list (said so in the output).

    python benchmarks/locate.py [--model resnet|lenet] [--scopes all|global] [--port-limit 12] [--out FILE]

Each implementation runs in its own subprocess, so peak memory (max RSS) is its own. Ours runs twice, with
the compile cache the CLI uses (a fresh folder): first cold, as on a model never seen, then warm, as when a
second `lancet locate` or `lancet repair` runs on the same model (the programs are loaded, not compiled).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, write_json  # noqa: E402

RECIPES = {
    # ResNet-18 (CIFAR variant, width 16) with a blended trigger on Fashion-MNIST: the locate issue's model.
    "resnet": dict(dataset="fashion_mnist", arch="resnet18", attack="blended", train_size=10000, epochs=4,
                   lr=1e-3, defender_clean=1000, defender_error=110, test_size=3000),
    "lenet": dict(),
}


def _setup(name: str):
    from lancet import Forward, load_model
    from lancet.case import load_case
    from lancet.locate import build_pairs, score_neurons
    from lancet.models.recipes import Recipe, build_case
    from lancet.neurons import find_layers

    built = build_case(Recipe(**RECIPES[name]))
    model = load_model(built.model)
    case = load_case(built.case, model)
    forward = Forward(model)
    pairs = build_pairs(forward, case)
    start = time.perf_counter()
    scores = score_neurons(forward, pairs, case.x_clean, case.y_clean, find_layers(model))
    return built, model, case, forward, pairs, scores, time.perf_counter() - start


def run_ours(name: str, scopes: str = "all") -> dict:
    """Full locate stages with the JAX engine; returns timings and the k values each scope visited."""
    from lancet import enable_compile_cache
    from lancet.locate import progressive_ablation

    enable_compile_cache()  # the folder from $LANCET_COMPILE_CACHE, as main() sets it
    built, model, case, forward, pairs, scores, score_seconds = _setup(name)
    start = time.perf_counter()
    chosen, results = progressive_ablation(forward, scores, pairs, case.x_clean, case.y_clean, target_fix=0.99,
                                           scopes=scopes)
    seconds = time.perf_counter() - start
    candidates = [(r.scope, p["k"]) for r in results for p in r.curve if p["k"] > 0]
    return {"impl": "jax", "model": str(built.model), "pairs": pairs.used, "clean": len(case.x_clean),
            "score_seconds": score_seconds, "ablation_seconds": seconds, "candidates": candidates,
            "per_candidate_seconds": seconds / max(1, len(candidates)), "eins": len(chosen.eins),
            "total_neurons": scores.total_neurons, "peak_rss_mb": _peak_rss_mb()}


def run_port(name: str, candidates: list, limit: int) -> dict:
    """One onnxruntime session per candidate ablation set, on the same pairs and clean set."""
    import onnx

    from lancet.locate.ablation import Ablator
    from lancet.runtime import ort_session

    built, model, case, forward, pairs, scores, _ = _setup(name)
    ablator = Ablator(forward, scores, pairs, case.x_clean, case.y_clean)
    proto = onnx.load(str(built.model))
    x = np.concatenate([pairs.x_error, case.x_clean])
    wrong = np.concatenate([pairs.y_wrong, np.full(len(case.x_clean), -1)])
    right = np.concatenate([pairs.y_right, case.y_clean])
    ranks_cache: dict = {}
    start = time.perf_counter()
    done = []
    for scope, k in candidates[:limit]:
        if scope not in ranks_cache:
            ranks_cache[scope] = {u: np.asarray(r) for u, r in ablator.ranks(scope)[0].items()}
        ranks = ranks_cache[scope]
        edited = onnx.ModelProto()
        edited.CopyFrom(proto)
        for init in edited.graph.initializer:
            if init.name in ranks:
                value = onnx.numpy_helper.to_array(init).copy()
                value[ranks[init.name] < k] = 0
                init.CopyFrom(onnx.numpy_helper.from_array(value, init.name))
        session = ort_session(edited.SerializeToString())
        name_in = session.get_inputs()[0].name
        pred = np.concatenate([session.run(None, {name_in: x[i:i + 256]})[0].argmax(-1) for i in range(0, len(x), 256)])
        is_pair = np.arange(len(x)) < pairs.used
        done.append({"scope": scope, "k": k, "fix_rate": float(np.mean(pred[is_pair] != wrong[is_pair])),
                     "clean_accuracy": float(np.mean(pred[~is_pair] == right[~is_pair]))})
    seconds = time.perf_counter() - start
    return {"impl": "onnxruntime-per-candidate", "evaluated": len(done), "seconds": seconds,
            "per_candidate_seconds": seconds / max(1, len(done)), "points": done, "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(args: list[str], env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(RECIPES), default="resnet")
    parser.add_argument("--port-limit", type=int, default=12)
    parser.add_argument("--scopes", choices=["all", "global"], default="all",
                        help="'global' skips the per-layer searches (minutes each on a CPU ResNet)")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/locate-MODEL.json)")
    parser.add_argument("--child", choices=["ours", "port"], help=argparse.SUPPRESS)
    parser.add_argument("--candidates", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "ours":
        print(json.dumps(run_ours(args.model, args.scopes)))
        return
    if args.child == "port":
        print(json.dumps(run_port(args.model, json.loads(args.candidates), args.port_limit)))
        return
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "LANCET_COMPILE_CACHE": cache}
        ours, warm = (_child(["--model", args.model, "--child", "ours", "--scopes", args.scopes], env)
                      for _ in range(2))
    port = _child(["--model", args.model, "--child", "port", "--port-limit", str(args.port_limit),
                   "--candidates", json.dumps(ours["candidates"])])
    n = len(ours["candidates"])
    port_total = port["per_candidate_seconds"] * n
    ratio = port["per_candidate_seconds"] / ours["per_candidate_seconds"]
    ratio_warm = port["per_candidate_seconds"] / warm["per_candidate_seconds"]
    rows = [
        ("candidate ablation sets (all scopes)", f"{n}", f"{n} ({port['evaluated']} run, rest extrapolated)"),
        ("seconds per candidate", f"{ours['per_candidate_seconds']:.3f}", f"{port['per_candidate_seconds']:.3f}"),
        ("  compile cache warm", f"{warm['per_candidate_seconds']:.3f}", ""),
        ("ablation search seconds", f"{ours['ablation_seconds']:.1f}", f"{port_total:.1f} (extrapolated)"),
        ("  compile cache warm", f"{warm['ablation_seconds']:.1f}", ""),
        ("neuron scoring seconds (cold / warm)",
         f"{ours['score_seconds']:.1f} / {warm['score_seconds']:.1f}", "n/a (no gradients)"),
        ("peak RSS (MB)", f"{ours['peak_rss_mb']:.0f}", f"{port['peak_rss_mb']:.0f}"),
    ]
    print(f"locate benchmark: {args.model}, {ours['pairs']} pairs + {ours['clean']} clean inputs, "
          f"{ours['total_neurons']} weight neurons")
    print(f"| {'':40} | {'JAX (ours)':>12} | {'ORT per candidate':>36} |")
    print(f"|{'-' * 42}|{'-' * 14}|{'-' * 38}|")
    for label, a, b in rows:
        print(f"| {label:40} | {a:>12} | {b:>36} |")
    print(f"speed-up of ours over the port: {ratio:.2f}x first run, {ratio_warm:.2f}x with the compile cache warm "
          "(goal: >= 10x)")
    assert warm.pop("candidates") == ours.pop("candidates"), "the warm run searched other candidates"
    out = args.out or str(Path(__file__).parent / "results" / f"locate-{args.model}.json")
    write_json(out, {"environment": environment(), "model": args.model, "scopes": args.scopes,
                     "ours": ours, "ours_compile_cache_warm": warm, "port": port, "candidates": n,
                     "port_extrapolated_seconds": port_total, "speedup": ratio, "speedup_warm": ratio_warm})


if __name__ == "__main__":
    main()
