"""Quantized weights as a parameter kind: GGUF block types held packed (docs/QUANT-LAYOUT.md's components).

A quantized weight `P` of N rows and K columns is a few parameters `P.q`, `P.d`, ... whose dequantized
values are bit-identical to `gguf.quants.dequantize` of the GGUF blocks. Dequantization is a TE compute
(formats/quant_values.py's element values) in a PrimFunc named `dequantize_<qtype>`, so compiler passes
and schedule rules recognise it: where few rows are computed `schedules/quant_fusion.py` replaces it and
its matmul by one PrimFunc with the group scales factored out, whose GEMV reads packed words and
dequantizes in registers. `quantize_modules` swaps a built model's Linear and
Embedding modules for the quantized ones by parameter name, so the family files never change.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.relax.frontend import nn

from formats.errors import KilnError
from formats.quant_layout import STORED_FLOATS, quant_type
from formats.quant_values import parts


def component_shapes(qtype: str, rows: int, cols: int) -> dict[str, tuple[tuple[int, int], str]]:
    """{component: ((rows, columns), dtype)} of a rows x cols weight of `qtype`, in PrimFunc argument order."""
    if qtype in STORED_FLOATS:
        return {"w": ((rows, cols), STORED_FLOATS[qtype])}
    t = quant_type(qtype)
    return {name: (shape, t.components[name].dtype) for name, shape in t.shapes(rows, cols).items()}


def _value(qtype: str, c: dict, n, k):
    """Element (n, k) in fp32, in ggml's order of operations: (d · sc) · code − dmin · m."""
    if qtype in STORED_FLOATS:
        return c["w"][n, k].astype("float32")
    scale, code, low = parts(qtype, c, n, k)
    return scale * code if low is None else scale * code - low


def dequantize_te(qtype: str, components: list[te.Tensor], cols: int, dtype: str) -> te.Tensor:
    """The N x K weight in `dtype` from its components (quant_layout's order); N = the components' rows."""
    c = dict(zip(component_shapes(qtype, 0, 0), components))
    rows = components[0].shape[0]
    return te.compute((rows, cols), lambda n, k: _value(qtype, c, n, k).astype(dtype), name=f"dequantize_{qtype}")


class QuantWeight(nn.Module):
    """The components of one rows x cols weight as parameters: `q`, `d`, ... (formats/quant_layout.py), or
    `w` for a stored float type."""

    def __init__(self, qtype: str, rows: int, cols: int, dtype: str):
        block = 1 if qtype in STORED_FLOATS else quant_type(qtype).block
        if cols % block:
            raise KilnError(f"a {rows} x {cols} weight cannot be {qtype}: rows of {cols} elements are not "
                            f"whole blocks of {block}")
        self.qtype, self.rows, self.cols, self.dtype = qtype, rows, cols, dtype  # dtype: the dequantized one
        for name, (shape, component_dtype) in component_shapes(qtype, rows, cols).items():
            setattr(self, name, nn.Parameter(shape, component_dtype))

    def components(self) -> list[nn.Tensor]:
        return [getattr(self, name) for name in component_shapes(self.qtype, 0, 0)]

    def dequantize(self, components: list[nn.Tensor] | None = None) -> nn.Tensor:
        """The weight (or the rows `components` were gathered from) in the model dtype: a `dequantize_*`
        call making ggml's fp32 values (its `kiln.qtype` attribute names the type for
        `schedules/quant_fusion.py`, which replaces it where a few-row matmul reads the weight), then a cast."""
        values = nn.op.tensor_expr_op(lambda *c: dequantize_te(self.qtype, list(c), self.cols, "float32"),
                                      f"dequantize_{self.qtype}", components or self.components(),
                                      attrs={"kiln.qtype": self.qtype})
        return values.astype(self.dtype)


def dense(weight) -> nn.Tensor:
    """A weight as a tensor of the model dtype: a plain parameter, or a QuantWeight dequantized."""
    return weight.dequantize() if isinstance(weight, QuantWeight) else weight


class QuantLinear(nn.Module):
    """y = x dequantize(W)^T (+ b), accumulated in fp32 and cast back, as layers.Linear."""

    def __init__(self, in_features: int, out_features: int, qtype: str, dtype: str, bias: bool = False):
        self.weight = QuantWeight(qtype, out_features, in_features, dtype)
        self.bias = nn.Parameter((out_features,), "float32") if bias else None  # as layers.Linear's

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        y = nn.op.matmul(x, nn.op.permute_dims(dense(self.weight)), out_dtype="float32")
        if self.bias is not None:
            y = y + self.bias
        return y.astype(x.dtype)


class QuantEmbedding(nn.Module):
    """Rows of a quantized table: the rows' components are gathered, then only those rows dequantized.
    As the tied LM head, `layers.CausalLM.logits` multiplies by `dense(weight)`."""

    def __init__(self, num: int, dim: int, qtype: str, dtype: str):
        self.weight = QuantWeight(qtype, num, dim, dtype)

    def forward(self, ids: nn.Tensor) -> nn.Tensor:
        rows = [nn.op.take(c, ids, axis=0) for c in self.weight.components()]
        return self.weight.dequantize(rows)


class SplitLinear(nn.Module):
    """A fused projection (qkv_proj, gate_up_proj) whose parts are stored in different types (a *_K_M
    file): one matmul per part, outputs concatenated, the same values as the fused Linear. Parts are
    attributes named as the HF projections (`qkv_proj.q_proj.weight.q`), each packed or float."""

    def __init__(self, fused: nn.Linear, parts: list[tuple[str, int, str | None]]):
        dtype, bias = fused.weight.dtype, fused.bias is not None
        self.names = [name for name, _, _ in parts]
        for name, rows, qtype in parts:
            setattr(self, name, QuantLinear(fused.in_features, rows, qtype, dtype, bias) if qtype else
                    type(fused)(fused.in_features, rows, dtype, bias=bias))

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return nn.op.concat([getattr(self, name)(x) for name in self.names], dim=-1)


def quantize_modules(module: nn.Module, quant: dict, prefix: str = "") -> None:
    """Replace, in place, each Linear / Embedding whose `<name>.weight` is in `quant` by its quantized
    form: {param: qtype}, or {param: [(part, rows, qtype or None)]} for a SplitLinear. Other modules
    keep their float weights."""
    for attr, child in list(vars(module).items()):
        name = f"{prefix}{attr}"
        if isinstance(child, nn.ModuleList):
            for i, item in enumerate(child):
                if (new := _quantized(item, f"{name}.{i}", quant)) is not None:
                    child[i] = new
                else:
                    quantize_modules(item, quant, f"{name}.{i}.")
        elif isinstance(child, nn.Module):
            if (new := _quantized(child, name, quant)) is not None:
                setattr(module, attr, new)
            else:
                quantize_modules(child, quant, f"{name}.")


def _quantized(module: nn.Module, name: str, quant: dict) -> nn.Module | None:
    qtype = quant.get(f"{name}.weight")
    if qtype is None:
        return None
    if isinstance(qtype, list) and isinstance(module, nn.Linear):
        if sum(rows for _, rows, _ in qtype) != module.out_features:
            raise KilnError(f"parameter '{name}.weight': its parts' rows {[r for _, r, _ in qtype]} do not add "
                            f"up to {module.out_features}")
        return SplitLinear(module, qtype)
    if isinstance(module, nn.Embedding):
        return QuantEmbedding(module.num, module.dim, qtype, module.weight.dtype)
    if isinstance(module, nn.Linear):
        return QuantLinear(module.in_features, module.out_features, qtype, module.weight.dtype,
                           bias=module.bias is not None)
    raise KilnError(f"parameter '{name}.weight' cannot be quantized ({type(module).__name__} is not a "
                    "Linear or an Embedding)")

