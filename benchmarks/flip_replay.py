"""Replay neuron-flip's pick among its options under other rules, from benchmark records.

`lancet repair --method flip` weighs several flip sets (`lancet.repair._flip_set`: 1, 1.25 and 1.5 times the
minimal set of every successful search scope), each with its fix rate on the pairs and its accuracy drop on
the defender's clean images, and keeps one (`_pick_flip`). Benchmark records run since the options got
held-out figures (`details.flip.options[].heldout`) hold what every option would have given, so any pick
rule can be replayed on them without running a repair again:

    python benchmarks/flip_replay.py RESULTS.json [...] [--rules current least-drop ...] [--json OUT.json]

Each rule sees only what the tool sees (the defender's figures); the held-out figures only score its pick.
`oracle` counts the cells where any option meets the goal: what the best pick in hindsight would reach.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from lancet.repair import SEARCH_TARGET, FlipOption, _pick_flip

GOAL_ASR, GOAL_DROP = 0.02, 0.01  # issue 4's goal on held-out data


def _options(record: dict) -> list[tuple[FlipOption, dict]]:
    """The flip options of a record that carry held-out figures, each with them."""
    entries = (record.get("details", {}).get("flip") or {}).get("options") or []
    fields = set(FlipOption.__dataclass_fields__)
    return [(FlipOption(**{k: v for k, v in e.items() if k in fields}), e["heldout"]) for e in entries
            if "heldout" in e]


def current(options: list[FlipOption], bound: float) -> FlipOption | None:
    """The engine's rule: the largest margin within the bound, then the smallest drop, then the smallest set."""
    return _pick_flip(options, bound, SEARCH_TARGET["flip"])


def least_drop(options: list[FlipOption], bound: float) -> FlipOption | None:
    """The smallest drop on the defender's images among the options reaching the fix target within the
    bound, then the largest margin, then the smallest set."""
    ok = [o for o in options if o.fix_rate >= SEARCH_TARGET["flip"] and o.drop_points <= bound]
    return min(ok, key=lambda o: (o.drop_points, -o.margin, o.k)) if ok else None


def half_bound(options: list[FlipOption], bound: float) -> FlipOption | None:
    """The engine's rule within half the bound, else within the bound."""
    return current(options, bound / 2) or current(options, bound)


RULES: dict[str, Callable[[list[FlipOption], float], FlipOption | None]] = {
    "current": current, "least-drop": least_drop, "half-bound": half_bound}


def replay(records: list[dict], rules: list[str]) -> dict:
    """Per cell and rule: the picked option and its held-out figures; per rule: cells meeting the goal."""
    cells, met, oracle = [], {rule: 0 for rule in rules}, 0
    for record in records:
        if record.get("method") != "lancet-flip":
            continue
        pairs = _options(record)
        if not pairs:
            continue
        bound = float(record.get("max_acc_drop", 2.0))
        before = record["before"]

        def meets(heldout: dict) -> bool:
            return heldout["asr"] <= GOAL_ASR and before["c_acc"] - heldout["c_acc"] <= GOAL_DROP

        cell = {"row": record["row"], "setting": record["setting"], "options": len(pairs), "picks": {},
                "oracle": any(meets(h) for _, h in pairs)}
        oracle += cell["oracle"]
        for rule in rules:
            picked = RULES[rule]([o for o, _ in pairs], bound)
            if picked is None:
                cell["picks"][rule] = {"picked": None, "met": False}
                continue
            heldout = next(h for o, h in pairs if o == picked)
            drop, asr = before["c_acc"] - heldout["c_acc"], heldout["asr"]
            ok = meets(heldout)
            met[rule] += ok
            cell["picks"][rule] = {"scope": picked.scope, "margin": picked.margin, "k": picked.k,
                                   "defender_drop": picked.drop_points, "heldout_drop": 100 * drop,
                                   "heldout_asr": 100 * asr, "met": ok}
        cells.append(cell)
    return {"cells": cells, "met": met, "oracle": oracle, "of": len(cells)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="benchmark JSON files (benchmarks/repair.py --out)")
    parser.add_argument("--rules", nargs="+", choices=sorted(RULES), default=sorted(RULES))
    parser.add_argument("--json", help="write the replay here")
    args = parser.parse_args(argv)
    records = [r for path in args.results for row in json.loads(Path(path).read_text())["rows"].values()
               for r in row["records"]]
    out = replay(records, args.rules)
    width = max([len(c["row"]) for c in out["cells"]] + [4])
    print(f"{'row':{width}} setting  " + "  ".join(f"{rule:>24}" for rule in args.rules))
    for cell in out["cells"]:
        shown = []
        for rule in args.rules:
            p = cell["picks"][rule]
            shown.append("rejected" if p.get("picked", 1) is None else
                         f"{p['heldout_asr']:4.1f}% -{p['heldout_drop']:3.1f} {'met ' if p['met'] else 'miss'} "
                         f"({p['defender_drop']:.1f})")
        print(f"{cell['row']:{width}} {cell['setting']:8} " + "  ".join(f"{s:>24}" for s in shown))
    print("goal met: " + ", ".join(f"{rule} {out['met'][rule]} of {out['of']}" for rule in args.rules)
          + f"; some option meets it (best pick in hindsight) in {out['oracle']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
