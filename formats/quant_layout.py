"""The GGUF types Kiln keeps packed, and the component arrays each one becomes (docs/QUANT-LAYOUT.md).

One table read by the repacker and the quantizer (compile/), the model definitions that declare the
packed parameters and the kernels that read them, so a component's name, dtype and shape are written
down once (in formats/ so that every layer may import it).
"""

from __future__ import annotations

from dataclasses import dataclass

from formats.errors import KilnError


@dataclass(frozen=True)
class Component:
    """One array of a packed weight: `dtype` (a numpy / Relax dtype name), shape [N, K // per_entry]."""

    dtype: str
    per_entry: int  # weights of a row that share one entry (e.g. 8 four-bit codes per uint32, 32 per scale)


@dataclass(frozen=True)
class QuantType:
    """A GGUF block format: `block` weights in `block_bytes` bytes, repacked into `components`."""

    name: str  # Kiln's name, lower case (q4_k); GGUF's is name.upper()
    block: int
    block_bytes: int
    components: dict[str, Component]

    def shapes(self, n: int, k: int) -> dict[str, tuple[int, int]]:
        """Each component's shape for an [n, k] weight (k a multiple of `block`)."""
        return {c: (n, k // comp.per_entry) for c, comp in self.components.items()}

    def row_bytes(self, k: int) -> int:
        """Bytes of one GGUF row of k weights."""
        return k // self.block * self.block_bytes


_CODES4, _CODES8 = Component("uint32", 8), Component("uint32", 4)
_CODES2, _CODES1 = Component("uint32", 16), Component("uint32", 32)
_SCALE_32, _SCALE_256 = Component("float16", 32), Component("float16", 256)
_SC_MIN_32 = {"sc": Component("uint8", 32), "m": Component("uint8", 32)}

QUANT_TYPES: dict[str, QuantType] = {t.name: t for t in [
    QuantType("q8_0", 32, 34, {"q": _CODES8, "d": _SCALE_32}),
    QuantType("q4_0", 32, 18, {"q": _CODES4, "d": _SCALE_32}),
    QuantType("q2_k", 256, 84, {"q": _CODES2, "sc": Component("uint8", 16), "d": _SCALE_256, "dmin": _SCALE_256}),
    QuantType("q3_k", 256, 110, {"q": _CODES2, "qh": _CODES1, "sc": Component("int8", 16), "d": _SCALE_256}),
    QuantType("q4_k", 256, 144, {"q": _CODES4, **_SC_MIN_32, "d": _SCALE_256, "dmin": _SCALE_256}),
    QuantType("q5_k", 256, 176, {"q": _CODES4, "qh": _CODES1, **_SC_MIN_32, "d": _SCALE_256, "dmin": _SCALE_256}),
    QuantType("q6_k", 256, 210, {"q": _CODES4, "qh": _CODES2, "sc": Component("int8", 16), "d": _SCALE_256}),
]}


def quant_type(name: str) -> QuantType:
    """The table entry of a Kiln type name; an unknown name is a KilnError listing the valid ones."""
    if name not in QUANT_TYPES:
        raise KilnError(f"unknown quantization type {name!r}: Kiln keeps {', '.join(QUANT_TYPES)} packed")
    return QUANT_TYPES[name]

# GGUF float types kept as stored where the model dtype is wider (a GGUF's F16 tensors on the fp32 CPU
# path): one component `w`, cast by the same dequantize PrimFunc, so the weights stay at the file's size.
STORED_FLOATS = {"f16": "float16", "bf16": "bfloat16"}
