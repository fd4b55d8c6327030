"""Masking-op benchmark: the MAE reference op sequence vs torch.compile of it vs maskray's ops.

For each model (ViT-S/16, ViT-B/16 at 224) and batch size it times, forward and forward+backward:

- ``indices``: per-image random masking (argsort x2 + mask gather  vs  ``random_mask_indices``);
- ``gather``: the visible-patch gather alone, forward (full patchify copy, then a gather with a ``.repeat``-ed
  int64 index  vs  the Triton gather of the embedding, in the activation dtype; the reference's strided index on
  CPU);
- ``encoder``: masking + patch embedding + positions + CLS (full conv on all patches, +pos, argsort masking,
  gather with a ``.repeat``-ed int64 index, cat CLS  vs  ``random_mask_indices`` + ``embed_visible_patches``);
- ``decoder``: decoder input (mask-token repeat, cat, repeat-index gather, cat, +pos  vs  ``decoder_unshuffle``);
- ``loss``: norm-pix MSE (patchify copy, mean/var on all patches, masked mean  vs  ``masked_patch_loss``).

The reference sequence is written here from the description of facebookresearch/mae ``models_mae.py`` in
spec section 1.1 (argsort is called with ``stable=True`` so that identical noise gives identical ids; MAE's
default argsort differs only on ties). maskray's ops dispatch by device: Triton kernels on CUDA, the PyTorch
reference of :mod:`maskray.masking.reference` on CPU.

GB/s are *effective*: the bytes a fused implementation must move (visible inputs read once, outputs written
once, see ``op_bytes``) divided by the measured time, the same byte count for every implementation. On a GPU
the percentage is of the device-to-device copy bandwidth measured at the start of the same run (bytes read and
written, a 1 GiB ``clone``); the datasheet HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s) is printed beside it.

Usage: ``python benchmarks/masking.py`` (GPU: both models, batch 64 and 256, bf16 autocast, torch.compile on;
CPU: ViT-S/16, batch 64, fp32, 7 reps, no compile). Flags pick smaller sets (``--img-size`` a smaller image).
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskray.masking import ops  # noqa: E402
from maskray.masking.indices import num_visible  # noqa: E402
from maskray.models.pos_embed import sincos_2d  # noqa: E402

MODELS = {"vit_s16": dict(dim=384, patch=16), "vit_b16": dict(dim=768, patch=16)}
DECODER_DIM = 512
DATASHEET_BW = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


# ------------------------------------------------------------------------------------------------ MAE reference


def mae_random_masking(x: torch.Tensor, noise: torch.Tensor, keep: int):
    """MAE ``random_masking``: two argsorts, gather with a repeated int64 index, mask via gather."""
    batch, length, dim = x.shape
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :keep]
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, dim))
    mask = torch.ones(batch, length, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_masked, mask, ids_restore


def mae_indices(noise: torch.Tensor, keep: int):
    batch, length = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    mask = torch.ones(batch, length, device=noise.device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore


def mae_encoder_input(images, noise, weight, bias, pos_embed, cls_token, keep: int):
    """Conv patch embed on all patches -> + pos -> random masking -> cat (cls + pos[0])."""
    x = F.conv2d(images, weight, bias, stride=weight.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = x + pos_embed[:, 1:, :]
    x, mask, ids_restore = mae_random_masking(x, noise, keep)
    cls = cls_token + pos_embed[:, :1, :]
    x = torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)
    return x, mask, ids_restore


def mae_gather(images, ids_keep, patch: int):
    """MAE's visible patches: every patch copied out (patchify), then a gather with a repeated int64 index."""
    x = mae_patchify(images, patch)
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))


def mae_decoder_input(x, ids_restore, mask_token, pos_embed):
    """mask_token.repeat -> cat -> gather with a repeated index -> cat CLS -> + pos."""
    batch, length = ids_restore.shape
    mask_tokens = mask_token.repeat(batch, length + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    return x + pos_embed


def mae_patchify(images, patch: int):
    batch, chans, height, width = images.shape
    h, w = height // patch, width // patch
    x = images.reshape(batch, chans, h, patch, w, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(batch, h * w, patch * patch * chans)


def mae_loss(images, pred, mask, patch: int, norm_pix: bool = True):
    """Norm-pix loss on every patch (unbiased var, eps 1e-6), then the mean over removed patches."""
    target = mae_patchify(images, patch)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


# ------------------------------------------------------------------------------------------------ maskray


def maskray_indices(noise, keep: int):
    m = ops.random_mask_indices(noise, keep)
    return m.ids_keep, m.mask, m.ids_restore


def maskray_encoder_input(images, noise, weight, bias, pos_embed, cls_token, keep: int):
    m = ops.random_mask_indices(noise, keep)
    return ops.embed_visible_patches(images, m.ids_keep, weight, bias, pos_embed, cls_token), m.mask, m.ids_restore


def maskray_gather(images, ids_keep, patch: int):
    """The embedding's visible-patch gather: the Triton kernel (in the autocast dtype) on CUDA, else the
    reference's strided index."""
    if ops.use_triton(images, ids_keep):
        from maskray.masking.triton._common import compute_dtype

        dtype = compute_dtype(images.device, images.dtype)
        return ops._backend().gather_patches(images, ids_keep, patch, dtype)
    from maskray.masking.reference import gather_patches_chw

    return gather_patches_chw(images, ids_keep, patch)


def maskray_decoder_input(x, ids_restore, mask_token, pos_embed):
    return ops.decoder_unshuffle(x, ids_restore, mask_token, pos_embed)


def maskray_loss(images, pred, mask, patch: int, norm_pix: bool = True):
    return ops.masked_patch_loss(pred, images, mask, patch, norm_pix)


# ------------------------------------------------------------------------------------------------ timing


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def bench_group(fns: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int) -> dict:
    """Median milliseconds of each function.

    GPU: ``triton.testing.do_bench`` per function (L2 flushed between calls). CPU: the functions are timed
    interleaved, one call of each per round, so that load from other processes hits every implementation alike.
    """
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return {name: float(do_bench(fn, warmup=max(warmup, 25), rep=max(reps, 100), return_mode="median"))
                    for name, fn in fns.items()}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def op_bytes(op: str, batch: int, length: int, keep: int, dim: int, chans: int, patch: int, act_bytes: int):
    """Bytes a fused implementation moves (forward, backward); images fp32, ids int64, activations act_bytes."""
    pdim = chans * patch * patch
    removed = length - keep
    ids = batch * (keep + 2 * length) * 8 + batch * length * 4  # ids_keep, ids_restore (int64), mask, noise
    if op == "indices":
        return ids, 0
    if op == "gather":  # fp32 visible pixels read once, written once in the activation dtype
        return batch * keep * pdim * (4 + act_bytes) + batch * keep * 8, 0
    if op == "encoder":
        fwd = batch * keep * pdim * 4 + batch * (1 + keep) * dim * act_bytes + dim * pdim * 4 + ids
        bwd = batch * keep * pdim * 4 + batch * (1 + keep) * dim * act_bytes + dim * pdim * 4
        return fwd, bwd
    if op == "decoder":
        fwd = batch * (1 + keep) * DECODER_DIM * act_bytes + batch * (1 + length) * DECODER_DIM * 4 + batch * length * 8
        bwd = batch * (1 + length) * DECODER_DIM * 4 + batch * (1 + keep) * DECODER_DIM * act_bytes + batch * length * 8
        return fwd, bwd
    if op == "loss":
        fwd = batch * removed * pdim * (4 + act_bytes) + batch * length * pdim * act_bytes + batch * length * 4
        bwd = 2 * batch * length * pdim * act_bytes
        return fwd, bwd
    raise ValueError(op)


def copy_bandwidth(device: torch.device, nbytes: int = 2**30) -> float:
    """Bytes/s of a device-to-device ``clone`` of ``nbytes`` (bytes read plus bytes written)."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32)
    ms = bench_group({"copy": lambda: src.clone()}, device, 20, 5)["copy"]
    return 2 * src.numel() * 4 / (ms * 1e-3)


def device_bandwidth(device: torch.device) -> tuple[float | None, str]:
    """The copy bandwidth measured now (the percentages' 100 %) and a note with the datasheet figure."""
    if device.type != "cuda":
        return None, "n/a (CPU)"
    name = torch.cuda.get_device_name(device)
    value = copy_bandwidth(device)
    sheet = next((f", datasheet {bw / 1e12:.2f} TB/s" for key, bw in DATASHEET_BW.items() if key in name), "")
    return value, f"{name} measured copy {value / 1e12:.2f} TB/s{sheet}"


# ------------------------------------------------------------------------------------------------ main


def make_inputs(model: str, batch: int, device: torch.device, act_dtype: torch.dtype, ratio: float,
                img_size: int = 224):
    cfg = MODELS[model]
    dim, patch = cfg["dim"], cfg["patch"]
    grid = (img_size // patch, img_size // patch)
    length = grid[0] * grid[1]
    keep = num_visible(length, ratio)
    gen = torch.Generator(device="cpu").manual_seed(0)
    pdim = 3 * patch * patch
    inputs = dict(
        images=torch.randn(batch, 3, img_size, img_size, generator=gen).to(device),
        noise=torch.rand(batch, length, generator=gen).to(device),
        weight=(torch.randn(dim, 3, patch, patch, generator=gen) / pdim**0.5).to(device).requires_grad_(),
        bias=torch.zeros(dim, device=device).requires_grad_(),
        pos=sincos_2d(dim, grid).to(device),
        cls=(0.02 * torch.randn(1, 1, dim, generator=gen)).to(device).requires_grad_(),
        dec_x=torch.randn(batch, 1 + keep, DECODER_DIM, generator=gen).to(device, act_dtype).requires_grad_(),
        mask_token=(0.02 * torch.randn(1, 1, DECODER_DIM, generator=gen)).to(device).requires_grad_(),
        dec_pos=sincos_2d(DECODER_DIM, grid).to(device),
        pred=torch.randn(batch, length, pdim, generator=gen).to(device, act_dtype).requires_grad_(),
    )
    return inputs, dict(dim=dim, patch=patch, length=length, keep=keep)


def run_case(model, batch, device, args, act_dtype, autocast, peak_bw):
    inp, shape = make_inputs(model, batch, device, act_dtype, args.mask_ratio, args.img_size)
    keep, patch, dim, length = shape["keep"], shape["patch"], shape["dim"], shape["length"]
    masking = ops.random_mask_indices(inp["noise"], keep)
    mask, ids_restore, ids_keep = masking.mask, masking.ids_restore, masking.ids_keep
    enc_params = [inp["weight"], inp["bias"], inp["cls"]]

    def ops_for(impl):
        indices, gather, encoder, decoder, loss = impl
        enc = lambda: encoder(inp["images"], inp["noise"], inp["weight"], inp["bias"], inp["pos"], inp["cls"], keep)
        dec = lambda: decoder(inp["dec_x"], ids_restore, inp["mask_token"], inp["dec_pos"])
        los = lambda: loss(inp["images"], inp["pred"], mask, patch)
        g_enc = torch.randn(batch, 1 + keep, dim, device=device)
        g_dec = torch.randn(batch, 1 + length, DECODER_DIM, device=device)

        def enc_fb():
            out = enc()[0]
            torch.autograd.grad(out, enc_params, g_enc.to(out.dtype))

        def dec_fb():
            out = dec()
            torch.autograd.grad(out, [inp["dec_x"], inp["mask_token"]], g_dec.to(out.dtype))

        def los_fb():
            torch.autograd.grad(los(), [inp["pred"]])

        return {
            "indices": (lambda: indices(inp["noise"], keep), None),
            "gather": (lambda: gather(inp["images"], ids_keep, patch), None),
            "encoder": (enc, enc_fb),
            "decoder": (dec, dec_fb),
            "loss": (los, los_fb),
        }

    impls = {"reference": (mae_indices, mae_gather, mae_encoder_input, mae_decoder_input, mae_loss)}
    compile_note = None
    if args.compile:
        try:
            impls["compiled"] = tuple(torch.compile(f, dynamic=False) for f in impls["reference"])
        except Exception as err:  # noqa: BLE001
            compile_note = f"torch.compile unavailable: {err}"
    else:
        compile_note = "torch.compile skipped (CPU default; pass --compile to try)"
    impls["maskray"] = (maskray_indices, maskray_gather, maskray_encoder_input, maskray_decoder_input, maskray_loss)

    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    act_bytes = torch.finfo(act_dtype).bits // 8
    results: dict = {}
    with ctx:
        # correctness cross-check on the same noise
        ref_out = mae_encoder_input(inp["images"], inp["noise"], inp["weight"], inp["bias"], inp["pos"],
                                    inp["cls"], keep)[0]
        mr_out = maskray_encoder_input(inp["images"], inp["noise"], inp["weight"], inp["bias"], inp["pos"],
                                       inp["cls"], keep)[0]
        enc_err = (ref_out.float() - mr_out.float()).abs().max().item()
        loss_ref = mae_loss(inp["images"], inp["pred"], mask, patch).item()
        loss_mr = maskray_loss(inp["images"], inp["pred"], mask, patch).item()
        timed = {}
        for impl_name, impl in impls.items():
            fns = ops_for(impl)
            try:  # first calls: compile (if any) happens here
                for fwd, fwd_bwd in fns.values():
                    fwd()
                    if fwd_bwd is not None:
                        fwd_bwd()
            except Exception as err:  # noqa: BLE001
                if impl_name != "compiled":
                    raise
                compile_note = f"torch.compile failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                continue
            timed[impl_name] = fns
        for op in next(iter(timed.values())):
            with torch.no_grad() if args.no_grad_fwd else nullcontext():
                fwd_ms = bench_group({name: fns[op][0] for name, fns in timed.items()}, device, args.reps,
                                     args.warmup)
            fb_ms = {}
            if timed["reference"][op][1] is not None:
                fb_ms = bench_group({name: fns[op][1] for name, fns in timed.items()}, device, args.reps,
                                    args.warmup)
            results[op] = {name: {"fwd_ms": fwd_ms[name], "fwd_bwd_ms": fb_ms.get(name)} for name in timed}
    for op, row in results.items():
        fwd_b, bwd_b = op_bytes(op, batch, length, keep, dim if op == "encoder" else DECODER_DIM, 3, patch,
                                act_bytes)
        row["bytes_fwd"], row["bytes_fwd_bwd"] = fwd_b, fwd_b + bwd_b
        for fig in list(row.values()):
            if not isinstance(fig, dict):
                continue
            fig["gbps_fwd"] = fwd_b / (fig["fwd_ms"] * 1e-3) / 1e9
            if fig["fwd_bwd_ms"] is not None:
                fig["gbps_fwd_bwd"] = (fwd_b + bwd_b) / (fig["fwd_bwd_ms"] * 1e-3) / 1e9
            if peak_bw:
                fig["pct_peak_fwd"] = 100 * fig["gbps_fwd"] * 1e9 / peak_bw
                if "gbps_fwd_bwd" in fig:
                    fig["pct_peak_fwd_bwd"] = 100 * fig["gbps_fwd_bwd"] * 1e9 / peak_bw
        mr = row["maskray"]
        for base in ("reference", "compiled"):
            if base in row:
                row[f"speedup_vs_{base}_fwd"] = row[base]["fwd_ms"] / mr["fwd_ms"]
                if mr["fwd_bwd_ms"] is not None:
                    row[f"speedup_vs_{base}_fwd_bwd"] = row[base]["fwd_bwd_ms"] / mr["fwd_bwd_ms"]
    return dict(model=model, batch=batch, keep=keep, length=length, dim=dim, results=results,
                check=dict(encoder_max_abs_diff=enc_err, loss_reference=loss_ref, loss_maskray=loss_mr),
                compile_note=compile_note)


def print_case(case):
    print(f"\n== {case['model']} batch {case['batch']} (L={case['length']}, K={case['keep']}, D={case['dim']}) ==")
    if case["compile_note"]:
        print(f"   note: {case['compile_note']}")
    chk = case["check"]
    print(f"   check: encoder max|ref-maskray| = {chk['encoder_max_abs_diff']:.2e}; "
          f"loss ref {chk['loss_reference']:.6f} maskray {chk['loss_maskray']:.6f}")
    head = f"   {'op':8s} {'impl':10s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'GB/s fwd':>9s} {'GB/s f+b':>9s}"
    print(head)
    for op, row in case["results"].items():
        for impl in ("reference", "compiled", "maskray"):
            if impl not in row:
                continue
            fig = row[impl]
            fb = f"{fig['fwd_bwd_ms']:11.3f}" if fig["fwd_bwd_ms"] is not None else f"{'-':>11s}"
            gfb = f"{fig['gbps_fwd_bwd']:9.1f}" if "gbps_fwd_bwd" in fig else f"{'-':>9s}"
            pct = f"  ({fig['pct_peak_fwd']:.1f}% of copy)" if "pct_peak_fwd" in fig else ""
            print(f"   {op:8s} {impl:10s} {fig['fwd_ms']:9.3f} {fb} {fig['gbps_fwd']:9.1f} {gfb}{pct}")
        ratios = [f"{k.replace('speedup_vs_', 'x vs ')}: {v:.2f}" for k, v in row.items() if k.startswith("speedup")]
        print(f"   {'':8s} ratio (baseline / maskray): " + ", ".join(ratios))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma list from " + ",".join(MODELS))
    parser.add_argument("--batch", default=None, help="comma list of batch sizes")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--no-grad-fwd", action="store_true", help="time forward under torch.no_grad")
    parser.add_argument("--json-out", help="also write the JSON object to this file, rewritten after every case "
                        "(a run stopped early keeps the cases done)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    models = (args.models or ("vit_s16,vit_b16" if gpu else "vit_s16")).split(",")
    batches = [int(b) for b in (args.batch or ("64,256" if gpu else "64")).split(",")]
    args.reps = args.reps or (100 if gpu else 7)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    args.compile = gpu if args.compile is None else args.compile
    autocast = gpu and not args.fp32
    act_dtype = torch.bfloat16 if autocast else torch.float32
    peak_bw, peak_note = device_bandwidth(device)
    if gpu:
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device {device} ({machine}); torch {torch.__version__}; precision "
          f"{'bf16 autocast' if autocast else 'fp32'}; mask ratio {args.mask_ratio}; reps {args.reps}; "
          f"peak {peak_note}")
    print("maskray path: " + ("Triton kernels" if ops.use_triton(torch.empty(1, device=device)) else
                              "PyTorch reference (maskray.masking.reference)"))
    cases: list[dict] = []
    summary = dict(
        benchmark="masking", device=str(device), machine=machine, torch=torch.__version__,
        precision="bf16-autocast" if autocast else "fp32", mask_ratio=args.mask_ratio, img_size=args.img_size,
        reps=args.reps, peak_bandwidth=peak_bw, peak_note=peak_note, cases=cases,
    )
    for model in models:
        for batch in batches:
            case = run_case(model, batch, device, args, act_dtype, autocast, peak_bw)
            print_case(case)
            cases.append(case)
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(summary) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
