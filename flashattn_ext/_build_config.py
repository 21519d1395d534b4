"""What the CUDA extension is built for, in one place: dtypes x head dims x archs (and the algorithm names).

Read by setup.py (which head dims / archs to compile, and the -DFAE_HEAD_DIMS / -DFAE_DECODE_HEAD_DIMS lists the
C++ dispatch switches over), csrc/instantiations/generate.py (one .cu per family x direction x dtype x head dim),
CMakeLists.txt, .ci/run, and the package itself (defaults before a build). Plain literals only: setup.py and
generate.py load it with runpy, without importing the package (or torch).
"""
DTYPES = {"fp16": "__half", "bf16": "__nv_bfloat16"}  # instantiation file tag -> CUDA element type
HEAD_DIMS = (32, 64, 96, 128, 256)  # attention fwd / bwd, every family
DECODE_HEAD_DIMS = (64, 128)  # attention_with_kvcache (csrc/kernels/decode): a subset of HEAD_DIMS
FA3_HEAD_DIMS = (64, 128, 256)  # the Hopper family: multiples of 64 (whole 128-byte swizzle panels), sm_90a only
FA3_BWD_HEAD_DIMS = (64, 128)  # its backward (D256's dK + dV accumulators would need 256 registers per thread)
CUDA_ARCHS = ("80", "90a")  # default FLASHATTN_EXT_CUDA_ARCHS; "90a" = wgmma-capable Hopper code
ALGORITHMS = ("auto", "fa2", "fa1", "fa3")  # attention(..., algorithm=); the C++ dispatch resolves them
