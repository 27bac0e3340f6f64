"""On-device sampling: the functions that turn a batch of logits into token ids without copying the
[batch, vocab] logits to the host (runtime.model_runner.ModelRunner.sample drives them).

Every function takes one row per sequence and no weights. Greedy rows use `argmax`; sampled rows use
`sample_probs` (temperature and min_p) and then either `sample_multinomial` or, when a row asks for
top_p/top_k, `sample_top_p_top_k` (a full sort of each row). Random numbers come from the host (one
uniform per row, from the request's seeded generator), so seeded requests reproduce.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend import nn


class SamplingFunctions:
    """Mixed into CausalLM; model_defs/spec.py exports these methods."""

    def argmax(self, logits: nn.Tensor) -> nn.Tensor:
        """int32[b]: the most likely token of each row (exact greedy)."""
        return nn.op.wrap_nested(relax.op.astype(relax.op.argmax(logits._expr, axis=-1), "int32"), "argmax")

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
        """int32[n, 1]: a token of probs[rows[i]] among its top_k most likely whose mass is within top_p."""
        sorted_ids = nn.op.argsort(probs, axis=-1, descending=True, dtype="int32")  # one sort, then a gather
        sorted_probs = nn.op.wrap_nested(relax.op.gather_elements(probs._expr, sorted_ids._expr, axis=1),
                                         "sorted_probs")
        return nn.op.sample_top_p_top_k_from_sorted_prob(sorted_probs, sorted_ids, top_p, top_k, uniform, rows)
