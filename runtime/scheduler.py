"""Scheduler: which sequences run in the next step, and how many of their tokens.

Every sequence is treated alike: it has `pending` tokens not yet in the KV cache (the prompt, the
rest of a chunked prompt, or the one token sampled last step). A step serves the running decodes,
then the running prefills (each oldest first), then admits waiting sequences, under a token budget
(max_num_batched_tokens) and a sequence cap (max_num_seqs); a long prompt simply takes several
steps (chunked prefill), mixed with other sequences' decodes. Pages are checked against
ModelRunner.free_pages() before every step. When they run out we first evict retained
prefix-cache sequences, then preempt the youngest running sequence not yet in the batch by
recompute (drop its pages, put it back at the head of the waiting queue).
As long as one sequence of max_model_len tokens fits in the cache, some sequence always makes
progress: no crash, no deadlock.
"""

from __future__ import annotations

from collections import deque

from .model_runner import ModelRunner
from .prefix_cache import PrefixCache
from .request import Sequence


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    def __init__(self, runner: ModelRunner, max_num_seqs: int, max_num_batched_tokens: int,
                 retain_finished: bool = True):
        self.runner = runner
        self.page_size = runner.page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.retain_finished = retain_finished  # keep finished sequences for prefix caching
        self.cache = PrefixCache(runner.page_size, runner.remove_sequence)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence, first: bool = False) -> None:
        (self.waiting.appendleft if first else self.waiting.append)(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _new_pages(self, computed: int, n: int) -> int:
        return _ceil_div(computed + n, self.page_size) - _ceil_div(computed, self.page_size)

    def _fit(self, computed: int, free: int) -> int:
        """How many tokens a sequence of `computed` tokens can append with `free` new pages."""
        return free * self.page_size + (-computed) % self.page_size

    def schedule(self) -> list[tuple[Sequence, int]]:
        """This step's batch: (sequence, how many of its pending tokens to compute)."""
        budget, reserved = self.max_num_batched_tokens, 0  # reserved: pages this batch will take

        def free() -> int:
            return self.runner.free_pages() - reserved

        batch: list[tuple[Sequence, int]] = []
        scheduled: set[int] = set()
        preempted: set[int] = set()
        # decodes first (steady inter-token latency under long prefills), then prefill chunks; oldest first
        for seq in sorted(self.running, key=lambda s: s.pending > 1):
            if budget == 0:
                break
            if seq.seq_id in preempted:  # for an older sequence, this step
                continue
            n = min(seq.pending, budget)
            while n and self._new_pages(seq.num_computed, n) > free():
                if self.cache.evict():
                    continue
                if self._fit(seq.num_computed, free()) > 0:
                    n = self._fit(seq.num_computed, free())  # a shorter prefill chunk
                    continue
                victims = [s for s in self.running if s is not seq and s.seq_id not in scheduled]
                if not victims and seq.pending > 1:
                    n = 0  # a prefill waits for the scheduled sequences to free pages
                    break
                victim = victims[-1] if victims else seq  # the youngest not yet in the batch
                self.preempt(victim)
                preempted.add(victim.seq_id)
                if victim is seq:
                    n = 0
            if n:
                batch.append((seq, n))
                scheduled.add(seq.seq_id)
                budget -= n
                reserved += self._new_pages(seq.num_computed, n)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            while True:
                parent, matched = self.cache.match(seq.token_ids)
                n = min(len(seq.token_ids) - matched, budget)
                if self._new_pages(matched, n) <= free() or not self.cache.evict():
                    break
            n = min(n, self._fit(matched, free()))
            if n <= 0:
                break
            self.waiting.popleft()
            if parent is None:
                self.runner.add_sequence(seq.seq_id)
            else:
                self.runner.fork_sequence(parent, seq.seq_id, matched)
            seq.num_computed = matched
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
            reserved += self._new_pages(matched, n)
        return batch

    def repeat(self, batch: list[Sequence]) -> bool:
        """Whether the next step may run `batch` again, one new token each, decided before this step's
        tokens reach the host (the engine's overlapped loop): schedule() would pick these sequences and
        no others (all still running, none waiting that it could admit) and each one's next token fits in
        the free pages without evicting or preempting. A sequence that finished in this step is known
        one step late: its extra token is discarded, and the KV slot it took was counted here."""
        if (self.waiting and len(self.running) < self.max_num_seqs) or len(batch) != len(self.running):
            return False
        running = {s.seq_id for s in self.running}
        if len(batch) > self.max_num_batched_tokens or any(s.seq_id not in running for s in batch):
            return False
        return sum(self._new_pages(s.num_computed, 1) for s in batch) <= self.runner.free_pages()

    def preempt(self, seq: Sequence) -> None:
        """Recompute later: free the sequence's pages and queue it first (prompt + output so far)."""
        self.running.remove(seq)
        self._drop(seq)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def computed(self, seq: Sequence, n: int) -> None:
        """`n` more of the sequence's tokens are in the KV cache; index its prompt for prefix caching."""
        seq.num_computed += n
        if n > 1:
            self.cache.insert(seq.seq_id, seq.token_ids[:seq.num_computed])

    def finish(self, seq: Sequence, keep: bool = True) -> None:
        """Take a finished or aborted sequence out of the queues; keep its pages for reuse if enabled."""
        if seq in self.running:
            self.running.remove(seq)
            if keep and self.retain_finished:
                self.cache.retain(seq.seq_id, seq.token_ids[:seq.num_computed])
            else:
                self._drop(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _drop(self, seq: Sequence) -> None:
        self.cache.forget(seq.seq_id)
        self.runner.remove_sequence(seq.seq_id)

    def clear_cache(self) -> None:
        """Evict every retained sequence (all pages free once nothing runs)."""
        while self.cache.evict():
            pass
