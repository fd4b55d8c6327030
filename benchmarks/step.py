"""One full MAE training step: maskray's model path vs a reference MAE built from the same timm blocks.

- maskray: ``MaskedViT`` (visible-only ``embed_visible_patches``) + ``MAEDecoder`` (``decoder_unshuffle``) +
  ``masked_patch_loss``, masks from ``random_mask_indices`` (Triton kernels on CUDA, PyTorch reference on CPU).
- reference: the facebookresearch/mae op sequence (spec section 1.1, re-implemented in
  ``benchmarks/masking.py``): timm ``PatchEmbed`` on all patches, + pos, argsort masking with a ``.repeat``-ed
  gather index, cat CLS, the *same* timm blocks (deep copies: identical weights), decoder mask-token repeat /
  cat / gather / + pos, ``decoder_pred`` on all tokens, norm-pix loss on all patches then the masked mean.

Both run encoder + decoder + loss + backward + AdamW on synthetic device-resident data with the same noise, so
the first-step losses must agree (printed). Reported: images/s over the timed steps (the variants alternate for
``--rounds`` rounds, each keeps its best; later rounds continue training, their first loss is not comparable)
and peak memory
(``torch.cuda.max_memory_allocated`` on GPU; "n/a" on CPU). GPU default: ViT-S/16 and ViT-B/16 at 224, batch
256, bf16 autocast, 8x512 decoder. CPU default: a tiny config that finishes in about a minute. The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from masking import mae_decoder_input, mae_loss, mae_random_masking  # noqa: E402

from maskray.masking import ops  # noqa: E402
from maskray.masking.indices import num_visible  # noqa: E402
from maskray.models.decoder import MAEDecoder  # noqa: E402
from maskray.models.vit import MaskedViT, MaskedViTCfg  # noqa: E402

ARCHS = {"vit_s16": "vit_small_patch16_224", "vit_b16": "vit_base_patch16_224", "tiny": "vit_tiny_patch16_224"}


class MaskrayMAE(nn.Module):
    def __init__(self, encoder: MaskedViT, decoder: MAEDecoder) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, images: torch.Tensor, noise: torch.Tensor, keep: int) -> torch.Tensor:
        masking = ops.random_mask_indices(noise, keep)
        latent = self.encoder(images, ids_keep=masking.ids_keep).tokens
        pred = self.decoder(latent, masking.ids_restore)
        return ops.masked_patch_loss(pred, images, masking.mask, self.encoder.patch_size, norm_pix=True)


class ReferenceMAE(nn.Module):
    """MAE's ``forward_encoder`` / ``forward_decoder`` / ``forward_loss`` over copies of maskray's modules."""

    def __init__(self, encoder: MaskedViT, decoder: MAEDecoder) -> None:
        super().__init__()
        vit = encoder.vit
        self.patch_size = encoder.patch_size
        self.patch_embed = copy.deepcopy(vit.patch_embed)
        self.cls_token = nn.Parameter(vit.cls_token.detach().clone())
        self.pos_embed = nn.Parameter(vit.pos_embed.detach().clone(), requires_grad=vit.pos_embed.requires_grad)
        self.blocks = copy.deepcopy(vit.blocks)
        self.norm = copy.deepcopy(vit.norm)
        self.decoder_embed = copy.deepcopy(decoder.embed)
        self.mask_token = nn.Parameter(decoder.mask_token.detach().clone())
        self.decoder_pos_embed = nn.Parameter(decoder.pos_embed.detach().clone(), requires_grad=False)
        self.decoder_blocks = copy.deepcopy(decoder.blocks)
        self.decoder_norm = copy.deepcopy(decoder.norm)
        self.decoder_pred = copy.deepcopy(decoder.pred)

    def forward(self, images: torch.Tensor, noise: torch.Tensor, keep: int) -> torch.Tensor:
        x = self.patch_embed(images)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = mae_random_masking(x, noise, keep)
        cls = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        x = self.decoder_embed(x)
        x = mae_decoder_input(x, ids_restore, self.mask_token, self.decoder_pos_embed)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
        return mae_loss(images, x, mask, self.patch_size)


def run_variant(name, model, images, noises, keep, device, autocast, steps, warmup):
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=fused)
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else nullcontext
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    losses = []

    def step(index):
        opt.zero_grad(set_to_none=True)
        with ctx():
            loss = model(images, noises[index % len(noises)], keep)
        loss.backward()
        opt.step()
        return loss

    for index in range(warmup + steps):
        if index == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = step(index)
        if index == 0:
            losses.append(loss.item())
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    model.to("cpu")
    opt.state.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result = dict(
        first_loss=losses[0], step_ms=1e3 * elapsed / steps, images_per_s=images.shape[0] * steps / elapsed,
        peak_memory_bytes=peak,
    )
    mem = f"{peak / 2**30:.2f} GiB" if peak is not None else "n/a (CPU)"
    print(f"   {name:9s} first loss {result['first_loss']:.6f}  step {result['step_ms']:9.1f} ms  "
          f"{result['images_per_s']:9.1f} img/s  peak memory {mem}")
    return result


def run_case(arch_key, args, device, autocast):
    torch.manual_seed(args.seed)
    arch = ARCHS.get(arch_key, arch_key)
    encoder = MaskedViT(MaskedViTCfg(arch=arch, img_size=args.img_size, patch_size=args.patch, depth=args.depth))
    patch_dim = args.patch * args.patch * encoder.in_chans
    decoder = MAEDecoder(encoder.embed_dim, encoder.grid_size, patch_dim, dim=args.decoder_dim,
                         depth=args.decoder_depth, num_heads=args.decoder_heads)
    reference = ReferenceMAE(encoder, decoder)  # deep copies before anything trains: identical weights
    maskray = MaskrayMAE(encoder, decoder)
    keep = num_visible(encoder.num_patches, args.mask_ratio)
    gen = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randn(args.batch, encoder.in_chans, args.img_size, args.img_size, generator=gen).to(device)
    noises = [torch.rand(args.batch, encoder.num_patches, generator=gen).to(device) for _ in range(4)]
    print(f"\n== {arch} img {args.img_size} patch {args.patch} depth {encoder.depth}, decoder "
          f"{args.decoder_depth}x{args.decoder_dim}, batch {args.batch}, L={encoder.num_patches}, K={keep} ==")
    out = {}
    for round_index in range(args.rounds):  # alternate the variants; keep each one's best round
        for name, model in (("maskray", maskray), ("reference", reference)):
            res = run_variant(name, model, images, noises, keep, device, autocast, args.steps, args.warmup)
            if name not in out:
                out[name] = res
            elif res["images_per_s"] > out[name]["images_per_s"]:
                out[name].update(step_ms=res["step_ms"], images_per_s=res["images_per_s"])
            if round_index:
                out[name]["first_loss_later_round"] = res["first_loss"]
    m, r = out["maskray"], out["reference"]
    ratio = m["images_per_s"] / r["images_per_s"]
    rel = abs(m["first_loss"] - r["first_loss"]) / max(abs(r["first_loss"]), 1e-12)
    mem_note = ""
    if m["peak_memory_bytes"] is not None:
        saved = (r["peak_memory_bytes"] - m["peak_memory_bytes"]) / 2**30
        mem_note = f", peak memory maskray/reference {m['peak_memory_bytes'] / r['peak_memory_bytes']:.3f} " \
                   f"({saved:+.2f} GiB saved)"
    print(f"   img/s maskray/reference {ratio:.3f}{mem_note}; first-step loss rel. diff {rel:.2e}")
    return dict(arch=arch, img_size=args.img_size, patch=args.patch, depth=encoder.depth, batch=args.batch,
                decoder=f"{args.decoder_depth}x{args.decoder_dim}", keep=keep, length=encoder.num_patches,
                maskray=m, reference=r, speedup=ratio, first_loss_rel_diff=rel)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=None, help="comma list: vit_s16, vit_b16, tiny or a timm ViT name")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--patch", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None, help="encoder depth override")
    parser.add_argument("--decoder-dim", type=int, default=None)
    parser.add_argument("--decoder-depth", type=int, default=None)
    parser.add_argument("--decoder-heads", type=int, default=None)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="alternating timing rounds (best kept)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    defaults = dict(
        arch="vit_s16,vit_b16" if gpu else "tiny", batch=256 if gpu else 32, img_size=224 if gpu else 96,
        patch=16 if gpu else 8, depth=None if gpu else 4, decoder_dim=512 if gpu else 128,
        decoder_depth=8 if gpu else 2, decoder_heads=16 if gpu else 4, steps=20 if gpu else 8,
        warmup=5 if gpu else 2,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    autocast = gpu and not args.fp32
    machine = torch.cuda.get_device_name(device) if gpu else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device {device} ({machine}); torch {torch.__version__}; "
          f"{'bf16 autocast' if autocast else 'fp32'}; steps {args.steps} after {args.warmup} warmup")
    print("maskray path: " + ("Triton kernels" if ops.use_triton(torch.empty(1, device=device)) else
                              "PyTorch reference (maskray.masking.reference)"))
    cases = [run_case(arch, args, device, autocast) for arch in args.arch.split(",")]
    print(json.dumps(dict(benchmark="step", device=str(device), machine=machine, torch=torch.__version__,
                          precision="bf16-autocast" if autocast else "fp32", mask_ratio=args.mask_ratio,
                          steps=args.steps, warmup=args.warmup, cases=cases)))


if __name__ == "__main__":
    main()
