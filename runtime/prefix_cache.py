"""Prefix caching: a new prompt that starts like a sequence already in the KV cache forks from it.

TVM's paged cache shares pages copy-on-write through `fork_sequence(parent, child, pos)`, so
reuse needs only to know which sequence holds which token prefix. The index is a trie over whole
pages of tokens (one node per page, keyed by that page's token tuple); every node lists the
sequences whose first pages are the path to it. Forks happen at page boundaries, so a fork never
copies a page. Finished sequences stay in the cache ("retained") until their pages are needed;
`evict` removes the least recently used one.
"""

from __future__ import annotations

from collections import OrderedDict


class _Node:
    __slots__ = ("children", "holders", "parent", "key")

    def __init__(self, parent=None, key=None):
        self.children: dict[tuple, _Node] = {}
        self.holders: set[int] = set()
        self.parent, self.key = parent, key


class PrefixCache:
    def __init__(self, page_size: int, remove_sequence):
        self.page_size = page_size
        self._remove_sequence = remove_sequence  # ModelRunner.remove_sequence
        self._root = _Node()
        self._paths: dict[int, list[_Node]] = {}  # seq_id → the nodes it holds, root side first
        self.retained: OrderedDict[int, None] = OrderedDict()  # finished sequences, least recent first

    def insert(self, seq_id: int, tokens: list[int]) -> None:
        """Record that `seq_id` holds `tokens` (already computed) in the KV cache; extends an earlier insert."""
        path = self._paths.setdefault(seq_id, [])
        node = path[-1] if path else self._root
        ps = self.page_size
        for start in range(len(path) * ps, len(tokens) - ps + 1, ps):
            key = tuple(tokens[start:start + ps])
            node = node.children.get(key) or node.children.setdefault(key, _Node(node, key))
            node.holders.add(seq_id)
            path.append(node)

    def match(self, tokens: list[int]) -> tuple[int | None, int]:
        """(a sequence holding the longest cached page-aligned prefix of `tokens`, its length),
        leaving at least one token to compute."""
        node, ps, depth = self._root, self.page_size, 0
        while (depth + 1) * ps < len(tokens):
            child = node.children.get(tuple(tokens[depth * ps:(depth + 1) * ps]))
            if child is None:
                break
            node, depth = child, depth + 1
        if depth == 0:
            return None, 0
        holder = next(iter(node.holders))
        if holder in self.retained:
            self.retained.move_to_end(holder)
        return holder, depth * ps

    def forget(self, seq_id: int) -> None:
        """Drop `seq_id` from the index (the caller removes it from the KV cache)."""
        for node in reversed(self._paths.pop(seq_id, [])):
            node.holders.discard(seq_id)
            if not node.holders and not node.children:
                del node.parent.children[node.key]
        self.retained.pop(seq_id, None)

    def retain(self, seq_id: int, tokens: list[int]) -> None:
        """Keep a finished sequence's pages for later prompts (if it fills at least one page)."""
        self.insert(seq_id, tokens)
        if self._paths[seq_id]:
            self.retained[seq_id] = None
        else:
            self.forget(seq_id)
            self._remove_sequence(seq_id)

    def evict(self) -> bool:
        """Remove the least recently used retained sequence from the cache; False if there is none."""
        if not self.retained:
            return False
        seq_id = next(iter(self.retained))
        self.forget(seq_id)
        self._remove_sequence(seq_id)
        return True
