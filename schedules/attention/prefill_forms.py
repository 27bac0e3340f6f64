"""TVM's two prefill calling conventions (runtime/vm/attn_backend.h), written once for Kiln's prefill kernels
(prefill.py, prefill_hopper.py, metal_prefill.py):

- ragged ``(q, qo_indptr, k, v, kv_indptr, q_rope_position, k_rope_pos_offset, output, lse,
  causal, rotary_mode, rope_scale, rope_theta, sm_scale)``: attention over the new tokens;
- paged ``(q, qo_indptr, pages, page_indptr, page_values, length_info, k_rope_pos_offset,
  q_rope_position, output, lse, causal, rotary_mode, rope_scale, rope_theta, sm_scale)``: the new
  tokens attend to tokens already in pages (chunked prefill; the runtime merges both states).

``prefill_func`` declares the parameters and buffers of one form and calls ``K.kernel()``, the
kernel's non-hygienic macro (thread bindings and body), which sees the buffers (``q``, ``q_indptr``,
``k``/``v``/``kv_indptr`` or ``pages``/``page_indptr``/``page_values``/``length_info``, ``output``,
``lse``), ``B``, ``qo_len`` and the scalar parameters by name; ``K.kv_range(seq)`` (set by
``prefill_func``) fills info[4] (KV start | first page) and info[5] (KV length) of sequence ``seq``.
The kernel's namespace ``K`` gives ``H_qo``, ``H_kv``, ``D``, ``dtype`` and ``PAGE_SIZE``.
Why two signatures: TVMScript reads a PrimFunc's parameters from its ``def`` line, so each
parameter list is spelled once, here.
"""

from tvm.script import tirx as T

# pylint: disable=invalid-name,unused-argument,unused-variable


@T.macro(hygienic=False)
def ragged_kv_range(seq):
    info[4] = kv_indptr[seq]
    info[5] = kv_indptr[seq + 1] - info[4]


@T.macro(hygienic=False)
def paged_kv_range(seq):
    info[4] = page_indptr[seq]
    info[5] = T.if_then_else(page_indptr[seq + 1] > info[4],
                             (page_indptr[seq + 1] - info[4] - 1) * K.PAGE_SIZE + length_info[seq], 0)


def prefill_func(kind: str, symbol: str, K):
    """The PrimFunc of ``kind`` ("ragged" or "paged") named ``symbol`` whose body is ``K.kernel()``."""
    H_qo, H_kv, D, dtype, PAGE_SIZE = K.H_qo, K.H_kv, K.D, K.dtype, K.PAGE_SIZE
    if kind == "ragged":
        K.kv_range = ragged_kv_range

        @T.prim_func(s_tir=True)
        def ragged(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
                   var_kv_indptr: T.handle, var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle,
                   var_output: T.handle, var_lse: T.handle, causal: T.int32, rotary_mode: T.int32,
                   rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
            T.func_attr({"tirx.is_scheduled": True, "global_symbol": symbol})
            B = T.int32()
            qo_len = T.int32()
            kv_len = T.int32()
            q_indptr_off = T.int32()
            kv_indptr_off = T.int32()
            q_rope_off = T.int32()
            k_rope_off = T.int32()
            q = T.match_buffer(var_q, (qo_len, H_qo, D), dtype)
            q_indptr = T.match_buffer(var_q_indptr, (B + 1,), "int32", elem_offset=q_indptr_off)
            k = T.match_buffer(var_k, (kv_len, H_kv, D), dtype)
            v = T.match_buffer(var_v, (kv_len, H_kv, D), dtype)
            kv_indptr = T.match_buffer(var_kv_indptr, (B + 1,), "int32", elem_offset=kv_indptr_off)
            q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_off)
            k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (B,), "int32", elem_offset=k_rope_off)
            output = T.match_buffer(var_output, (qo_len, H_qo, D), dtype)
            lse = T.match_buffer(var_lse, (qo_len, H_qo), "float32")
            K.kernel()

        return ragged

    assert kind == "paged", kind
    K.kv_range = paged_kv_range

    @T.prim_func(s_tir=True)
    def paged(var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
              var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
              var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle, causal: T.int32,
              rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": symbol})
        B = T.int32()
        qo_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_off = T.int32()
        page_indptr_off = T.int32()
        page_values_off = T.int32()
        length_info_off = T.int32()
        k_rope_off = T.int32()
        q_rope_off = T.int32()
        q = T.match_buffer(var_q, (qo_len, H_qo, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (B + 1,), "int32", elem_offset=q_indptr_off)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, H_kv, PAGE_SIZE, D), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (B + 1,), "int32", elem_offset=page_indptr_off)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_off)
        length_info = T.match_buffer(var_length_info, (B,), "int32", elem_offset=length_info_off)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (B,), "int32", elem_offset=k_rope_off)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_off)
        output = T.match_buffer(var_output, (qo_len, H_qo, D), dtype)
        lse = T.match_buffer(var_lse, (qo_len, H_qo), "float32")
        K.kernel()

    return paged
