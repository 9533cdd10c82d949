"""Trigger restoration speed: each trigger model's optimisation on the MNIST-digits LeNet-5 recipes.

    python benchmarks/restore.py [--steps 200] [--attacks none badnets] [--out benchmarks/results/restore.json]

Restoration is most of a clean-data `locate` (500 steps per trigger model by default, all classes at once);
per model (mask, additive, and the source-specific mask model of all-to-all backdoors) this prints the
seconds of the first few steps (compilation included) and the milliseconds per step after it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

WARM_STEPS = 5


def time_model(forward, case, kind: str, steps: int) -> dict:
    """Seconds of WARM_STEPS steps (compiling) and ms per step over `steps` more, for one trigger model."""
    import jax

    from lancet.locate.restore import _optimise

    targets, options = list(range(10)), {}
    batch = 64
    if kind == "pairwise":
        from lancet.locate.restore import PAIRWISE_BATCH

        sources = [s for s in range(10) for t in range(10) if t != s]
        targets = [t for s in range(10) for t in range(10) if t != s]
        options, batch = {"sources": sources, "y_clean": case.y_clean}, PAIRWISE_BATCH
    trigger = "mask" if kind == "pairwise" else kind

    def run(n):
        start = time.perf_counter()
        out = _optimise(forward, case.x_clean, targets, trigger, steps=n, batch=batch, lr=None, lam=None, seed=0,
                        progress=None, **options)
        jax.block_until_ready(out[2])
        return time.perf_counter() - start

    first = run(WARM_STEPS)
    total = run(steps)
    return {"model": kind, "rows": len(targets), "inputs_per_step": len(targets) * batch,
            "first_steps_s": round(first, 2), "ms_per_step": round(1000 * total / steps, 1), "steps": steps}


def main(argv: list[str] | None = None) -> dict:
    """Time each trigger model on each recipe; print a table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--attacks", nargs="+", default=["none", "badnets"])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "restore.json"))
    args = parser.parse_args(argv)
    from lancet import Forward, load_model
    from lancet.case import load_case
    from lancet.models.recipes import Recipe, build_case

    rows = []
    for attack in args.attacks:
        built = build_case(Recipe(attack=attack))
        model = load_model(built.model)
        forward, case = Forward(model), load_case(built.case, model)
        for kind in ("mask", "additive", "pairwise"):
            rows.append({"recipe": f"mnist_digits-lenet5-{attack}", **time_model(forward, case, kind, args.steps)})
            row = rows[-1]
            print(f"{row['recipe']:30s} {kind:9s} {row['rows']:3d} rows x {row['inputs_per_step'] // row['rows']:2d} "
                  f"inputs  first {WARM_STEPS} steps {row['first_steps_s']:6.2f} s  {row['ms_per_step']:6.1f} ms/step",
                  flush=True)
    data = {"command": "python benchmarks/restore.py" + (f" --steps {args.steps}" if args.steps != 200 else ""),
            "environment": environment(), "rows": rows}
    write_json(Path(args.out), data)
    return data


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
