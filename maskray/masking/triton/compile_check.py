"""Compile every masking kernel for a CUDA target without a GPU (Triton front end + LLVM + ptxas, no driver).

``python -m maskray.masking.triton.compile_check [--arch 90]`` must run *without* ``TRITON_INTERPRET=1`` (the
kernels have to be real ``JITFunction`` objects). It catches type errors, unsupported ops and shared-memory
overflows that the interpreter does not see, for representative specialisations (bf16 / fp16 / fp32 dots,
uint8 images, every constexpr branch). Prints one line per kernel; exit status 1 on the first failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _compile(fn, types: dict, consts: dict, target, num_warps: int = 4, num_stages: int = 3) -> None:
    import triton
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=target,
                            options={"num_warps": num_warps, "num_stages": num_stages})
    flags = ", ".join(f"{k}={getattr(v, 'name', v)}" for k, v in consts.items())
    print(f"ok  {fn.__name__}[{flags}] shared={kernel.metadata.shared} B  {time.perf_counter() - start:.1f}s")


def check(arch: int = 90) -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check needs compiled kernels: unset TRITON_INTERPRET")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from maskray.masking.triton import embed, indices, loss, unshuffle
    from maskray.masking.triton._common import is_autotuned

    target = GPUTarget("cuda", arch, 32)
    i32 = "i32"
    strides = dict(stride_ib=i32, stride_ic=i32, stride_ih=i32, stride_iw=i32)
    names = {tl.bfloat16: "bf16", tl.float16: "fp16", tl.float32: "fp32"}
    for dot, img, out, precision, block in (
        (tl.bfloat16, "*fp32", "*fp32", "tf32", (128, 128, 32, 8)),
        (tl.float16, "*fp16", "*fp16", "tf32", (64, 128, 32, 4)),
        (tl.float32, "*u8", "*fp32", "ieee", (64, 64, 64, 4)),
    ):
        types = dict(img_ptr=img, ids_ptr="*i64", w_ptr="*" + names[dot], bias_ptr="*fp32", pos_ptr="*fp32",
                     cls_ptr="*fp32", scale_ptr="*fp32", shift_ptr="*fp32", out_ptr=out, M=i32, N=i32, KDIM=i32,
                     T=i32, GW=i32, stride_kb=i32, **strides)
        bm, bn, bk, warps = block
        kernel = embed._embed_fwd_kernel
        kernel = kernel.fn if is_autotuned(kernel) else kernel  # the JITFunction under a CUDA-only Autotuner
        _compile(kernel, types,
                 dict(P=16, HAS_IDS=img != "*fp16", HAS_BIAS=True, HAS_CLS=img != "*fp16", NORMALIZE=img == "*u8",
                      DOT_DTYPE=dot, DOT_PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), target, warps)
    _compile(embed._gather_patches_kernel,
             dict(img_ptr="*u8", ids_ptr="*i64", scale_ptr="*fp32", shift_ptr="*fp32", out_ptr="*bf16", M=i32, K=i32,
                  KDIM=i32, GW=i32, stride_kb=i32, **strides),
             dict(P=16, HAS_IDS=True, NORMALIZE=True, BLOCK_M=16, BLOCK_K=128), target)
    _compile(embed._patch_grad_to_image_kernel,
             dict(da_ptr="*bf16", inv_ptr="*i64", scale_ptr="*fp32", dimg_ptr="*fp32", M=i32, L=i32, K=i32, KDIM=i32,
                  GW=i32, **strides),
             dict(P=16, HAS_INV=True, HAS_SCALE=True, BLOCK_M=16, BLOCK_K=128), target)
    _compile(embed._pos_grad_kernel,
             dict(g_ptr="*fp32", inv_ptr="*i64", dpos_ptr="*fp32", B=i32, L=i32, N=i32, stride_gb=i32, stride_gt=i32),
             dict(ROW_OFF=1, BLOCK_L=16, BLOCK_N=128), target)
    _compile(indices._rank_kernel,
             dict(noise_ptr="*fp32", keep_ptr="*i64", restore_ptr="*i64", mask_ptr="*fp32", L=i32, K=i32,
                  stride_nb=i32),
             dict(BLOCK_I=64, BLOCK_J=64), target)
    for reorder in (True, False):
        _compile(unshuffle._unshuffle_fwd_kernel,
                 dict(x_ptr="*bf16", ids_ptr="*i64", mask_ptr="*fp32", pos_ptr="*fp32", out_ptr="*fp32", M=i32,
                      L=i32, K=i32, N=i32, stride_xb=i32, stride_xt=i32, stride_kb=i32),
                 dict(REORDER=reorder, BLOCK_M=16, BLOCK_N=256), target)
        _compile(unshuffle._unshuffle_bwd_kernel,
                 dict(g_ptr="*fp32", ids_ptr="*i64", dx_ptr="*bf16", part_ptr="*fp32", M=i32, L=i32, K=i32, N=i32,
                      stride_kb=i32),
                 dict(REORDER=reorder, BLOCK_M=16, BLOCK_N=256), target)
    for has_rows, pred in ((False, "*bf16"), (True, "*fp32")):
        _compile(loss._masked_patch_loss_kernel,
                 dict(pred_ptr=pred, img_ptr="*u8", mask_ptr="*fp32", rows_ptr="*i64", scale_ptr="*fp32",
                      shift_ptr="*fp32", denom_ptr="*fp32", dpred_ptr=pred, part_ptr="*fp32", M=i32, L=i32,
                      ROW_SHIFT=i32, GW=i32, PD=i32, stride_pb=i32, stride_pt=i32, stride_db=i32, stride_dt=i32,
                      eps="fp32", **strides),
                 dict(P=16, C=3, HAS_ROWS=has_rows, NORM_PIX=has_rows, NORMALIZE=True, BLOCK_M=4, BLOCK_K=1024),
                 target)
    print(f"all masking kernels compiled for {target}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    args = parser.parse_args(argv)
    try:
        check(args.arch)
    except Exception as err:  # noqa: BLE001
        print(f"FAILED: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
