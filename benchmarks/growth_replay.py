"""Replay fine-tuning's set growth and pick at other `FINETUNE_GROW_BELOW` values, from benchmark records.

With triggered inputs, `lancet repair --method finetune` trains its candidate sets at 2x their ablation set
and, while no accepted set fixes FINETUNE_GROW_BELOW of the given error inputs, again at 4x and 8x
(`lancet.repair._finetune_rounds`); `_pick_finetuned` then keeps one of the largest size's accepted sets.
Every benchmark record lists each trained set with its fix rate, held-back accuracy and held-out figures
(`details.finetune_tried`), and the sets of one size come out the same whatever the threshold (each is
trained from the same seed), so a run at a high threshold holds the runs at every lower one as prefixes:
this script replays the growth stop and the pick at each threshold asked for and prints the held-out
C-Acc / ASR of the set each would keep.

    python benchmarks/growth_replay.py RESULTS.json [...] [--thresholds 0.98 0.985 0.99] [--json OUT.json]

A replay is exact only up to the threshold the records were run at: a cell whose sets stopped growing at
the run's threshold says nothing about the sizes a higher one would have trained (marked `not run`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lancet.repair import FINETUNE_MARGIN, _finetune_rounds, _pick_finetuned, _Trained

GOAL_ASR, GOAL_DROP = 0.02, 0.01  # issue 4's goal on held-out data


class _NotRecorded(Exception):
    """The growth asked for a size the record does not hold."""


def replay(record: dict, grow_below: float) -> dict:
    """The set a fine-tuning run with triggered inputs would keep at `grow_below`, from one record's
    `finetune_tried`: its scope, size, fix rate and held-out figures, or `not_run` when the growth would go
    past the sizes the record holds (`unrecorded`: the record lacks the fix rates or the sizes). The engine's
    own `_finetune_rounds` decides the growth, fed the recorded sets in place of training them."""
    tried = record["details"]["finetune_tried"]
    if any(t.get("accepted") and t.get("error_fix_rate") is None for t in tried):
        return {"unrecorded": True}  # run before fix rates were recorded
    if any(t.get("margin") is None for t in tried):
        if len({t["scope"] for t in tried}) < len(tried):
            return {"unrecorded": True}  # grown before the sizes were recorded (code 0a2d218)
        tried = [{**t, "margin": FINETUNE_MARGIN} for t in tried]

    def sets_at(margin: float) -> list[tuple]:
        at = [t for t in tried if t["margin"] == margin]
        if not at and all(t["margin"] < margin for t in tried):
            raise _NotRecorded
        return [([None] * t["neurons"], t["scope"], t["depth"], t.get("reads_pixels", False)) for t in at]

    by_set = {(t["margin"], t["scope"], t["neurons"]): t for t in tried}
    used: list[dict] = []
    try:
        for margin, trained, scope, _, _ in _finetune_rounds(sets_at, used, grow=True, grow_below=grow_below):
            used.append(by_set[margin, scope, len(trained)])
    except _NotRecorded:
        return {"not_run": True}
    kept = [_Trained({}, {}, {"error_fix_rate": t["error_fix_rate"]}, [], t["scope"], t["neurons"], {},
                     t["heldback_accuracy"], depth=t["depth"], reads_pixels=t.get("reads_pixels", False),
                     attempt=t, margin=t["margin"]) for t in used if t["accepted"]]
    if not kept:
        return {"rejected": True}
    chosen = _pick_finetuned(kept, None).attempt
    heldout = chosen["heldout"]
    return {"scope": chosen["scope"], "margin": chosen["margin"],
            "neurons": chosen["neurons"], "error_fix_rate": chosen["error_fix_rate"],
            "c_acc": heldout["c_acc"], "asr": heldout["asr"],
            "met": heldout["asr"] <= GOAL_ASR and record["before"]["c_acc"] - heldout["c_acc"] <= GOAL_DROP}


def _cell(outcome: dict) -> str:
    if outcome.get("not_run"):
        return "not run"
    if outcome.get("unrecorded"):
        return "sizes or fix rates not recorded"
    if outcome.get("rejected"):
        return "none accepted"
    return (f"{outcome['c_acc'] * 100:.1f} / {outcome['asr'] * 100:.2f} ({outcome['margin']:g}x, fix "
            f"{outcome['error_fix_rate']:.3f}){'' if outcome['met'] else ' miss'}")


def main(argv: list[str] | None = None) -> list[dict]:
    """Replay every fine-tuning record with triggered inputs in the given result files; print a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="benchmarks/repair.py JSON files")
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.98, 0.985, 0.99])
    parser.add_argument("--json", type=Path, help="write the replayed outcomes here")
    args = parser.parse_args(argv)
    rows = []
    for path in args.results:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("rows"), dict):
            continue  # not a benchmarks/repair.py result file
        for name, row in data["rows"].items():
            for record in row["records"]:
                if record["method"] != "lancet-finetune" or record["setting"] != "error" \
                        or not record.get("details", {}).get("finetune_tried"):
                    continue
                rows.append({"file": path.name, "row": name, "before_c_acc": record["before"]["c_acc"],
                             "replayed": {str(t): replay(record, t) for t in args.thresholds}})
    header = ["file", "row", "before C-Acc"] + [f"grow below {t:g}: C-Acc / ASR" for t in args.thresholds]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [row["file"], row["row"], f"{row['before_c_acc'] * 100:.1f}"]
        cells += [_cell(row["replayed"][str(t)]) for t in args.thresholds]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
