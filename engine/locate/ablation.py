"""Step 4, progressive neuron ablation: ablate neurons in score order until the error disappears.

The top-k neurons (weight neurons zeroed, channel neurons masked) are ablated for k = 1, 2, 4, ... until the
fix rate on the pairs (share of error inputs that no longer get the wrong label) reaches the target; then the
gap is narrowed by batched bisection. Each step evaluates every pair for several k at once (vmap over k;
on CPU, weight neurons: one k after another, and the doubling stops at the first k that reaches the target)
in one jitted call per sample chunk. The clean set, usually ten times the pairs, is evaluated only where its
accuracy decides something: at the minimal k reaching the target (is the drop within the bound?) and, when
it is not, at the k tried in order of fix rate until one keeps the bound, then at the k a bisection between
that k and the next larger one tries for the bound (the best set within it: the highest fix rate), each
abandoned as soon as it has missed too many inputs to keep the bound (the inputs missed at earlier k run
first, so that an out-of-bound k shows itself early); `full_curve` evaluates it at every k anyway (for
the plot). The minimal set reaching the target is the EIN set when clean accuracy drops by at most the
bound. Done globally (all layers ranked together) and within each layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from ..forward import Edit, Forward, build_apply, live_tensors
from .common import chunks, class_logits, logit_tensor, make_logits_fn, pad_to
from .pairs import Pairs
from .valuation import NeuronScores

NOT_CANDIDATE = np.iinfo(np.int32).max
BISECTION_POINTS = 7  # k values tried per bisection round (one batched call)
MAX_LAYER_SCOPES = 6  # per-layer searches after the global one (the best-scored layers)
K_TOLERANCE = 0.02  # bisection stops once the EIN count is known to 2 %
PREFIX_CACHE_BYTES = 1 << 30  # cached prefix activations, all starts together; beyond it, full forwards


@dataclass
class AblationResult:
    """The outcome of one search scope ('global' or one layer)."""

    scope: str
    granularity: str
    candidates: int
    k: int | None
    fix_rate: float
    clean_accuracy: float
    clean_accuracy_before: float
    success: bool
    curve: list[dict] = field(default_factory=list)  # clean_accuracy None where the clean set was not run
    eins: list[dict] = field(default_factory=list)
    k_target: int | None = None  # smallest k reaching the target fix rate, whatever its accuracy cost

    @property
    def clean_drop_points(self) -> float:
        return 100.0 * (self.clean_accuracy_before - self.clean_accuracy)

    def summary(self) -> dict:
        """JSON-ready form without the EIN list."""
        return {"scope": self.scope, "granularity": self.granularity, "candidates": self.candidates, "k": self.k,
                "fix_rate": self.fix_rate, "clean_accuracy": self.clean_accuracy,
                "clean_accuracy_before": self.clean_accuracy_before,
                "clean_drop_points": self.clean_drop_points, "success": self.success, "k_target": self.k_target}


@dataclass
class Evaluation:
    """Per k of one `Ablator.evaluate_bounded` call (NaN for a part not run), and per clean input."""

    fix: np.ndarray  # share of pairs no longer given the wrong label
    accuracy: np.ndarray  # clean accuracy; NaN where the clean set was abandoned
    ceiling: np.ndarray  # the clean accuracy at most: every input not run counted right
    rows_run: np.ndarray  # clean inputs run before the result was known
    misses: np.ndarray  # per clean input (original order): how many of the k run on it got it wrong
    class_accuracy: np.ndarray  # (k, class) clean accuracy per class of y_clean; NaN where abandoned or absent


class Ablator:
    """Evaluates top-k ablations for a rank assignment; jitted once per model, granularity and chunk size."""

    def __init__(self, forward: Forward, scores: NeuronScores, pairs: Pairs, x_clean: np.ndarray,
                 y_clean: np.ndarray, batch: int = 256, k_chunk: int = 8, factor: float = 0.0,
                 full_curve: bool = False):
        self.forward = forward
        self.full_curve = full_curve  # evaluate the clean set at every k tried, not only where it decides
        self.factor = factor  # what the top-k neurons are multiplied by: 0 ablates, -1 flips
        self.scores = scores
        self.granularity = scores.granularity
        self.units = list(scores.scores)
        self.batch = batch
        self.k_chunk = k_chunk
        self.n_pairs = pairs.used
        self.x = np.concatenate([pairs.x_error, x_clean])
        self.wrong = np.concatenate([pairs.y_wrong, np.full(len(x_clean), -1, np.int64)])
        self.right = np.concatenate([pairs.y_right, y_clean])
        self.is_pair = np.concatenate([np.ones(pairs.used, np.float32), np.zeros(len(x_clean), np.float32)])
        self.n_clean = len(x_clean)
        self.parts = {"pairs": slice(0, pairs.used), "clean": slice(pairs.used, len(self.x))}
        # Both parts run in chunks of one size (about the pair count): one compiled suffix per start node,
        # where a size per part compiled two (most of the search's time on a LeNet).
        self.size = min(batch, max(pairs.used, 64), len(self.x))
        # Per start node: the jitted counts of the suffix and the prefix's live tensors without a batch axis
        # (shape arithmetic); per (start node, part): the batched live tensors of the cached prefix.
        self._counts: dict[int, object] = {}
        self._shared: dict[int, dict[str, np.ndarray]] = {}
        self._prefix: dict[tuple[int, str], dict[str, np.ndarray]] = {}
        # (start, part) keys run from the raw inputs: activations beyond the cache, or a live tensor whose
        # batch is not its leading axis (an LSTM's time-major input)
        self._run_whole: set[tuple[int, str]] = set()

    def _start(self, scope: str, ranks: dict | None = None, k_max: int = 0) -> int:
        """First node a scope's candidates can change: everything before it is the same for every candidate.
        For the global scope, the first layer holding one of the top `k_max` neurons of `ranks`."""
        if scope == "global":
            if ranks is None:
                return 0
            touched = [u for u in self.units if bool(np.any(np.asarray(ranks[u]) < k_max))]
            return min((self._start(u) for u in touched), default=0)
        names = {scope}
        layer = next((l for l in self.scores.layers if scope in (l.weight, l.name)), None)
        if layer is not None:
            names.add(layer.node)
        for index, node in enumerate(self.forward.model.nodes):
            if node.name in names or names.intersection(node.inputs) or names.intersection(node.outputs):
                return index
        return 0

    def depth(self, scope: str) -> int:
        """Index of the first node a scope's neurons change: how deep in the graph the scope sits."""
        return self._start(scope)

    def _inputs(self, start: int, part: str):
        """The inputs of the evaluated suffix for one part's rows: the raw inputs, or the cached live tensors
        at `start`."""
        x = self.x[self.parts[part]]
        key = (start, part)
        if start == 0 or key in self._run_whole or self.forward.model.batch_coupled:
            return x  # (batch-coupled: the prefix holds per-input scalars (ranges, conditions) `_batched` cannot see)
        if key not in self._prefix:
            live = live_tensors(self.forward.model, start)
            size = self.size
            batched, elsewhere = self._batched(live, size)
            if elsewhere:
                self._run_whole.add(key)
                return x
            parts: dict[str, list[np.ndarray]] = {name: [] for name in batched}
            shared: dict[str, np.ndarray] = {}
            for begin, stop in chunks(len(x), size):
                out = self.forward(pad_to(x[begin:stop], size), taps=tuple(live))
                for name in live:
                    if name in batched:
                        parts[name].append(np.asarray(out[name])[: stop - begin])
                    else:
                        shared[name] = np.asarray(out[name])
            cached = {name: np.concatenate(values) for name, values in parts.items()}
            nbytes = sum(v.nbytes for v in cached.values())
            if nbytes > PREFIX_CACHE_BYTES:
                self._run_whole.add(key)
                return x
            while self._prefix and nbytes + sum(v.nbytes for c in self._prefix.values() for v in c.values()) \
                    > PREFIX_CACHE_BYTES:  # the cache holds at most PREFIX_CACHE_BYTES in all: oldest out
                del self._prefix[next(iter(self._prefix))]
            self._prefix[key] = cached
            self._shared[start] = shared
        return self._prefix[key]

    def _batched(self, live: list[str], size: int) -> tuple[set[str], bool]:
        """The live tensors that carry the batch axis: their leading size follows the batch's (a ViT's
        position table or a shape computation does not, and is passed whole to every batch); and whether
        any other live tensor's shape follows the batch on another axis (an LSTM's time-major input), which
        the cache cannot split. Shapes only: `jax.eval_shape` traces the prefix for batches of `size` and 1
        without compiling or running it."""
        def shapes(batch: int) -> dict:
            x = jax.ShapeDtypeStruct((batch, *self.x.shape[1:]), self.x.dtype)
            return jax.eval_shape(lambda params, x: self.forward.apply(params, x, taps=tuple(live)),
                                  self.forward.params, x)

        wide, narrow = shapes(size), shapes(1 if size > 1 else 2)
        batched = {name for name in live if wide[name].ndim and wide[name].shape[0] == size
                   and narrow[name].shape[0] != size}
        elsewhere = any(wide[name].shape != narrow[name].shape for name in live if name not in batched)
        return batched, elsewhere

    @property
    def sequential_k(self) -> bool:
        return self.granularity == "weight" and jax.default_backend() == "cpu"

    def _counts_fn(self, start: int):
        if start not in self._counts:
            self._counts[start] = self._build_counts(start, self._shared.get(start))
        return self._counts[start]

    def _build_counts(self, start: int = 0, shared: dict | None = None):
        granularity, units, factor = self.granularity, self.units, self.factor
        # vmap over k turns weight ablation into kernels batched over k, i.e. grouped convolutions, which
        # XLA's CPU backend runs several times slower than k plain ones, and lax.map (a while loop) was
        # 10x slower still (ResNet-18: 18 s for 8 k vs 0.22 s per k). On CPU: one jitted call per k.
        sequential_k = self.sequential_k
        if start == 0:
            logits_fn = make_logits_fn(self.forward)
        else:
            apply = build_apply(self.forward.model, start, static=shared)
            name = logit_tensor(self.forward)
            taps = () if name == self.forward.output_name else (name,)

            def logits_fn(params, live, edits=None):
                return class_logits(apply(params, live, taps=taps, edits=edits)[name])

        def one_k(params, ranks, k, x, wrong, right, is_pair, valid):
            keep = {u: jnp.where(ranks[u] < k, factor, 1.0).astype(jnp.float32) for u in units}
            if granularity == "weight":
                params = {**params, **{u: params[u] * keep[u] for u in units}}
                logits = logits_fn(params, x)
            else:
                logits = logits_fn(params, x, edits={u: Edit(scale=keep[u]) for u in units})
            pred = jnp.argmax(logits, axis=-1)
            # Per input: a pair fixed (no longer the wrong label) or a clean input right; 0 for padding.
            return valid * jnp.where(is_pair > 0, pred != wrong, pred == right)

        if sequential_k:
            one = jax.jit(one_k)

            def counts_each(params, ranks, ks, *batch):
                return jnp.stack([one(params, ranks, k, *batch) for k in ks])

            return counts_each

        def counts(params, ranks, ks, x, wrong, right, is_pair, valid):
            return jax.vmap(one_k, in_axes=(None, None, 0, None, None, None, None, None))(
                params, ranks, ks, x, wrong, right, is_pair, valid)

        return jax.jit(counts)

    def ranks(self, scope: str) -> tuple[dict[str, np.ndarray], int]:
        """Rank of every neuron in descending score order within `scope` (NOT_CANDIDATE outside it)."""
        units = self.units if scope == "global" else [scope]
        flat = np.concatenate([self.scores.scores[u].reshape(-1) for u in units])
        order = np.argsort(-flat, kind="stable")
        n_candidates = int(np.isfinite(flat).sum())
        rank_flat = np.full(flat.size, NOT_CANDIDATE, np.int64)
        rank_flat[order[:n_candidates]] = np.arange(n_candidates)
        ranks, offset = {}, 0
        for unit in self.units:
            size = self.scores.scores[unit].size
            if unit in units:
                ranks[unit] = rank_flat[offset:offset + size].reshape(self.scores.scores[unit].shape)
                offset += size
            else:
                ranks[unit] = np.full(self.scores.scores[unit].shape, NOT_CANDIDATE, np.int64)
        return {u: jnp.asarray(r.astype(np.int32)) for u, r in ranks.items()}, n_candidates

    def evaluate(self, ranks: dict, ks: list[int], scope: str = "global",
                 parts: tuple[str, ...] = ("pairs", "clean"), start_k: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(fix rate, clean accuracy) for each k, in batched calls (per-layer scopes reuse a cached prefix);
        NaN for a part not evaluated. The suffix starts at the first node the top `start_k` (default: the
        largest k) can change: callers evaluating many k one call at a time pass one `start_k` so that
        they share one cached prefix and one compiled suffix."""
        run = self.evaluate_bounded(ranks, ks, scope, parts, start_k)
        return run.fix, run.accuracy

    def evaluate_bounded(self, ranks: dict, ks: list[int], scope: str = "global",
                         parts: tuple[str, ...] = ("pairs", "clean"), start_k: int | None = None,
                         bound: tuple[float, float] | None = None, order: np.ndarray | None = None
                         ) -> Evaluation:
        """`evaluate` that may stop the clean set early. With `bound` = (accuracy before, max drop in
        points), the clean set of a group of k is abandoned as soon as every k of it has missed too many
        inputs to keep the bound, whatever the rest would give (accuracy NaN, ceiling below the bound).
        `order`: the clean inputs' running order, a permutation; the inputs most likely to be missed first
        (those missed at earlier k) make an out-of-bound k show itself after a chunk or two."""
        start = self._start(scope, ranks, max(start_k or 0, max(ks)))
        totals = np.zeros((len(ks), 2))
        ceiling = np.full(len(ks), np.nan)
        complete = np.ones(len(ks), bool)
        rows_run = np.zeros(len(ks), np.int64)
        misses = np.zeros(self.n_clean, np.int64)
        clean_labels = self.right[self.parts["clean"]]
        class_hits = np.zeros((len(ks), int(clean_labels.max(initial=-1)) + 1))
        for column, part in enumerate(("pairs", "clean")):
            rows = self.parts[part]
            n = rows.stop - rows.start
            if part not in parts or n == 0:
                continue
            inputs = self._inputs(start, part)
            part_start = 0 if isinstance(inputs, np.ndarray) else start
            counts_fn = self._counts_fn(part_start)
            size = self.size
            picked = np.asarray(order) if part == "clean" and order is not None else np.arange(n)
            wrong, right, is_pair = (a[rows][picked] for a in (self.wrong, self.right, self.is_pair))

            def part_of(begin, stop, inputs=inputs, size=size, picked=picked):
                if isinstance(inputs, dict):
                    return {name: pad_to(value[picked[begin:stop]], size) for name, value in inputs.items()}
                return pad_to(inputs[picked[begin:stop]], size)

            for k_start, k_stop in chunks(len(ks), self.k_chunk):
                k_arr = np.asarray(ks[k_start:k_stop], np.int32)
                if not self.sequential_k:
                    k_arr = pad_to(k_arr, self.k_chunk)  # one shape for every vmapped call: one compile
                for begin, stop in chunks(n, size):
                    valid = pad_to(np.ones(stop - begin, np.float32), size)
                    hits = counts_fn(self.forward.params, ranks, k_arr if self.sequential_k else jnp.asarray(k_arr),
                                     part_of(begin, stop), pad_to(wrong[begin:stop], size),
                                     pad_to(right[begin:stop], size), pad_to(is_pair[begin:stop], size), valid)
                    hits = np.asarray(hits)[: k_stop - k_start, : stop - begin]
                    totals[k_start:k_stop, column] += hits.sum(axis=1)
                    if part == "clean":
                        np.add.at(misses, picked[begin:stop], (hits < 0.5).sum(axis=0))
                        np.add.at(class_hits[k_start:k_stop].T, right[begin:stop], hits.T)
                        rows_run[k_start:k_stop] = stop
                        best = (totals[k_start:k_stop, 1] + n - stop) / self.n_clean
                        ceiling[k_start:k_stop] = best
                        if bound is not None and stop < n and np.all(100.0 * (bound[0] - best) > bound[1]):
                            complete[k_start:k_stop] = False
                            break
        fix = totals[:, 0] / max(1, self.n_pairs) if "pairs" in parts else np.full(len(ks), np.nan)
        acc = totals[:, 1] / max(1, self.n_clean) if "clean" in parts else np.full(len(ks), np.nan)
        acc[~complete] = np.nan
        with np.errstate(invalid="ignore", divide="ignore"):
            class_acc = class_hits / np.bincount(clean_labels, minlength=class_hits.shape[1])
        class_acc[~complete | ("clean" not in parts)] = np.nan
        return Evaluation(fix, acc, ceiling, rows_run, misses, class_acc)

    def search(self, scope: str, target_fix: float, max_drop_points: float, base_accuracy: float) -> AblationResult:
        """Smallest k whose ablation reaches `target_fix` (doubling, then batched bisection) on the pairs; the
        clean set only where its accuracy decides (see the module docstring)."""
        ranks, n_candidates = self.ranks(scope)
        fixes: dict[int, float] = {}
        accuracies: dict[int, float] = {}

        # Every call of this search starts at the first node any candidate can change: one compiled suffix
        # (and one cached prefix per part), where starting each call at its own largest k compiled a suffix
        # per distinct start (2-3.5 s each on a CPU ResNet-18, more than evaluating the pairs from the start).
        def run(ks):
            ks = sorted({int(k) for k in ks if 0 < k <= n_candidates and k not in fixes})
            if ks:
                fix, _ = self.evaluate(ranks, ks, scope, ("pairs",), start_k=n_candidates)
                fixes.update({k: float(f) for k, f in zip(ks, fix)})

        ceilings: dict[int, float] = {}  # clean accuracy at most, where the clean set was abandoned
        missed = np.zeros(self.n_clean, np.int64)  # per clean input: how many k tried so far missed it

        def run_clean(ks, bound=None):
            ks = sorted({int(k) for k in ks if k not in accuracies and (bound is None or k not in ceilings)})
            if ks:
                run = self.evaluate_bounded(ranks, ks, scope, ("clean",), n_candidates, bound,
                                            order=np.argsort(-missed, kind="stable"))
                missed[:] += run.misses
                for k, a, c in zip(ks, run.accuracy, run.ceiling):
                    if np.isnan(a):
                        ceilings[k] = float(c)
                    else:
                        accuracies[k] = float(a)

        def out_of_bound(k) -> bool:
            return k not in accuracies or 100.0 * (base_accuracy - accuracies[k]) > max_drop_points

        def curve() -> dict[int, tuple[float, float | None]]:
            if self.full_curve:
                run_clean(fixes)
            return {k: (f, accuracies.get(k)) for k, f in fixes.items()}

        if n_candidates == 0:
            return AblationResult(scope, self.granularity, 0, None, 0.0, base_accuracy, base_accuracy, False)
        doubling = [2**i for i in range(int(np.ceil(np.log2(n_candidates))) + 1) if 2**i < n_candidates]
        doubling.append(n_candidates)
        step = 1 if self.sequential_k else self.k_chunk  # one k per call on CPU anyway: stop at the first
        for begin in range(0, len(doubling), step):  # one batched call per chunk, smallest k first
            run(doubling[begin:begin + step])
            if any(f >= target_fix for f in fixes.values()):
                break
        reached = [k for k in sorted(fixes) if fixes[k] >= target_fix]

        def narrow_to_bound(k_within: int) -> int:
            """Doubling leaves wide gaps (ResNet-18 flip, one layer: 256 weights fix 74 % within the bound,
            512 fix 98 % beyond it): bisect between `k_within` and the next larger k with a higher fix rate
            (out of the bound) for the largest k keeping the bound, probes tried largest first; return the
            highest fix rate within the bound among every k tried (ties: the smaller k)."""
            higher = [k for k in fixes if k > k_within and fixes[k] > fixes[k_within]]
            if not higher:
                return k_within
            lo, hi = k_within, min(higher)
            while hi - lo > max(1, int(hi * K_TOLERANCE)):
                probes = np.unique(np.linspace(lo, hi, BISECTION_POINTS + 2).round().astype(int))[1:-1]
                run(probes)
                for k in sorted(probes.tolist(), reverse=True):
                    run_clean([k], (base_accuracy, max_drop_points))
                    if not out_of_bound(k):
                        lo = k
                        break
                    hi = k
            return max((k for k in accuracies if not out_of_bound(k)), key=lambda k: (fixes.get(k, 0.0), -k))

        def best_within() -> int:
            """The k tried with the highest fix rate whose clean-accuracy drop keeps the bound (ties: the
            smaller k), else the smallest drop: the clean set runs in that order of preference and stops at
            the first k within the bound; at each k it stops as soon as the bound is out of reach."""
            order = sorted(fixes, key=lambda k: (-fixes[k], k))
            for begin in range(0, len(order), step):
                run_clean(order[begin:begin + step], (base_accuracy, max_drop_points))
                within = [k for k in order[begin:begin + step] if not out_of_bound(k)]
                if within:
                    return narrow_to_bound(within[0])
            # None keeps the bound: the smallest drop (ties: the smaller k). An abandoned k is run to the
            # end only while its ceiling could still match the best accuracy known.
            def known(k) -> float:
                return accuracies.get(k, ceilings.get(k, 0.0))

            best = None
            for k in sorted(fixes, key=lambda k: (-known(k), k)):
                if best is not None and known(k) < accuracies[best]:
                    break
                run_clean([k])
                if best is None or (accuracies[k], -k) > (accuracies[best], -best):
                    best = k
            return best

        if not reached:
            k = best_within()
            return self._result(scope, n_candidates, k, curve(), ranks, False, base_accuracy)
        hi = reached[0]
        lo = max([k for k in fixes if k < hi], default=0)
        while hi - lo > max(1, int(hi * K_TOLERANCE)):
            run(np.unique(np.linspace(lo, hi, BISECTION_POINTS + 2).round().astype(int))[1:-1])
            hi = min(k for k in fixes if lo < k <= hi and fixes[k] >= target_fix)
            lo = max([k for k in fixes if k < hi], default=0)
        run_clean([hi])
        success = not out_of_bound(hi)
        k_target = hi
        if not success:  # the target costs too much accuracy: report the best set that keeps the bound
            hi = best_within()
        result = self._result(scope, n_candidates, hi, curve(), ranks, success, base_accuracy)
        result.k_target = k_target
        return result

    def _result(self, scope, n_candidates, k, curve, ranks, success, base_accuracy) -> AblationResult:
        points = [{"k": 0, "fix_rate": 0.0, "clean_accuracy": base_accuracy}]
        points += [{"k": kk, "fix_rate": f, "clean_accuracy": a} for kk, (f, a) in sorted(curve.items())]
        return AblationResult(scope, self.granularity, n_candidates, k, curve[k][0], curve[k][1], base_accuracy,
                              success, points, self.eins(ranks, k))

    def eins(self, ranks: dict, k: int) -> list[dict]:
        """The top-k neurons of a rank assignment, best first."""
        key = "initializer" if self.granularity == "weight" else "layer"
        quantized = self.forward.model.quantized
        found = []
        for unit, rank in ranks.items():
            rank = np.asarray(rank)
            # a quantized weight is held under its DequantizeLinear's output; the file stores it in `source`
            stored = {"stored_in": quantized[unit].source} if unit in quantized else {}
            for index in np.flatnonzero(rank.reshape(-1) < k):
                position = [int(i) for i in np.unravel_index(index, rank.shape)]
                found.append((int(rank.reshape(-1)[index]),
                              {key: unit, **stored, "index": int(index), "position": position,
                               "score": float(self.scores.scores[unit].reshape(-1)[index])}))
        return [entry for _, entry in sorted(found, key=lambda item: item[0])]


def progressive_ablation(forward: Forward, scores: NeuronScores, pairs: Pairs, x_clean: np.ndarray,
                         y_clean: np.ndarray, *, target_fix: float = 0.95, max_acc_drop: float = 2.0,
                         scopes: str = "all", base_accuracy: float | None = None, factor: float = 0.0,
                         max_layer_scopes: int | None = MAX_LAYER_SCOPES, full_curve: bool = False,
                         progress=None) -> tuple[AblationResult, list[AblationResult]]:
    """Search each scope; return (the chosen result, every scope's result).

    `scopes`: 'global', 'per-layer' or 'all'; `factor` 0 ablates the top-k neurons, -1 flips their sign.
    Per-layer searches run for the `max_layer_scopes` layers holding the best-scored neurons (None: all;
    each search costs as much as the global one, which matters on deep models). `full_curve`: clean
    accuracy at every k tried (for a plot), not only where it decides.
    The chosen result is the smallest successful set (ties: the
    smaller clean-accuracy drop); with none successful, the one with the highest fix rate.
    """
    from .common import predict_labels

    ablator = Ablator(forward, scores, pairs, x_clean, y_clean, factor=factor, full_curve=full_curve)
    if base_accuracy is None:
        base_accuracy = float(np.mean(predict_labels(forward, x_clean) == y_clean))
    names = []
    if scopes in ("global", "all"):
        names.append("global")
    if scopes in ("per-layer", "all"):
        layered = [u for u in ablator.units if np.isfinite(scores.scores[u]).any()]
        layered.sort(key=lambda u: -float(np.max(scores.scores[u])))
        names += sorted(layered[:max_layer_scopes], key=ablator.units.index)
    results = []
    for name in names:
        results.append(ablator.search(name, target_fix, max_acc_drop, base_accuracy))
        if progress is not None:
            progress(name)
    good = [r for r in results if r.success]
    if good:
        chosen = min(good, key=lambda r: (r.k, -r.clean_accuracy))
    else:
        chosen = max(results, key=lambda r: (r.fix_rate, r.clean_accuracy))
    return chosen, results
