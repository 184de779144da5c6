import os

# Triton kernels run on CPU tensors through the interpreter; this must be set before any
# @triton.jit function is created, i.e. before aecore.kernels is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
