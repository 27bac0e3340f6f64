"""The stop-string automaton against brute force: random texts fed in random pieces over a small
alphabet (so stops overlap, nest and share prefixes), the cut where the first stop string completes
and the held-back suffix after every piece."""

from __future__ import annotations

import random

from runtime.stop_strings import StopStrings


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the stop string that completes first (the longest, among those ending together) begins."""
    ends = [(text.find(s) + len(s), -len(s)) for s in stops if s in text]
    if not ends:
        return None
    end, minus_len = min(ends)
    return end + minus_len


def held(text: str, stops: list[str]) -> int:
    """The longest suffix of `text` that is a prefix of some stop string."""
    return max((k for s in stops for k in range(1, len(s) + 1) if text.endswith(s[:k])), default=0)


def test_matches_brute_force():
    rnd = random.Random(0)
    for _ in range(400):
        alphabet = "ab" if rnd.random() < 0.5 else "abcé\n"
        stops = ["".join(rnd.choices(alphabet, k=rnd.randint(1, 6))) for _ in range(rnd.randint(1, 5))]
        text = "".join(rnd.choices(alphabet, k=rnd.randint(0, 40)))
        automaton, state, fed = StopStrings(stops), 0, ""
        want = first_stop(text, stops)
        got = None
        while len(fed) < len(text):
            piece = text[len(fed):len(fed) + rnd.randint(1, 4)]
            state, start = automaton.feed(state, piece)
            if start is not None:
                got = len(fed) + start
                break
            fed += piece
            assert automaton.depth[state] == held(fed, stops), (stops, fed)
        assert got == want, (stops, text)


def test_long_stops_share_one_small_state():
    stops = [f"{i:03d}" + "x" * 2000 for i in range(100)]
    automaton = StopStrings(stops)
    state, start = automaton.feed(0, "y" * 50 + "042" + "x" * 1999)
    assert start is None and automaton.depth[state] == 2002
    state, start = automaton.feed(state, "xz")
    assert start == -2002
