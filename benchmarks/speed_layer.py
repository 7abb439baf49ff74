"""Cost of one SEAL-wrapped output projection, against the formulas it could use instead.

Times (interleaved repeats; the table shows the minimum over repeats, the JSON all statistics) of:

- ``base``: the bare ``nn.Linear``;
- ``seal``: the tuner's ``Linear`` wrapper as shipped;
- ``orig``: the wrapper's original forward (``x * s.repeat_interleave(d).to(dtype)``, then the base
  layer), with the same checks as the shipped one;
- ``act-ref``: the bare formula ``base(x * s.repeat_interleave(d).to(dtype))`` without any wrapper;
- ``bcast``: ``base((x.view(..., H, d) * s[:, None]).flatten(-2))`` — broadcasting per-head scales
  over a reshaped input (no ``repeat_interleave``);

in inference (no grad) and for forward+backward (gradient for the scale and the input, frozen
weight), one row (decoding) and many rows (prefill / training).

    python benchmarks/speed_layer.py --features 576 --head-dim 64 --tokens 1,2048 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import markdown_table, parse_dtype, summarize, write_json  # noqa: E402


def _per_call(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _original_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The wrapper's forward before the performance work (same checks, same formula as act-ref)."""
    if layer.disable_adapters or layer.merged:
        return layer.base_layer(x)
    vector = layer._active_channel_scale()
    if vector is not None:
        x = x * vector.to(x.dtype)
    return layer.base_layer(x)


def make_forms(base: nn.Module, layer: nn.Module, scale: torch.Tensor, d: int) -> dict:
    return {
        "base": lambda x: base(x),
        "seal": lambda x: layer(x),
        "orig": lambda x: _original_forward(layer, x),
        "act-ref": lambda x: base(x * scale.repeat_interleave(d).to(x.dtype)),
        "bcast": lambda x: base((x.unflatten(-1, (-1, d)) * scale.to(x.dtype)[:, None]).flatten(-2)),
    }


def time_forms(forms: dict, x: torch.Tensor, scale: torch.Tensor, mode: str, repeats: int, budget_s: float):
    """Interleaved per-call seconds of every form, ``repeats`` samples each."""
    grad = torch.randn_like(x)
    xg = x.clone().requires_grad_(True)

    def call(f):
        if mode == "no-grad":
            with torch.no_grad():
                f(x)
        else:
            f(xg).backward(grad)
            xg.grad = None
            scale.grad = None

    first = _per_call(lambda: call(forms["base"]), 3)
    calls = max(1, int(budget_s / max(first, 1e-7)))
    times: dict[str, list[float]] = {k: [] for k in forms}
    for f in forms.values():
        call(f)
    for _ in range(repeats):
        for k, f in forms.items():
            times[k].append(_per_call(lambda f=f: call(f), calls))
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=576, help="in = out features (SmolLM2: 576)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", default="1,2048")
    p.add_argument("--dtype", default="bfloat16,float32")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--budget-ms", type=float, default=20.0, help="approximate time per timing sample")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from seal_peft.tuner.layer import Linear

    torch.manual_seed(0)
    record: dict = {"args": vars(args), "results": []}
    rows = []
    for dtype_name in args.dtype.split(","):
        dtype = parse_dtype(dtype_name)
        base = nn.Linear(args.features, args.features, bias=False).to(dtype).requires_grad_(False)
        layer = Linear(base, "default", group=args.head_dim, init_weights=False)
        scale = layer.seal_scale["default"]
        forms = make_forms(base, layer, scale, args.head_dim)
        for n in [int(t) for t in args.tokens.split(",") if t]:
            x = torch.randn(1, n, args.features).to(dtype)
            for mode in ("no-grad", "fwd+bwd"):
                times = time_forms(forms, x, scale, mode, args.repeats, args.budget_ms / 1e3)
                stats = {k: summarize(v) for k, v in times.items()}
                # min over repeats: on a shared machine the least-disturbed sample is the best estimate
                b = stats["base"]["min"]
                record["results"].append({"dtype": dtype_name, "tokens": n, "mode": mode, "seconds": stats})
                rows.append(
                    [dtype_name, n, mode, f"{b * 1e6:.1f}"]
                    + [f"{(stats[k]['min'] - b) * 1e6:+.1f}" for k in ("seal", "orig", "act-ref", "bcast")]
                )
    print(
        f"# one {args.features}x{args.features} o_proj, SEAL-H (head_dim {args.head_dim}), {torch.get_num_threads()} thread(s)"
    )
    print(
        markdown_table(
            [
                "dtype",
                "tokens",
                "mode",
                "base us",
                "seal (shipped) extra us",
                "seal (original wrapper) extra us",
                "act-ref (bare formula) extra us",
                "bcast extra us",
            ],
            rows,
        )
    )
    write_json(args.json, record)
    return record


if __name__ == "__main__":
    main()
