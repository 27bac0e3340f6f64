"""Stop strings matched in O(new text) per step, whatever their number and length (Aho–Corasick).

A request's stop strings become one automaton, built once and shared by its n sequences; each
sequence keeps only its state (an int). Feeding a step's new characters walks at most a few
transitions per character, and the state's depth is the longest suffix of the text so far that
could still begin a stop string: exactly what must be held back from the stream. The naive check
(search every stop in the tail, then test every prefix of every stop against the end of the text)
costs O(stops × length²) per token, which one request with long stop strings turns into minutes.
"""

from __future__ import annotations

from collections import deque


class StopStrings:
    def __init__(self, stops: list[str]):
        self._goto: list[dict[str, int]] = [{}]
        self._fail = [0]
        self.depth = [0]  # characters on the path to each state
        self._longest = [0]  # length of the longest stop string ending at this state (0: none)
        for stop in stops:
            node = 0
            for ch in stop:
                child = self._goto[node].get(ch)
                if child is None:
                    child = self._goto[node][ch] = len(self._goto)
                    self._goto.append({})
                    self._fail.append(0)
                    self.depth.append(self.depth[node] + 1)
                    self._longest.append(0)
                node = child
            self._longest[node] = len(stop)
        pending = deque(self._goto[0].values())  # breadth-first: a state's fallback is shallower, so done first
        while pending:
            node = pending.popleft()
            self._longest[node] = max(self._longest[node], self._longest[self._fail[node]])
            for ch, child in self._goto[node].items():
                fallback = self._fail[node]
                while fallback and ch not in self._goto[fallback]:
                    fallback = self._fail[fallback]
                self._fail[child] = self._goto[fallback].get(ch, 0)
                pending.append(child)

    def feed(self, state: int, text: str) -> tuple[int, int | None]:
        """(new state, start): where in `text` the first stop string to complete begins (negative:
        that many characters before `text`), or None when none completes."""
        goto, fail, longest = self._goto, self._fail, self._longest
        for i, ch in enumerate(text):
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if longest[state]:
                return state, i + 1 - longest[state]
        return state, None
