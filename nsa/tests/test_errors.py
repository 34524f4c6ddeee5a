"""Caller bugs raise ValueError/TypeError naming the argument, identically on every entry point."""

from __future__ import annotations

import pytest
import torch

from nsa import (
    grouped_selection_attention,
    grouped_selection_attention_packed,
    selection_attention_cuda,
)
from nsa.tests.conftest import make_case

B, S, G, h, Dk, Dv, S_kv, n = 2, 1, 3, 4, 16, 8, 20, 2


def good():
    Q, K, V, r, _ = make_case(B, S, G, h, Dk, Dv, S_kv, n, junk=False)
    return dict(Q=Q, K=K, V=V, ranges=r, kv_lens=torch.tensor([20, 5]))


def with_(**changes):
    def make():
        args = good()
        for name, fn in changes.items():
            args[name] = fn(args[name])
        return args

    return make


# (id, build the arguments, exception type, substrings the message must contain)
CASES = [
    ("Q_rank", with_(Q=lambda t: t[0]), ValueError, ["Q:", "rank 5", "got rank 4"]),
    ("K_rank", with_(K=lambda t: t[0]), ValueError, ["K:", "rank 4", "got rank 3"]),
    ("V_rank", with_(V=lambda t: t[None]), ValueError, ["V:", "rank 4", "got rank 5"]),
    ("ranges_rank", with_(ranges=lambda t: t[0]), ValueError, ["ranges:", "rank 5"]),
    (
        "K_batch",
        with_(K=lambda t: t[:1]),
        ValueError,
        ["K: expected shape [B=2, G=3, S_kv, Dk=16] matching Q, got [1, 3, 20, 16]"],
    ),
    ("K_groups", with_(K=lambda t: t[:, :2]), ValueError, ["K:", "G=3", "got [2, 2, 20, 16]"]),
    ("K_head_dim", with_(K=lambda t: t[..., :8]), ValueError, ["K:", "Dk=16", "got"]),
    ("V_tokens", with_(V=lambda t: t[:, :, :7]), ValueError, ["V:", "S_kv=20", "[2, 3, 7, 8]"]),
    ("V_batch", with_(V=lambda t: torch.cat([t, t])), ValueError, ["V:", "B=2", "got [4"]),
    (
        "ranges_last_dim",
        with_(ranges=lambda t: torch.cat([t, t[..., :1]], -1)),
        ValueError,
        ["ranges:", "last dim 2", "got 3"],
    ),
    (
        "ranges_S",
        with_(ranges=lambda t: torch.cat([t, t], 1)),
        ValueError,
        ["ranges:", "S=1", "got [2, 2, 3, 2, 2]"],
    ),
    ("ranges_G", with_(ranges=lambda t: t[:, :, :1]), ValueError, ["ranges:", "G=3"]),
    ("K_dtype", with_(K=lambda t: t.half()), TypeError, ["K:", "float32", "got torch.float16"]),
    ("V_dtype", with_(V=lambda t: t.bfloat16()), TypeError, ["V:", "got torch.bfloat16"]),
    (
        "Q_int",
        with_(Q=lambda t: t.int(), K=lambda t: t.int(), V=lambda t: t.int()),
        TypeError,
        ["Q:", "expected dtype", "got torch.int32"],
    ),
    (
        "ranges_float",
        with_(ranges=lambda t: t.float()),
        TypeError,
        ["ranges:", "int32 or int64", "got torch.float32"],
    ),
    ("ranges_int16", with_(ranges=lambda t: t.short()), TypeError, ["ranges:", "int16"]),
    ("kv_lens_float", with_(kv_lens=lambda t: t.float()), TypeError, ["kv_lens:", "float32"]),
    (
        "kv_lens_shape",
        with_(kv_lens=lambda t: torch.tensor([1, 2, 3])),
        ValueError,
        ["kv_lens: expected shape [B=2], got [3]"],
    ),
    ("kv_lens_rank", with_(kv_lens=lambda t: t[None]), ValueError, ["kv_lens:", "[B=2]"]),
    (
        "kv_lens_negative",
        with_(kv_lens=lambda t: torch.tensor([-1, 3])),
        ValueError,
        ["kv_lens:", "[0, S_kv=20]", "min -1"],
    ),
    (
        "kv_lens_too_big",
        with_(kv_lens=lambda t: torch.tensor([3, 21], dtype=torch.int32)),
        ValueError,
        ["kv_lens:", "max 21"],
    ),
    (
        "K_device",
        with_(K=lambda t: t.to("meta")),
        ValueError,
        ["K:", "expected device cpu", "got meta"],
    ),
    ("V_device", with_(V=lambda t: t.to("meta")), ValueError, ["V:", "got meta"]),
    ("ranges_device", with_(ranges=lambda t: t.to("meta")), ValueError, ["ranges:", "meta"]),
    ("kv_lens_device", with_(kv_lens=lambda t: t.to("meta")), ValueError, ["kv_lens:", "meta"]),
    ("Q_not_tensor", with_(Q=lambda t: t.tolist()), TypeError, ["Q:", "torch.Tensor", "list"]),
    ("kv_lens_not_tensor", with_(kv_lens=lambda t: [20, 5]), TypeError, ["kv_lens:", "list"]),
]

ENTRY_POINTS = {
    "packed": grouped_selection_attention_packed,
    "oracle": grouped_selection_attention,
    "wrapper": selection_attention_cuda,
}


@pytest.mark.parametrize("entry", [*ENTRY_POINTS, "wrapper+NSA_SEL_CUDA=1"])
@pytest.mark.parametrize("case_id,make,exc,parts", CASES, ids=[c[0] for c in CASES])
def test_caller_bug_is_reported(nsa_env, entry, case_id, make, exc, parts):
    if entry.endswith("=1"):
        nsa_env.setenv("NSA_SEL_CUDA", "1")
    args = make()
    with pytest.raises(exc) as info:
        ENTRY_POINTS[entry.split("+")[0]](
            args["Q"], args["K"], args["V"], args["ranges"], kv_lens=args["kv_lens"]
        )
    msg = str(info.value)
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_many_kv_lens_values_are_checked(entry):
    """More than 32 sequences take the tensor-reduction path of the value check."""
    Q, K, V, r, _ = make_case(40, S, G, h, Dk, Dv, S_kv, n, junk=False)
    lens = torch.full((40,), S_kv)
    lens[33] = S_kv + 1
    with pytest.raises(ValueError, match="kv_lens: expected values in"):
        ENTRY_POINTS[entry](Q, K, V, r, kv_lens=lens)


def test_float64_is_reference_only():
    args = good()
    Q, K, V = (args[k].double() for k in "QKV")
    grouped_selection_attention_packed(Q, K, V, args["ranges"])
    grouped_selection_attention(Q, K, V, args["ranges"])
    with pytest.raises(TypeError, match="Q: expected dtype float16, bfloat16 or float32"):
        selection_attention_cuda(Q, K, V, args["ranges"])


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_bad_scale(entry):
    args = good()
    with pytest.raises(TypeError, match="scale"):
        ENTRY_POINTS[entry](args["Q"], args["K"], args["V"], args["ranges"], scale="big")
