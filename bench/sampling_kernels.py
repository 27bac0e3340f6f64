"""The compiled on-device sampling functions of an artifact, checked then timed per call.

    python bench/sampling_kernels.py ARTIFACT [ARTIFACT ...]   (a library-only artifact gets random weights)

For batch 1, 16 and 64 rows of the artifact's vocabulary: argmax equals numpy's; sample_probs equals
softmax(logits / T) with min-p; every top-p / top-k draw lies in numpy's kept set (top-k first, then
top-p of the renormalized top-k mass). Then milliseconds per call (synchronized, 20 calls), the
Python VM call included: what one decode step pays for its sampling.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from bench.random_weights import fill  # noqa: E402
from conftest import top_k_top_p_kept  # noqa: E402
from runtime.artifact import Artifact, import_tvm, load_library  # noqa: E402


def main(paths: list[str]) -> None:
    tvm = import_tvm("cuda")
    from tvm.runtime.vm import VirtualMachine

    dev = tvm.cuda(0)

    def timed(fn, reps=20) -> float:
        fn()
        dev.sync()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        dev.sync()
        return (time.perf_counter() - start) / reps * 1e3

    print(f"card: {dev.device_name}")
    for path in paths:
        if not (Path(path) / "weights").is_dir():
            fill(Path(path), None)  # the sampling functions take no weights, but an artifact has them
        artifact = Artifact.open(path)
        vm = VirtualMachine(load_library(artifact, "cuda"), dev)
        vocab = artifact.config["vocab_size"]
        for b in (1, 16, 64):
            rng = np.random.default_rng(b)
            host = (rng.standard_normal((b, vocab)) * 3).astype("float32")

            def t(a, dtype="float32"):
                return tvm.runtime.tensor(np.ascontiguousarray(a, dtype), dev)

            logits, temp, min_p = t(host), t(np.full(b, 0.8)), t(np.full(b, 0.05))
            top_p, top_k = t(np.full((b, 1), 0.9)), t(np.full((b, 1), 50), "int32")
            rows, uniform = t(np.arange(b)[:, None], "int32"), t(rng.random((b, 1)))
            assert (vm["argmax"](logits).numpy() == host.argmax(-1)).all(), "argmax"
            probs = vm["sample_probs"](logits, temp, min_p)
            want = np.exp((host - host.max(-1, keepdims=True)) / 0.8)
            want /= want.sum(-1, keepdims=True)
            want = np.where(want >= 0.05 * want.max(-1, keepdims=True), want, 0)
            want /= want.sum(-1, keepdims=True)
            np.testing.assert_allclose(probs.numpy(), want, rtol=1e-3, atol=1e-7)
            drawn = vm["sample_top_p_top_k"](probs, top_p, top_k, uniform, rows).numpy()[:, 0]
            for r in range(b):
                assert drawn[r] in top_k_top_p_kept(want[r], 50, 0.9), ("top_p/top_k", r)
            ms = {
                "argmax": timed(lambda: vm["argmax"](logits)),
                "sample_probs": timed(lambda: vm["sample_probs"](logits, temp, min_p)),
                "sample_multinomial": timed(lambda: vm["sample_multinomial"](probs, uniform, rows)),
                "sample_top_p_top_k": timed(lambda: vm["sample_top_p_top_k"](probs, top_p, top_k, uniform, rows)),
            }
            print(f"{artifact.path.name} b={b} correct; ms per call: "
                  + " ".join(f"{k} {v:.3f}" for k, v in ms.items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
