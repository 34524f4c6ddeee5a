"""CUDA selection-attention entry point with strict, observable fallbacks (SPEC.md, Errors).

Routing of :func:`selection_attention_cuda`:

1. validate the arguments (the same errors as the references);
2. ``NSA_SEL_CUDA`` unset: the packed PyTorch reference;
3. a configuration the kernel does not cover (CPU tensors, fp32, S > 1, a zero-sized dim, or the
   library answering UNSUPPORTED): the reference, silently (debug log);
4. otherwise the CUDA kernel of ``libnsa_sel.so`` on the caller's current stream. A failure of
   that path (library missing, build failed, no device, CUDA error) raises RuntimeError under
   ``NSA_SEL_CUDA_STRICT=1``, else warns once per process and returns the reference. A poisoned
   CUDA context (CUDA_STICKY) always raises.

Eager calls on CUDA tensors under ``NSA_SEL_CUDA=1`` try the C++ fast path first (:mod:`._fast`:
checks, allocation and launch in one C++ call, for the calls the kernel takes as they are); any
call it does not take, and any launch status but OK, goes down the route above, which owns every
error and fallback. The op is registered as ``torch.ops.nsa.selection_attention`` with a fake
implementation, so torch.compile(fullgraph=True) traces it; eager calls skip the dispatcher (it
costs ~10 us).
"""

import logging
import warnings
from typing import Optional

import torch

from .. import flags
from .._validate import Sizes, resolve_scale, validate
from ..reference import _packed
from . import _fast, _lib

__all__ = ["selection_attention_cuda", "kernel_status"]

log = logging.getLogger("nsa")

_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1}
_INDEX_CODE = {torch.int32: 0, torch.int64: 1}
_FAILURE_STATUSES = {
    _lib.Status.NO_DEVICE: "no usable CUDA device or driver",
    _lib.Status.CUDA: "CUDA error",
    _lib.Status.NOT_BUILT: "the library was built without CUDA",
}
_warned = False
_fast_enabled = True  # the tests switch the eager fast path off to compare the two

try:
    _is_compiling = torch.compiler.is_compiling
except AttributeError:  # torch < 2.3
    from torch._dynamo import is_compiling as _is_compiling

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _current_stream(device: torch.device) -> int:
    """cudaStream_t of the current stream of ``device``, as an int."""
    if _raw_stream is not None:
        return _raw_stream(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def _on_kernel_device(t: torch.Tensor) -> bool:
    """Whether ``t`` lives where the kernel runs (a hook the CPU tests patch)."""
    return t.is_cuda


def selection_attention_cuda(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    ranges: torch.Tensor,
    *,
    kv_lens: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Selection attention of NSA, on the CUDA kernel where it applies.

    Args:
        Q: [B, S, G, h, Dk] fp16 | bf16 (fp32 goes to the reference).
        K: [B, G, S_kv, Dk], Q's dtype. Any strides: a slice of a larger KV cache or a permuted
            view is read in place when its last dim is contiguous (else it is copied first).
        V: [B, G, S_kv, Dv], Q's dtype.
        ranges: [B, S, G, n, 2] int32 | int64: n half-open token ranges [start, end) per
            (b, s, g) row, clamped to [0, lim), lim = min(kv_lens[b] - S + s + 1, kv_lens[b]).
        kv_lens: [B] int32 | int64, optional: valid cache length per sequence (default S_kv).
        scale: softmax scale, default 1/sqrt(Dk).

    Returns:
        out [B, S, G, h, Dv] in V's dtype: softmax(scale * q . k) @ v over the selected tokens
        (a token covered by two ranges counts twice); exact zeros for an empty selection.

    Raises:
        ValueError / TypeError: caller bugs (shapes, dtypes, devices, kv_lens values), naming
            the argument.
        RuntimeError: a poisoned CUDA context, or any CUDA-path failure under
            NSA_SEL_CUDA_STRICT=1.
    """
    if _is_compiling():
        return torch.ops.nsa.selection_attention(
            Q, K, V, ranges, kv_lens, None if scale is None else float(scale)
        )
    return _call(Q, K, V, ranges, kv_lens, scale)


def _call(Q, K, V, ranges, kv_lens, scale) -> torch.Tensor:
    """One eager call (also the custom op's body): the fast path, else the Python route."""
    if _fast_enabled and flags.cuda_enabled() and type(Q) is torch.Tensor and Q.is_cuda:
        out = _fast_call(Q, K, V, ranges, kv_lens, scale)
        if out is not None:
            return out
    return _route(Q, K, V, ranges, kv_lens, scale)


def _fast_call(Q, K, V, ranges, kv_lens, scale) -> Optional[torch.Tensor]:
    """The eager fast path (:mod:`._fast`): the output, or None for the Python path.

    None whenever the extension is absent or the call is not one the kernel takes as it is; the
    Python path then decides (errors, fallbacks), so a None is never an answer. A launch that
    failed is not retried here: the Python path launches again and reports its status.
    """
    index = Q.get_device()
    try:
        lib = _lib.get_library(index)
    except _lib.LibraryUnavailable:
        return None
    launcher = _fast.launcher_for(lib)  # cached on lib
    if launcher is None:
        return None
    # kv_lens values are checked (one host sync) as validate() checks them: not while capturing.
    check = kv_lens is not None and not torch.cuda.is_current_stream_capturing()
    stream = _raw_stream(index) if _raw_stream is not None else _current_stream(Q.device)
    return launcher(Q, K, V, ranges, kv_lens, scale, stream, check)


def _route(Q, K, V, ranges, kv_lens, scale) -> torch.Tensor:
    sizes = validate(Q, K, V, ranges, kv_lens)
    scale = resolve_scale(scale, sizes.Dk)
    if not flags.cuda_enabled():
        return _packed(Q, K, V, ranges, kv_lens, scale, sizes)
    if not _on_kernel_device(Q) or Q.dtype not in _DTYPE_CODE or sizes.S != 1 or 0 in sizes:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "nsa: selection attention on the reference: not a kernel configuration "
                "(device %s, dtype %s, sizes %s)",
                Q.device,
                Q.dtype,
                sizes,
            )
        return _packed(Q, K, V, ranges, kv_lens, scale, sizes)
    return _run_kernel(Q, K, V, ranges, kv_lens, scale, sizes)


def _run_kernel(Q, K, V, ranges, kv_lens, scale: float, sizes: Sizes) -> torch.Tensor:
    dev = Q.device
    index = dev.index or 0  # a CUDA tensor always has an index
    try:
        lib = _lib.get_library(index)
    except _lib.LibraryUnavailable as e:
        return _fallback(f"library unavailable: {e.reason}", Q, K, V, ranges, kv_lens, scale, sizes)
    # Only a non-contiguous last dim forces a copy; any other strides go to the kernel as-is.
    if Q.stride(-1) != 1:
        Q = Q.contiguous()
    if K.stride(-1) != 1:
        K = K.contiguous()
    if V.stride(-1) != 1:
        V = V.contiguous()
    out = torch.empty(sizes[:4] + (sizes.Dv,), dtype=V.dtype, device=dev)
    params = _pack(Q, K, V, ranges, kv_lens, scale, sizes, out)
    status, message = lib.launch(params, index, _current_stream(dev))
    if status == 0:
        return out
    if status == _lib.Status.UNSUPPORTED:
        log.debug("nsa: selection attention on the reference: kernel unsupported (%s)", message)
        return _packed(Q, K, V, ranges, kv_lens, scale, sizes)
    if status == _lib.Status.INVALID_ARGUMENT:
        raise ValueError(message or "nsa_sel: invalid argument")
    if status == _lib.Status.CUDA_STICKY:
        raise RuntimeError(
            f"nsa: the selection kernel left the CUDA context of {dev} poisoned ({message}); "
            f"no later result on this device can be trusted"
        )
    what = _FAILURE_STATUSES.get(status, f"unexpected status {status}")
    return _fallback(
        f"{what}: {message}" if message else what, Q, K, V, ranges, kv_lens, scale, sizes
    )


def _pack(Q, K, V, ranges, kv_lens, scale: float, sizes: Sizes, out) -> bytes:
    """NsaSelParams of one call, as bytes (the last dims of Q, K, V already of stride 1)."""
    if kv_lens is None:
        kv_ptr = kv_stride = kv_type = 0
    else:
        kv_ptr = kv_lens.data_ptr()
        kv_stride = kv_lens.stride(0)
        kv_type = _INDEX_CODE[kv_lens.dtype]
    # fmt: off
    return _lib.pack_params(
        Q.data_ptr(), K.data_ptr(), V.data_ptr(), ranges.data_ptr(), kv_ptr, out.data_ptr(),
        *sizes,  # b, s, g, h, d_k, d_v, s_kv, n
        *Q.stride(), *K.stride(), *V.stride(), *out.stride(), *ranges.stride(), kv_stride,
        scale, _DTYPE_CODE[Q.dtype], _INDEX_CODE[ranges.dtype], kv_type,
    )
    # fmt: on


def _fallback(reason: str, Q, K, V, ranges, kv_lens, scale, sizes) -> torch.Tensor:
    """A failure of the CUDA path: raise (strict) or warn once and use the reference."""
    global _warned
    if flags.strict():
        raise RuntimeError(
            f"nsa: the CUDA selection kernel failed and NSA_SEL_CUDA_STRICT=1: {reason}"
        )
    if not _warned:
        _warned = True
        warnings.warn(
            f"nsa: the CUDA selection kernel is unavailable ({reason}); using the "
            f"PyTorch reference (this warning is shown once per process)",
            RuntimeWarning,
            stacklevel=5,
        )
    else:
        log.debug("nsa: CUDA selection kernel failed (%s); using the reference", reason)
    return _packed(Q, K, V, ranges, kv_lens, scale, sizes)


def kernel_status(device=None, *, build: bool = False) -> dict:
    """Whether the CUDA library can be used on ``device`` and, if not, why (never raises).

    ``build=False`` only looks (no build even under NSA_SEL_CUDA_BUILD=1); ``build=True``
    follows NSA_SEL_CUDA_BUILD (the library and the eager fast path). Keys: enabled, strict,
    available, reason, library, built_with_cuda, fast_path (eager calls take the C++ fast path of
    :mod:`._fast`) and fast_path_reason (why not, else "").
    """
    status = {
        "enabled": flags.cuda_enabled(),
        "strict": flags.strict(),
        "available": False,
        "reason": "",
        "library": None,
        "built_with_cuda": None,
        "fast_path": False,
        "fast_path_reason": "",
    }
    try:
        index = None
        if device is not None:
            index = torch.device(device).index
        elif torch.cuda.is_available():
            index = torch.cuda.current_device()
        lib = _lib.get_library(index, build=None if build else False)
    except _lib.LibraryUnavailable as e:
        status["reason"] = e.reason
        return status
    status.update(library=lib.path, built_with_cuda=lib.built_with_cuda)
    if not lib.built_with_cuda:
        status["reason"] = "the library was built without CUDA"
    elif not torch.cuda.is_available():
        status["reason"] = "no CUDA device is visible to torch"
    else:
        status["available"] = True
    if not status["available"]:
        status["fast_path_reason"] = "the kernel is not available"
        return status
    try:
        module = _fast.load_module(build_missing=None if build else False)
        module.Launcher(lib.path)  # binds (ABI, symbols) as the calls will
        status["fast_path"] = True
    except _lib.LibraryUnavailable as e:
        status["fast_path_reason"] = e.reason
    except Exception as e:  # noqa: BLE001 (a library the extension cannot bind)
        status["fast_path_reason"] = f"the eager fast path cannot bind {lib.path}: {e}"
    return status


# --- torch.library registration ------------------------------------------------------------
# (Annotations are evaluated, not strings: custom_op infers the schema from them.)


@torch.library.custom_op("nsa::selection_attention", mutates_args=())
def _selection_attention_op(
    Q: torch.Tensor,
    K: torch.Tensor,
    V: torch.Tensor,
    ranges: torch.Tensor,
    kv_lens: Optional[torch.Tensor],
    scale: Optional[float],
) -> torch.Tensor:
    return _call(Q, K, V, ranges, kv_lens, scale)


@_selection_attention_op.register_fake
def _selection_attention_fake(Q, K, V, ranges, kv_lens, scale):
    B, S, G, h, _, Dv, _, _ = validate(Q, K, V, ranges, kv_lens, check_values=False)
    return Q.new_empty((B, S, G, h, Dv), dtype=V.dtype)
