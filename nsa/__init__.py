"""NSA selection attention (decode): PyTorch face of the nsa_sel C++/CUDA core.

Importing never builds or loads the CUDA library; that happens on the first eligible call with
NSA_SEL_CUDA=1 (see nsa.flags).
"""

from .kernels.cuda_sel_kernel import kernel_status, selection_attention_cuda
from .reference import grouped_selection_attention, grouped_selection_attention_packed

selection_attention = selection_attention_cuda

__all__ = [
    "grouped_selection_attention",
    "grouped_selection_attention_packed",
    "kernel_status",
    "selection_attention",
    "selection_attention_cuda",
]
__version__ = "0.1.0"
