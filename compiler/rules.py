"""Rules as data, and the one bounded driver that applies them.

    Rule(name, pattern, rewrite, check=None, anchor=None, exclusive=True, stat=None)

`name` states the rewrite as an equation. `pattern` is matched at every node (compiler/pattern.py); on a
complete match, the driver checks that inner nodes are not used outside the match (`exclusive`), then runs
`check(match) -> reason | None` (pure). Only then does `rewrite(rw, match)` build the replacement through the
Rewriter and return it (a value for the root; a tuple for a multi-output root whose `getitem` users are
redirected; None when the rewrite redirected uses itself). Nothing mutates before a match is complete and
checked. A rule with `rewrite=None` is a near-miss rule: a known pattern that must not be rewritten, reported
with `check`'s reason.

The driver visits nodes users-first (the outermost match wins: `norm * γ + β` before `norm`), repeats until a
sweep changes nothing, and stops after `max_sweeps` with a warning (every sweep leaves a correct graph).
Near-misses are a check that failed, or a matcher failure after the rule's `anchor` variable was bound (a candidate,
not any node): those of the last sweep, and those of earlier sweeps at nodes that another rule's rewrite then
erased (a lesser fusion took the nodes a failed one wanted: its reason still says why). Counts are per rule name.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from .pattern import Match, MatchFailure, Multi, explain, match_multi, users_outside
from .rewrite import Rewriter

log = logging.getLogger(__name__)

Check = Callable[[Match], "str | MatchFailure | None"]
Build = Callable[[Rewriter, Match], Any]


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: Any
    rewrite: Build | None
    check: Check | None = None
    anchor: str | None = None
    exclusive: bool = True
    # for Multi patterns: the nodes where root i (i >= 1) may be, given the match so far
    candidates: Callable[[Match, int], Sequence[fx.Node]] | None = None
    stat: str | None = None  # the key its applications are counted under (default: the name)


@dataclass
class RuleResult:
    counts: Counter = field(default_factory=Counter)
    failures: list[MatchFailure] = field(default_factory=list)
    sweeps: int = 0
    converged: bool = True

    @property
    def changed(self) -> bool:
        return sum(self.counts.values()) > 0

    def reasons(self) -> list[str]:
        return [str(f) for f in self.failures]


def _covered_by_siblings(rule: Rule, found: Match, leaked: list[fx.Node], cache: dict) -> bool:
    """Whether every outside reader of the leaked inner nodes is itself inside another match of the same rule
    (two norms sharing statistics after CSE): applying both leaves nothing computed twice."""
    if rule.name not in cache:
        covered: set = set()
        for n in found.root.graph.nodes:
            m = explain(rule.pattern, n) if n.op == "call_function" and not isinstance(rule.pattern, Multi) else None
            if isinstance(m, Match):
                covered.update(m.nodes)
        cache[rule.name] = covered
    inside = set(found.nodes)
    return all(u in inside or u in cache[rule.name] for n in leaked for u in n.users)


def _try(rule: Rule, node: fx.Node, cache: dict) -> Match | MatchFailure | None:
    """The checked match of `rule` at `node`, a reportable failure, or None (not a candidate)."""
    if isinstance(rule.pattern, Multi):
        found = match_multi(rule.pattern, node, rule.candidates or (lambda m, i: list(node.graph.nodes)))
    else:
        found = explain(rule.pattern, node)
    if isinstance(found, MatchFailure):
        return found if rule.anchor is not None and rule.anchor in found.bound else None
    if rule.exclusive:
        leaked = users_outside(found.nodes, [found.root])
        if leaked and not _covered_by_siblings(rule, found, leaked, cache):
            return MatchFailure(f"intermediate {leaked[0].name} of the match at {node.name} is used elsewhere "
                                f"({rule.name})", leaked[0], len(found.nodes))
    why = rule.check(found) if rule.check else None
    if isinstance(why, MatchFailure):
        return why
    if why:
        return MatchFailure(why, node, len(found.nodes), covered=tuple(found.nodes))
    if rule.rewrite is None:
        return MatchFailure(rule.name, node, len(found.nodes), covered=tuple(found.nodes))
    return found


def _apply(rw: Rewriter, rule: Rule, m: Match) -> None:
    root = m.root
    new = rule.rewrite(rw, m)
    outputs = []
    if isinstance(new, tuple):
        outputs = [u for u in root.users if u.target is operator.getitem]
        for user in outputs:
            rw.replace(user, new[user.args[1]])
    elif new is not None:
        rw.replace(root, new)
    rw.counts[rule.stat or rule.name] += 1
    rw.erase_dead([*outputs, root, *reversed(m.nodes)])


def _superseded(failure: MatchFailure, rule: str, erased_by: dict) -> bool:
    """An earlier sweep's failure of `rule` whose nodes another rule's rewrite erased (and `rule` never did): the
    nodes went to another fusion, so the reason still holds where the last sweep no longer sees the candidate."""
    nodes = [n for n in (*failure.covered, failure.node) if isinstance(n, fx.Node)]
    by = {erased_by.get(n) for n in nodes} - {None}
    return bool(by) and rule not in by


def apply_rules(rw: Rewriter, rules: Sequence[Rule], *, max_sweeps: int = 8) -> RuleResult:
    """Apply `rules` to `rw`'s graph to a fixed point (see the module docstring)."""
    result = RuleResult()
    start = Counter(rw.counts)
    earlier: dict = {}  # (node name, reason) -> (failure, rule name), of the sweeps before the last
    erased_by: dict = {}  # node -> the rule whose rewrite erased it
    for sweep in range(1, max_sweeps + 1):
        result.sweeps, changed, failures, cache = sweep, False, {}, {}
        for node in reversed(list(rw.graph.nodes)):
            if getattr(node, "_erased", False) or node.op != "call_function":
                continue
            for rule in rules:
                found = _try(rule, node, cache)
                if isinstance(found, Match):
                    before = set(rw.graph.nodes)
                    _apply(rw, rule, found)
                    erased_by.update(dict.fromkeys(before.difference(rw.graph.nodes), rule.name))
                    cache.clear()
                    changed = True
                    break
                if found is not None:
                    failures.setdefault((getattr(found.node, "name", None), found.reason), (found, rule.name))
        if not changed:
            superseded = [f for key, (f, name) in earlier.items() if key not in failures
                          and _superseded(f, name, erased_by)]
            order = {n: i for i, n in enumerate(rw.graph.nodes)}
            result.failures = sorted([f for f, _ in failures.values()] + superseded,
                                     key=lambda f: order.get(f.node, -1))
            break
        earlier.update(failures)
    else:
        result.converged = False
        log.warning("rules %s stopped after %d sweeps without reaching a fixed point",
                    [r.name for r in rules], max_sweeps)
    result.counts = Counter({k: v - start.get(k, 0) for k, v in rw.counts.items() if v - start.get(k, 0)})
    return result

