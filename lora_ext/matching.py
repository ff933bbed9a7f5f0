"""Which modules a target/exclude pattern selects (SPEC.md section 2).

A pattern is compared with a module's fully-qualified name (FQN) part by part,
parts being separated by ".":

- `*` inside a part matches any characters within that one part (no other glob
  characters are special: `?` and `[` match themselves);
- a part that is exactly `**` matches any number of parts, zero included;
- the pattern matches when it matches a suffix of the FQN's parts, so
  "self_attn.q_proj" selects "model.layers.1.self_attn.q_proj" without a leading `**`;
- leading and trailing dots are ignored (".q_proj." is "q_proj");
- a pattern starting with `re:` is a Python regular expression that must match the
  whole FQN (`re.fullmatch`).

Malformed patterns (empty, an empty part such as "a..b", an invalid regex) raise
ValueError when compiled, before any module is touched.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Iterable, Sequence

REGEX_PREFIX = "re:"
ANY_PARTS = "**"


def fqn_parts(fqn: str) -> list[str]:
    """The dot-separated parts of a module name; the root module ("") has none."""
    return fqn.split(".") if fqn else []


def _part_regex(part: str) -> re.Pattern:
    # `*` is the only special character within a part; everything else is literal.
    return re.compile(".*".join(re.escape(piece) for piece in part.split("*")), re.DOTALL)


def _parts_match(pattern_parts: Sequence, name_parts: Sequence[str]) -> bool:
    """Whether the whole of `pattern_parts` matches the whole of `name_parts`.

    `pattern_parts` holds ANY_PARTS markers and compiled per-part regexes.
    Dynamic programming over (pattern prefix, name prefix) pairs, so many `**`
    parts cost O(len(pattern) * len(name)), not exponential time.
    """
    # reachable[j]: the pattern parts consumed so far match name_parts[:j].
    reachable = [True] + [False] * len(name_parts)
    for part in pattern_parts:
        if part == ANY_PARTS:
            # `**` extends any reachable prefix by any number of parts.
            for j in range(1, len(reachable)):
                reachable[j] = reachable[j] or reachable[j - 1]
        else:
            for j in range(len(reachable) - 1, 0, -1):
                reachable[j] = reachable[j - 1] and part.fullmatch(name_parts[j - 1]) is not None
            reachable[0] = False
    return reachable[-1]


def compile_pattern(pattern: str) -> Callable[[str], bool]:
    """A predicate `fqn -> bool` for one pattern; raises ValueError if it is malformed."""
    if not isinstance(pattern, str):
        raise ValueError(f"a module pattern must be a string, got {pattern!r}")
    return _compile_pattern(pattern)


@functools.lru_cache(maxsize=1024)
def _compile_pattern(pattern: str) -> Callable[[str], bool]:
    if pattern.startswith(REGEX_PREFIX):
        try:
            regex = re.compile(pattern[len(REGEX_PREFIX):])
        except re.error as err:
            raise ValueError(f"invalid regular expression in module pattern {pattern!r}: {err}") from None
        return lambda fqn: regex.fullmatch(fqn) is not None

    stripped = pattern.strip(".")
    if not stripped:
        raise ValueError(f"module pattern {pattern!r} is empty (it would select nothing meaningful)")
    parts = stripped.split(".")
    if any(part == "" for part in parts):
        raise ValueError(f"module pattern {pattern!r} has an empty part between two dots")
    # Suffix matching is a leading `**`: the pattern may start at any part of the FQN.
    compiled = [ANY_PARTS] + [ANY_PARTS if part == ANY_PARTS else _part_regex(part) for part in parts]
    return lambda fqn: _parts_match(compiled, fqn_parts(fqn))


def matches(pattern: str, fqn: str) -> bool:
    """Whether `pattern` selects the module named `fqn` (see the module docstring)."""
    return compile_pattern(pattern)(fqn)


def compile_patterns(patterns: Iterable[str]) -> Callable[[str], bool]:
    """A predicate that is true when any of `patterns` selects the FQN.

    Every pattern is compiled up front, so a malformed one raises ValueError before
    the predicate is used.
    """
    predicates = [compile_pattern(p) for p in patterns]
    return lambda fqn: any(predicate(fqn) for predicate in predicates)


def matches_any(patterns: Iterable[str], fqn: str) -> bool:
    """Whether any of `patterns` selects the module named `fqn`."""
    return compile_patterns(patterns)(fqn)
