"""Argument validation shared by every entry point (the CUDA wrapper and both references).

Implements the Errors section of SPEC.md: a caller bug raises ``ValueError`` (shape, rank, device,
kv_lens values) or ``TypeError`` (dtype, non-tensor) whose message names the argument, the expected
and the actual value. The checks read shapes, dtypes and devices only, except the kv_lens *value*
check below. Valid input costs a few microseconds (this sits on the eager hot path).

kv_lens values (``0 <= kv_lens[b] <= S_kv``): always checked on CPU tensors. On CUDA tensors the
check needs a host synchronisation (one ``aminmax`` read back), so it runs only in plain eager
mode: it is skipped while the current stream is capturing a CUDA graph and while torch.compile
traces, where the kernel and the packed reference clamp kv_lens into ``[0, S_kv]`` instead
(memory-safe, but an out-of-range value then gives clamped results rather than an error).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Sizes(NamedTuple):
    """Problem sizes in the paper's letters (SPEC.md, Shapes and arguments)."""

    B: int
    S: int
    G: int
    h: int
    Dk: int
    Dv: int
    S_kv: int
    n: int


_FLOAT_KERNEL = (torch.float16, torch.bfloat16, torch.float32)
_FLOAT_REFERENCE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)
_Tensor = torch.Tensor

try:
    _is_compiling = torch.compiler.is_compiling
except AttributeError:  # torch < 2.3
    from torch._dynamo import is_compiling as _is_compiling


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _dtype_list(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _require_tensor(name: str, t) -> None:
    if not isinstance(t, _Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def _rank_error(name: str, layout: str, t: torch.Tensor) -> ValueError:
    return ValueError(
        f"{name}: expected rank {layout.count(',') + 1} {layout}, got rank {t.dim()} "
        f"with shape {_shape(t)}"
    )


def _check_kv_lens_values(kv_lens: torch.Tensor, S_kv: int) -> None:
    if kv_lens.numel() == 0:
        return
    if kv_lens.is_cuda:
        # A value check needs a host sync: skip it where a sync is illegal or untraceable.
        if _is_compiling() or torch.cuda.is_current_stream_capturing():
            return
        lo, hi = torch.stack(torch.aminmax(kv_lens)).tolist()  # one sync for both
    elif kv_lens.device.type == "cpu":
        if kv_lens.numel() <= 32:  # a list is cheaper than two tensor reductions here
            values = kv_lens.tolist()
            lo, hi = min(values), max(values)
        else:
            lo, hi = (int(x) for x in torch.aminmax(kv_lens))
    else:  # meta / fake tensors carry no values
        return
    if lo < 0 or hi > S_kv:
        raise ValueError(f"kv_lens: expected values in [0, S_kv={S_kv}], got min {lo}, max {hi}")


def validate(
    Q, K, V, ranges, kv_lens=None, *, allow_float64: bool = False, check_values: bool = True
) -> Sizes:
    """Checks the arguments of selection attention; returns the sizes.

    Q [B, S, G, h, Dk], K [B, G, S_kv, Dk], V [B, G, S_kv, Dv], ranges [B, S, G, n, 2],
    kv_lens [B] or None. ``allow_float64`` admits float64 (the references; the kernel wrapper
    takes fp16/bf16/fp32 only). ``check_values=False`` skips the kv_lens value check (fake
    tensors).
    """
    # --- types and ranks -------------------------------------------------------------------
    if not (
        type(Q) is _Tensor and type(K) is _Tensor and type(V) is _Tensor and type(ranges) is _Tensor
    ):
        # Slow path for subclasses (FakeTensor, Parameter, ...) and for the error message.
        for name, t in (("Q", Q), ("K", K), ("V", V), ("ranges", ranges)):
            _require_tensor(name, t)
    q_shape = Q.shape
    k_shape = K.shape
    v_shape = V.shape
    r_shape = ranges.shape
    if len(q_shape) != 5:
        raise _rank_error("Q", "[B, S, G, h, Dk]", Q)
    if len(k_shape) != 4:
        raise _rank_error("K", "[B, G, S_kv, Dk]", K)
    if len(v_shape) != 4:
        raise _rank_error("V", "[B, G, S_kv, Dv]", V)
    if len(r_shape) != 5:
        raise _rank_error("ranges", "[B, S, G, n, 2]", ranges)

    # --- shapes ----------------------------------------------------------------------------
    B, S, G, h, Dk = q_shape
    S_kv = k_shape[2]
    if k_shape[0] != B or k_shape[1] != G or k_shape[3] != Dk:
        raise ValueError(
            f"K: expected shape [B={B}, G={G}, S_kv, Dk={Dk}] matching Q, got {_shape(K)}"
        )
    Dv = v_shape[3]
    if v_shape[0] != B or v_shape[1] != G or v_shape[2] != S_kv:
        raise ValueError(
            f"V: expected shape [B={B}, G={G}, S_kv={S_kv}, Dv] matching Q and K, got {_shape(V)}"
        )
    n = r_shape[3]
    if r_shape[4] != 2:
        raise ValueError(
            f"ranges: expected last dim 2 ([start, end) pairs), got {r_shape[4]} "
            f"(shape {_shape(ranges)})"
        )
    if r_shape[0] != B or r_shape[1] != S or r_shape[2] != G:
        raise ValueError(
            f"ranges: expected shape [B={B}, S={S}, G={G}, n, 2] matching Q, got {_shape(ranges)}"
        )

    # --- dtypes ----------------------------------------------------------------------------
    dt = Q.dtype
    floats = _FLOAT_REFERENCE if allow_float64 else _FLOAT_KERNEL
    if dt not in floats:
        raise TypeError(f"Q: expected dtype {_dtype_list(floats)}, got {dt}")
    if K.dtype != dt:
        raise TypeError(f"K: expected dtype {dt} (the dtype of Q), got {K.dtype}")
    if V.dtype != dt:
        raise TypeError(f"V: expected dtype {dt} (the dtype of Q), got {V.dtype}")
    if ranges.dtype not in _INDEX:
        raise TypeError(f"ranges: expected dtype int32 or int64, got {ranges.dtype}")

    # --- devices ---------------------------------------------------------------------------
    dev = Q.device
    if K.device != dev:
        raise ValueError(f"K: expected device {dev} (the device of Q), got {K.device}")
    if V.device != dev:
        raise ValueError(f"V: expected device {dev} (the device of Q), got {V.device}")
    if ranges.device != dev:
        raise ValueError(f"ranges: expected device {dev} (the device of Q), got {ranges.device}")

    # --- kv_lens ---------------------------------------------------------------------------
    if kv_lens is not None:
        _require_tensor("kv_lens", kv_lens)
        if kv_lens.dim() != 1 or kv_lens.shape[0] != B:
            raise ValueError(f"kv_lens: expected shape [B={B}], got {_shape(kv_lens)}")
        if kv_lens.dtype not in _INDEX:
            raise TypeError(f"kv_lens: expected dtype int32 or int64, got {kv_lens.dtype}")
        if kv_lens.device != dev:
            raise ValueError(
                f"kv_lens: expected device {dev} (the device of Q), got {kv_lens.device}"
            )
        if check_values:
            _check_kv_lens_values(kv_lens, S_kv)

    return Sizes(B, S, G, h, Dk, Dv, S_kv, n)


def resolve_scale(scale: Optional[float], Dk: int) -> float:
    """The softmax scale: ``scale`` as a float, or ``1/sqrt(Dk)`` when None."""
    if scale is None:
        return 1.0 / (Dk**0.5) if Dk > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    return float(scale)
