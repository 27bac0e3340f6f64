"""On-device sampling: the functions that turn a batch of logits into token ids without copying the
[batch, vocab] logits to the host (runtime.model_runner.ModelRunner.sample drives them).

Every function takes one row per sequence and no weights. Greedy rows use `argmax`; sampled rows use
`sample_probs` (temperature and min_p) and then either `sample_multinomial` or, when a row asks for
top_p/top_k, `sample_top_p_top_k` (a full sort of each row); `apply_penalties` first changes the
logits of rows with penalties; `logprobs` serves requests that ask for log-probabilities. Random
numbers come from the host (one uniform per row, from the request's seeded generator), so seeded
requests reproduce.
"""

from __future__ import annotations

import math

from tvm import relax, te, tirx
from tvm.relax.frontend import nn


class SamplingFunctions:
    """Mixed into CausalLM; model_defs/spec.py exports these methods."""

    def argmax(self, logits: nn.Tensor) -> nn.Tensor:
        """int32[b]: the most likely token of each row (exact greedy: the first of equal maxima).

        In two kernels when the vocabulary splits into ARGMAX_CHUNKS equal slices: the (index, value)
        maximum of each slice (a thread block per slice, so a row of 150k logits is read by 128 blocks
        instead of one), then the first slice holding the row's maximum."""
        vocab = logits.shape[1]
        chunks = math.gcd(vocab, ARGMAX_CHUNKS) if isinstance(vocab, int) else 1
        if chunks < ARGMAX_CHUNKS // 4:
            return nn.op.wrap_nested(relax.op.astype(relax.op.argmax(_expr(logits), axis=-1), "int32"), "argmax")
        width = vocab // chunks

        def slices(x):  # int64 loops: the index must read the same in the combiner's compare and select
            i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
            k = te.reduce_axis((i64(0), i64(width)), "k")
            return te.compute((x.shape[0], i64(chunks)), lambda i, c: _FIRST_MAX(
                (c * width + k, x[i, c * width + k]), axis=k), name="slice_max")

        def rows(at, best):  # (index, value) reduced in registers; the int32 index is the output
            c = te.reduce_axis((tirx.IntImm("int64", 0), tirx.IntImm("int64", chunks)), "c")
            red = te.compute((at.shape[0],), lambda i: _FIRST_MAX((at[i, c], best[i, c]), axis=c), name="row_max")
            return te.compute((at.shape[0],), lambda i: red[0][i].astype("int32"), name="argmax")

        at, best = nn.op.tensor_expr_op(slices, "slice_argmax", [logits])
        return nn.op.tensor_expr_op(rows, "row_argmax", [at, best])

    def apply_penalties(self, logits: nn.Tensor, pairs: nn.Tensor, counts: nn.Tensor, repetition: nn.Tensor,
                        frequency: nn.Tensor, presence: nn.Tensor) -> nn.Tensor:
        """float32[b, V]: `logits` with penalties at `pairs` (int64[m, 2], distinct (row, token) of each
        row's prompt and output tokens; `counts` f32[m]: times in the output): repetition (transformers':
        divide positive logits, multiply negative ones, for every seen token), then frequency × count and
        presence (OpenAI's, output tokens only). Penalties are per pair, m × 1 each."""
        x = nn.op.wrap_nested(relax.op.gather_nd(_expr(logits), _expr(pairs)), "penalized_logits")
        x = nn.op.where(nn.op.greater(x, nn.op.zeros(x.shape, "float32")), x / repetition, x * repetition)
        in_output = nn.op.astype(nn.op.greater(counts, nn.op.zeros(counts.shape, "float32")), "float32")
        x = x - frequency * counts - presence * in_output
        return nn.op.wrap_nested(relax.op.scatter_nd(_expr(logits), _expr(pairs), _expr(x)), "penalize")

    def sample_probs(self, logits: nn.Tensor, temperature: nn.Tensor, min_p: nn.Tensor) -> nn.Tensor:
        """float32[b, V]: softmax(logits / temperature) without the tokens below min_p × the row's top
        probability, renormalized."""
        b = logits.shape[0]
        probs = nn.op.softmax(logits / nn.op.reshape(temperature, (b, 1)), axis=-1)
        threshold = nn.op.max(probs, axis=-1, keepdims=True) * nn.op.reshape(min_p, (b, 1))
        kept = nn.op.where(nn.op.greater_equal(probs, threshold), probs, nn.op.zeros(probs.shape, "float32"))
        return kept / nn.op.sum(kept, axis=-1, keepdims=True)

    def sample_multinomial(self, probs: nn.Tensor, uniform: nn.Tensor, rows: nn.Tensor) -> nn.Tensor:
        """int32[n, 1]: a token from probs[rows[i]] for each uniform[i] (inverse CDF)."""
        return nn.op.multinomial_from_uniform(probs, uniform, rows, dtype="int32")

    def sample_top_p_top_k(self, probs: nn.Tensor, top_p: nn.Tensor, top_k: nn.Tensor, uniform: nn.Tensor,
                           rows: nn.Tensor) -> nn.Tensor:
        """int32[n, 1]: a token of probs[rows[i]] among its top_k most likely, then the smallest prefix of
        those whose share of the top-k mass reaches top_p (top-k first, renormalized: transformers' and
        vLLM's order). TVM's sampler compares top_p with the absolute cumulative mass, so it gets top_p ×
        the top-k mass."""
        sorted_ids = nn.op.argsort(probs, axis=-1, descending=True, dtype="int32")  # one sort, then a gather
        sorted_probs = nn.op.wrap_nested(relax.op.gather_elements(_expr(probs), _expr(sorted_ids), axis=1),
                                         "sorted_probs")
        kth = nn.op.wrap_nested(relax.op.gather_elements(_expr(sorted_probs), _expr(top_k - 1), axis=1), "kth_prob")
        in_top_k = nn.op.greater_equal(sorted_probs, kth)
        mass_k = nn.op.sum(nn.op.where(in_top_k, sorted_probs, nn.op.zeros(sorted_probs.shape, "float32")),
                           axis=-1, keepdims=True)
        return nn.op.sample_top_p_top_k_from_sorted_prob(sorted_probs, sorted_ids, top_p * mass_k, top_k, uniform,
                                                         rows)

    def logprobs(self, logits: nn.Tensor, tokens: nn.Tensor) -> tuple[nn.Tensor, nn.Tensor, nn.Tensor]:
        """log_softmax(logits) at `tokens` (int32[b, 1]) → f32[b, 1], and the TOP_LOGPROBS most likely tokens
        of each row: (f32[b, k], int32[b, k]), best first."""
        lp = nn.op.wrap_nested(relax.op.nn.log_softmax(_expr(logits), axis=-1), "log_softmax")
        chosen = nn.op.wrap_nested(relax.op.gather_elements(_expr(lp), _expr(tokens), axis=1), "chosen_logprob")
        top_values, top_ids = nn.op.topk(lp, k=TOP_LOGPROBS, axis=-1, ret_type="both", dtype="int32")
        return chosen, top_values, top_ids


def _expr(t: nn.Tensor) -> relax.Expr:
    """The Relax expression behind an nn.Tensor, for relax ops nn.op does not wrap."""
    return t._expr  # pylint: disable=protected-access


def _first_max(a, b):
    """Combine (index, value) pairs: the larger value, the smaller index on a tie (TOPI's argmax
    combiner, term for term: TIR recognises cross-thread reducers by their form)."""
    bigger = a[1] > b[1]
    return (tirx.Select(tirx.Or(bigger, tirx.And(a[1] == b[1], a[0] < b[0])), a[0], b[0]),
            tirx.Select(bigger, a[1], b[1]))


_FIRST_MAX = te.comm_reducer(_first_max, lambda i, v: (tirx.const(-1, i), te.min_value(v)), name="first_max")
ARGMAX_CHUNKS = 128  # slices per row in `argmax`; 151,936 and 128,256 (Qwen, Llama-3) are multiples
TOP_LOGPROBS = 20  # OpenAI's cap on top_logprobs; the compiled `logprobs` always returns this many
