"""Fused Triton masking kernels vs the PyTorch oracle, on CPU through Triton's interpreter.

The interpreter is chosen when ``@triton.jit`` decorates a kernel, so ``TRITON_INTERPRET=1`` is set here, at
collection time, before the kernel package is imported (``import maskray`` never imports it). CPU calls through
:mod:`maskray.masking.ops` only reach the kernels while ``MASKRAY_TRITON_INTERPRET=1`` is set, which the
``interpret`` fixture does per test, so other test files keep the plain PyTorch path.

``MASKRAY_TRITON_DEVICE=cuda`` (the GPU suite, ``benchmarks/gpu/run.sh``): the same tests on a GPU with compiled
kernels; the ``interpret`` fixture then makes CUDA the default device of the test instead (tensors, generators and
modules are created there), and the reference runs on the GPU too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DEVICE_NAME = os.environ.get("MASKRAY_TRITON_DEVICE", "cpu")
if DEVICE_NAME != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import maskray.masking.triton as tk  # noqa: E402
from maskray.masking import ops  # noqa: E402
from maskray.masking import reference as ref  # noqa: E402
from maskray.masking.indices import mask_indices_reference, num_visible  # noqa: E402
from maskray.masking.triton import _common  # noqa: E402

DEVICE = torch.device(DEVICE_NAME)
ON_CUDA = DEVICE.type == "cuda"
needs_interpreter = pytest.mark.skipif(
    not (tk.INTERPRET or (ON_CUDA and torch.cuda.is_available())),
    reason="kernel package was imported without TRITON_INTERPRET=1 in this process (and no MASKRAY_TRITON_DEVICE=cuda)",
)
RATIOS = [0.0, 0.5, 0.75, 0.9]


@pytest.fixture
def interpret(monkeypatch):
    """The kernels' device for one test: CPU through the interpreter, or CUDA (``MASKRAY_TRITON_DEVICE=cuda``) as
    the default device, with TF32 off so that fp32 kernels and fp32 references compare at fp32 tolerances."""
    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("MASKRAY_TRITON_INTERPRET", "1")
        yield
        return
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.set_default_device(DEVICE)
    try:
        yield
    finally:
        torch.set_default_device(None)


def _gen(seed: int) -> torch.Generator:
    """A seeded generator on the default device (the kernels' device inside ``interpret``; a CPU generator cannot
    fill CUDA tensors)."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


def _use_reference(monkeypatch) -> None:
    """From here on, :mod:`maskray.masking.ops` runs the PyTorch reference on every device."""
    monkeypatch.setattr(ops, "use_triton", lambda *tensors: False)


def _masking(batch: int, length: int, ratio: float, seed: int = 0):
    gen = _gen(seed)
    noise = torch.rand(batch, length, generator=gen)
    return mask_indices_reference(noise, num_visible(length, ratio))


def _embed_params(dim: int, channels: int, patch: int, length: int, seed: int = 0, dtype=torch.float32):
    gen = _gen(seed)
    fan = channels * patch * patch
    weight = (torch.randn(dim, channels, patch, patch, generator=gen) / fan**0.5).to(dtype)
    bias = (0.1 * torch.randn(dim, generator=gen)).to(dtype)
    pos = torch.randn(1, 1 + length, dim, generator=gen).to(dtype)
    cls = (0.02 * torch.randn(1, 1, dim, generator=gen)).to(dtype)
    return [t.requires_grad_() for t in (weight, bias, pos, cls)]


def _grads(out, inputs, grad):
    live = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, live, grad)


def _assert_close_all(actual, expected, atol, rtol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------------ oracles


def test_gradcheck_embed_reference():
    torch.manual_seed(0)
    images = torch.randn(2, 2, 8, 12, dtype=torch.float64, requires_grad=True)
    weight, bias, pos, cls = (t.detach().double().requires_grad_() for t in _embed_params(5, 2, 4, 6))
    ids = _masking(2, 6, 0.5).ids_keep
    for ids_keep in (ids, None):
        fn = lambda i, w, b, p, c: ref.embed_visible_patches_reference(i, ids_keep, w, b, p, c)  # noqa: B023
        assert torch.autograd.gradcheck(fn, (images, weight, bias, pos, cls), fast_mode=True)
    mean, std = [0.4, 0.5], [0.2, 0.3]
    fn = lambda i, w: ref.embed_visible_patches_reference(i, ids, w, None, pos[:, 1:], None, mean, std)
    assert torch.autograd.gradcheck(fn, (images, weight), fast_mode=True)


@pytest.mark.parametrize("reorder", [True, False])
def test_gradcheck_unshuffle_reference(reorder):
    torch.manual_seed(0)
    masking = _masking(2, 6, 0.5)
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    token = torch.randn(1, 1, 5, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, 7, 5, dtype=torch.float64, requires_grad=True)
    fn = lambda a, t, p: ref.decoder_unshuffle_reference(a, masking.ids_restore, t, p, reorder)
    assert torch.autograd.gradcheck(fn, (x, token, pos))


@pytest.mark.parametrize("norm_pix", [True, False])
def test_gradcheck_loss_reference(norm_pix):
    torch.manual_seed(0)
    masking = _masking(2, 6, 0.5)
    images = torch.randn(2, 2, 8, 12, dtype=torch.float64, requires_grad=True)
    pred = torch.randn(2, 6, 32, dtype=torch.float64, requires_grad=True)
    fn = lambda p, i: ref.masked_patch_loss_reference(p, i, masking.mask.double(), 4, norm_pix)
    assert torch.autograd.gradcheck(fn, (pred, images))
    # shuffled-order pred holding only the removed rows
    rows = pred[:, 3:].detach().clone().requires_grad_()
    fn = lambda p: ref.masked_patch_loss_reference(p, images, masking.mask.double(), 4, norm_pix, 1e-6,
                                                   masking.ids_restore)
    assert torch.autograd.gradcheck(fn, (rows,))


def test_reference_matches_mae_sequence():
    """The oracles equal our own re-implementation of MAE's op sequence (full conv, repeat-index gather...)."""
    torch.manual_seed(0)
    batch, chans, patch, dim = 2, 3, 4, 8
    images = torch.randn(batch, chans, 8, 12)
    weight, bias, pos, cls = (t.detach() for t in _embed_params(dim, chans, patch, 6))
    noise = torch.rand(batch, 6)
    keep = 3
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    x = torch.nn.functional.conv2d(images, weight, bias, stride=patch).flatten(2).transpose(1, 2) + pos[:, 1:]
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, dim))
    x = torch.cat([(cls + pos[:, :1]).expand(batch, -1, -1), x], dim=1)
    mine = ref.embed_visible_patches_reference(images, ids_keep, weight, bias, pos, cls)
    torch.testing.assert_close(mine, x, atol=1e-5, rtol=1e-5)
    # decoder input
    token = torch.randn(1, 1, dim)
    tokens = torch.cat([x[:, 1:], token.repeat(batch, 6 - keep, 1)], dim=1)
    tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).repeat(1, 1, dim))
    dec = torch.cat([x[:, :1], tokens], dim=1) + pos
    torch.testing.assert_close(ref.decoder_unshuffle_reference(x, ids_restore, token, pos), dec)
    # loss
    mask = torch.ones(batch, 6)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    pred = torch.randn(batch, 6, patch * patch * chans)
    target = images.reshape(batch, chans, 2, patch, 3, patch)
    target = torch.einsum("nchpwq->nhwpqc", target).reshape(batch, 6, -1)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(ref.masked_patch_loss_reference(pred, images, mask, patch), loss)


# ------------------------------------------------------------------------------------------------ indices


@needs_interpreter
@pytest.mark.parametrize("batch,length", [(1, 12), (3, 96), (2, 196)])
@pytest.mark.parametrize("ratio", RATIOS)
def test_random_mask_indices_equals_stable_argsort(interpret, batch, length, ratio):
    noise = torch.rand(batch, length, generator=_gen(length))
    noise[:, ::3] = noise[:, :1]  # many ties: broken by index, like a stable sort
    keep = num_visible(length, ratio)
    got = ops.random_mask_indices(noise, keep)
    want = mask_indices_reference(noise, keep)
    assert got.ids_keep.dtype == got.ids_restore.dtype == torch.int64 and got.mask.dtype == torch.float32
    assert torch.equal(got.ids_keep, want.ids_keep)
    assert torch.equal(got.ids_restore, want.ids_restore)
    assert torch.equal(got.mask, want.mask)
    assert torch.equal(got.ids_keep, torch.argsort(noise, dim=1, stable=True)[:, :keep])


@needs_interpreter
def test_random_mask_indices_half_noise_and_strides(interpret):
    noise = torch.rand(4, 40)[:, ::2].half()  # non-contiguous, fp16 (lots of ties)
    got = ops.random_mask_indices(noise, 5)
    want = mask_indices_reference(noise, 5)
    assert torch.equal(got.ids_restore, want.ids_restore) and torch.equal(got.ids_keep, want.ids_keep)


# ------------------------------------------------------------------------------------------------ embed

EMBED_CASES = [
    # batch, channels, grid (gh, gw), patch, ratio
    (1, 3, (2, 3), 16, 0.5),
    (2, 3, (2, 3), 16, 0.0),
    (2, 3, (4, 6), 4, 0.75),
    (2, 3, (8, 12), 4, 0.9),
    (1, 2, (8, 12), 4, 0.5),
]


@needs_interpreter
@pytest.mark.parametrize("batch,chans,grid,patch,ratio", EMBED_CASES)
def test_embed_matches_reference(interpret, batch, chans, grid, patch, ratio):
    gh, gw = grid
    length, dim = gh * gw, 24
    torch.manual_seed(1)
    images = torch.randn(batch, chans, gh * patch, gw * patch, requires_grad=True)
    weight, bias, pos, cls = _embed_params(dim, chans, patch, length)
    ids = _masking(batch, length, ratio).ids_keep
    inputs = (images, weight, bias, pos, cls)
    out = ops.embed_visible_patches(images, ids, weight, bias, pos, cls)
    want = ref.embed_visible_patches_reference(images, ids, weight, bias, pos, cls)
    assert out.shape == (batch, 1 + ids.shape[1], dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    assert torch.equal(out[:, 0], want[:, 0])  # CLS row: cls + pos[0] exactly
    grad = torch.randn_like(out)
    _assert_close_all(_grads(out, inputs, grad), _grads(want, inputs, grad), atol=5e-5, rtol=1e-5)


@needs_interpreter
def test_embed_all_patches_no_cls_channels_last(interpret):
    torch.manual_seed(2)
    images = torch.randn(2, 3, 16, 24).to(memory_format=torch.channels_last).requires_grad_()
    weight, bias, pos, _ = _embed_params(16, 3, 4, 24)
    pos = pos[:, 1:].detach().clone().requires_grad_()
    for ids in (None, _masking(2, 24, 0.75).ids_keep):
        out = ops.embed_visible_patches(images, ids, weight, bias, pos, None)
        want = ref.embed_visible_patches_reference(images, ids, weight, bias, pos, None)
        torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
        grad = torch.randn_like(out)
        inputs = (images, weight, bias, pos)
        _assert_close_all(_grads(out, inputs, grad), _grads(want, inputs, grad), atol=5e-5, rtol=1e-5)


@needs_interpreter
def test_embed_uint8_and_half_images(interpret):
    torch.manual_seed(3)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    raw = torch.randint(0, 256, (2, 3, 16, 24), dtype=torch.uint8)
    weight, bias, pos, cls = _embed_params(32, 3, 4, 24)
    ids = _masking(2, 24, 0.75).ids_keep
    out = ops.embed_visible_patches(raw, ids, weight, bias, pos, cls, mean=mean, std=std)
    want = ref.embed_visible_patches_reference(raw, ids, weight, bias, pos, cls, mean, std)
    manual = ref.embed_visible_patches_reference(
        (raw.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1),
        ids, weight, bias, pos, cls,
    )
    torch.testing.assert_close(out, want, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(want, manual, atol=5e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    params = (weight, bias, pos, cls)
    _assert_close_all(_grads(out, params, grad), _grads(want, params, grad), atol=2e-4, rtol=1e-5)
    # fp16 images, fp32 weights: fp16 load, fp32 compute
    half = torch.randn(2, 3, 16, 24).half()
    out = ops.embed_visible_patches(half, ids, weight, bias, pos, cls)
    want = ref.embed_visible_patches_reference(half.float(), ids, weight, bias, pos, cls)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    # fp16 parameters too: fp16 output (promotion of the fp16 linear with fp16 pos), fp32 accumulation
    hparams = [p.detach().half().requires_grad_() for p in params]
    out = ops.embed_visible_patches(half, ids, *hparams[:3], hparams[3])
    want = ref.embed_visible_patches_reference(half.float(), ids, *(p.float() for p in hparams))
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), want, atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------------------------------------ decoder


@needs_interpreter
@pytest.mark.parametrize("reorder", [True, False])
@pytest.mark.parametrize("batch,length,ratio", [(1, 12, 0.75), (2, 96, 0.9), (3, 24, 0.0), (2, 24, 0.5)])
def test_unshuffle_matches_reference(interpret, reorder, batch, length, ratio):
    torch.manual_seed(4)
    masking = _masking(batch, length, ratio)
    dim = 40
    x = torch.randn(batch, 1 + masking.num_keep, dim, requires_grad=True)
    token = torch.randn(1, 1, dim, requires_grad=True)
    pos = torch.randn(1, 1 + length, dim, requires_grad=True)
    out = ops.decoder_unshuffle(x, masking.ids_restore, token, pos, reorder=reorder)
    want = ref.decoder_unshuffle_reference(x, masking.ids_restore, token, pos, reorder)
    assert torch.equal(out, want)
    grad = torch.randn_like(out)
    got, exp = _grads(out, (x, token, pos), grad), _grads(want, (x, token, pos), grad)
    assert torch.equal(got[0], exp[0])
    _assert_close_all(got[1:], exp[1:], atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_unshuffle_half_inputs(interpret):
    torch.manual_seed(5)
    masking = _masking(2, 24, 0.75)
    x = torch.randn(2, 7, 32).half().requires_grad_()
    x_bf = torch.randn(2, 7, 32).bfloat16().requires_grad_()
    token = torch.randn(1, 1, 32, requires_grad=True)
    pos = torch.randn(1, 25, 32)
    for xi in (x, x_bf):  # half x + fp32 token/pos -> fp32 out, as torch promotion does
        out = ops.decoder_unshuffle(xi, masking.ids_restore, token, pos)
        want = ref.decoder_unshuffle_reference(xi, masking.ids_restore, token, pos)
        assert out.dtype == want.dtype == torch.float32 and torch.equal(out, want)
        grad = torch.randn_like(out)
        got, exp = _grads(out, (xi, token), grad), _grads(want, (xi, token), grad)
        assert got[0].dtype == xi.dtype
        # the interpreter's fp32 -> bf16 store may be 1 ulp off round-to-nearest-even
        ulp = 2**-7 if xi.dtype == torch.bfloat16 else 0.0
        torch.testing.assert_close(got[0], exp[0], atol=0.0, rtol=ulp)
        torch.testing.assert_close(got[1], exp[1], atol=1e-5, rtol=1e-5)
    h = [t.detach().half() for t in (x, token, pos)]
    out = ops.decoder_unshuffle(h[0], masking.ids_restore, h[1], h[2])
    assert out.dtype == torch.float16
    assert torch.equal(out, ref.decoder_unshuffle_reference(h[0], masking.ids_restore, h[1], h[2]))


# ------------------------------------------------------------------------------------------------ loss


@needs_interpreter
@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("batch,chans,grid,patch,ratio", EMBED_CASES)
def test_loss_matches_reference(interpret, norm_pix, batch, chans, grid, patch, ratio):
    gh, gw = grid
    length = gh * gw
    torch.manual_seed(6)
    images = torch.randn(batch, chans, gh * patch, gw * patch)
    masking = _masking(batch, length, ratio)
    pred = torch.randn(batch, length, patch * patch * chans, requires_grad=True)
    loss = ops.masked_patch_loss(pred, images, masking.mask, patch, norm_pix)
    want = ref.masked_patch_loss_reference(pred, images, masking.mask, patch, norm_pix)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    (got,) = torch.autograd.grad(2.5 * loss, pred)
    (exp,) = torch.autograd.grad(2.5 * want, pred)
    torch.testing.assert_close(got, exp, atol=1e-7, rtol=1e-4)
    if ratio == 0.0:
        assert loss.item() == 0.0 and not got.any()


@needs_interpreter
def test_loss_uint8_half_pred_and_shuffled_rows(interpret):
    torch.manual_seed(7)
    raw = torch.randint(0, 256, (2, 3, 16, 24), dtype=torch.uint8)
    masking = _masking(2, 24, 0.75)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        pred = torch.randn(2, 24, 48).to(dtype).requires_grad_()
        loss = ops.masked_patch_loss(pred, raw, masking.mask, 4, mean=mean, std=std)
        want = ref.masked_patch_loss_reference(pred, raw, masking.mask, 4, True, 1e-6, None, mean, std)
        torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-5)
        (got,) = torch.autograd.grad(loss, pred)
        (exp,) = torch.autograd.grad(want, pred)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), exp.float(), atol=1e-5, rtol=tol)
    # shuffled order (decoder_unshuffle(reorder=False)): all rows, then only the removed rows
    pred = torch.randn(2, 24, 48, requires_grad=True)
    base = ref.masked_patch_loss_reference(pred.detach(), raw, masking.mask, 4)
    for first in (0, masking.num_keep):
        rows = ref.gather_tokens(pred, ref.inverse_permutation(masking.ids_restore))[:, first:]
        loss = ops.masked_patch_loss(rows, raw, masking.mask, 4, ids_restore=masking.ids_restore)
        want = ref.masked_patch_loss_reference(rows, raw, masking.mask, 4, True, 1e-6, masking.ids_restore)
        torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss, base, atol=1e-5, rtol=1e-5)
        (got,) = torch.autograd.grad(loss, pred, retain_graph=True)
        (exp,) = torch.autograd.grad(want, pred)
        torch.testing.assert_close(got, exp, atol=1e-7, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ model


@needs_interpreter
def test_mae_forward_backward_through_kernels(interpret, monkeypatch):
    """A tiny MaskedViT + MAEDecoder step gives the same loss and gradients with kernels and with the reference."""
    from maskray.models.decoder import MAEDecoder
    from maskray.models.vit import MaskedViT, MaskedViTCfg

    torch.manual_seed(8)
    enc = MaskedViT(MaskedViTCfg(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1))
    dec = MAEDecoder(enc.embed_dim, enc.grid_size, 8 * 8 * 3, dim=32, depth=1, num_heads=2)
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, enc.num_patches)

    def step():
        masking = ops.random_mask_indices(noise, num_visible(enc.num_patches, 0.75))
        latent = enc(images, ids_keep=masking.ids_keep).tokens
        pred = dec(latent, masking.ids_restore)
        loss = ops.masked_patch_loss(pred, images, masking.mask, 8)
        params = [p for p in (*enc.parameters(), *dec.parameters()) if p.requires_grad]
        return loss, torch.autograd.grad(loss, params)

    loss_k, grads_k = step()
    _use_reference(monkeypatch)
    loss_r, grads_r = step()
    torch.testing.assert_close(loss_k, loss_r, atol=1e-5, rtol=1e-5)
    _assert_close_all(grads_k, grads_r, atol=1e-5, rtol=1e-4)


@needs_interpreter
def test_smaller_view_through_kernels(interpret, monkeypatch):
    """An 8x8 view of a 16x16 model (resampled position embedding, ids_keep on the view's 2x2 grid): the fused
    embedding gives the reference's tokens and gradients, the learned position table included."""
    from maskray.models.vit import MaskedViT, MaskedViTCfg

    torch.manual_seed(9)
    enc = MaskedViT(MaskedViTCfg(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, pos_embed="learned"))
    images = torch.randn(2, 3, 8, 8)
    ids_keep = _masking(2, 4, 0.5).ids_keep

    def step():
        tokens = enc(images, ids_keep=ids_keep).tokens
        params = [p for p in enc.parameters() if p.requires_grad]
        return tokens, torch.autograd.grad(tokens.square().sum(), params)

    tokens_k, grads_k = step()
    _use_reference(monkeypatch)
    tokens_r, grads_r = step()
    assert tokens_k.shape == (2, 3, enc.embed_dim)
    torch.testing.assert_close(tokens_k, tokens_r, atol=1e-5, rtol=1e-5)
    _assert_close_all(grads_k, grads_r, atol=1e-4, rtol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mae_step_kernels_match_reference_in_dtype(interpret, monkeypatch, dtype):
    """The MAE ops of one step (masking, embedding, unshuffle, loss, backward) under autocast in ``dtype`` on the
    kernels' device: the kernels' loss and gradients match the reference's within that dtype's rounding."""
    from maskray.models.decoder import MAEDecoder
    from maskray.models.vit import MaskedViT, MaskedViTCfg

    torch.manual_seed(10)
    enc = MaskedViT(MaskedViTCfg(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1))
    dec = MAEDecoder(enc.embed_dim, enc.grid_size, 8 * 8 * 3, dim=32, depth=1, num_heads=2)
    images = torch.randn(3, 3, 32, 32, generator=_gen(10))
    noise = torch.rand(3, enc.num_patches, generator=_gen(11))
    params = [p for p in (*enc.parameters(), *dec.parameters()) if p.requires_grad]
    autocast = torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            masking = ops.random_mask_indices(noise, num_visible(enc.num_patches, 0.75))
            latent = enc(images, ids_keep=masking.ids_keep).tokens
            pred = dec(latent, masking.ids_restore)
            loss = ops.masked_patch_loss(pred, images, masking.mask, 8)
        return loss, torch.autograd.grad(loss, params)

    loss_k, grads_k = step()
    _use_reference(monkeypatch)
    loss_r, grads_r = step()
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss_k, loss_r, **tol)
    scale = max(g.abs().max().item() for g in grads_r)  # bf16: errors relative to the largest gradient
    for got, want in zip(grads_k, grads_r, strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=tol["atol"] * max(scale, 1.0), rtol=tol["rtol"])


# ------------------------------------------------------------------------------------------------ determinism


@needs_interpreter
def test_kernels_are_deterministic(interpret):
    torch.manual_seed(9)
    images = torch.randn(2, 3, 16, 24, requires_grad=True)
    weight, bias, pos, cls = _embed_params(32, 3, 4, 24)
    noise = torch.rand(2, 24)
    x = torch.randn(2, 7, 16, requires_grad=True)
    token = torch.randn(1, 1, 16, requires_grad=True)
    dpos = torch.randn(1, 25, 16, requires_grad=True)
    pred = torch.randn(2, 24, 48, requires_grad=True)

    def run():
        masking = tk.random_mask_indices(noise, 6)
        emb = tk.embed_visible_patches(images, masking.ids_keep, weight, bias, pos, cls)
        dec = tk.decoder_unshuffle(x, masking.ids_restore, token, dpos)
        loss = tk.masked_patch_loss(pred, images.detach(), masking.mask, 4)
        total = (emb * emb.detach().cos()).sum() + (dec * dec.detach().sin()).sum() + loss
        grads = torch.autograd.grad(total, (images, weight, bias, pos, cls, x, token, dpos, pred))
        return (masking.ids_keep, masking.ids_restore, masking.mask, emb, dec, loss, *grads)

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ guards


def test_cpu_tensors_use_reference_without_interpreter_flag(monkeypatch):
    """With the flags off, a CPU call must never reach a Triton launch (it would be a compiled launch)."""

    def boom(*args, **kwargs):
        raise AssertionError("a CPU tensor reached a Triton kernel")

    for name in ("random_mask_indices", "embed_visible_patches", "decoder_unshuffle", "masked_patch_loss"):
        monkeypatch.setattr(tk, name, boom)
    masking = _masking(2, 24, 0.75)
    images = torch.randn(2, 3, 16, 24)
    weight, bias, pos, cls = _embed_params(16, 3, 4, 24)
    x = torch.randn(2, 7, 16)

    def call_all():
        ops.random_mask_indices(torch.rand(2, 24), 6)
        ops.embed_visible_patches(images, masking.ids_keep, weight, bias, pos, cls)
        ops.decoder_unshuffle(x, masking.ids_restore, cls, pos)
        ops.masked_patch_loss(torch.randn(2, 24, 48), images, masking.mask, 4)

    monkeypatch.delenv("MASKRAY_TRITON_INTERPRET", raising=False)
    assert not ops.use_triton(images)
    call_all()
    # the test-only flag alone is not enough: without TRITON_INTERPRET the kernels would be compiled ones
    monkeypatch.setenv("MASKRAY_TRITON_INTERPRET", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not ops.use_triton(images)
    call_all()
    # both flags, but the kernels were decorated without the interpreter: fall back, with a warning
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(tk, "INTERPRET", False)
    with pytest.warns(UserWarning, match="without TRITON_INTERPRET"):
        assert not ops.use_triton(images)
    with pytest.warns(UserWarning):
        call_all()
    # mixed devices never dispatch to Triton
    monkeypatch.setattr(tk, "INTERPRET", True)
    assert ops.use_triton(images) and not ops.use_triton(images, torch.empty(1, device="meta"))


def test_autotune_attached_only_with_cuda(monkeypatch):
    import triton

    from maskray.masking.triton import embed

    expected = (not tk.INTERPRET) and torch.cuda.is_available()
    assert _common.is_autotuned(embed._embed_fwd_kernel) == expected
    configs = [triton.Config({"BLOCK": 16})]

    def fresh_kernel():
        def kernel(x_ptr, BLOCK: triton.language.constexpr):
            pass

        return triton.jit(kernel)

    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _common.is_autotuned(_common.autotune_if_cuda(configs, key=[])(fresh_kernel()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not _common.is_autotuned(_common.autotune_if_cuda(configs, key=[])(fresh_kernel()))
    monkeypatch.setattr(_common, "INTERPRET", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not _common.is_autotuned(_common.autotune_if_cuda(configs, key=[])(fresh_kernel()))


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """No GPU here, but Triton can still lower every kernel to a cubin for sm_90 (front end, LLVM, ptxas)."""
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton wheel ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MASKRAY_TRITON_INTERPRET")}
    proc = subprocess.run(
        [sys.executable, "-m", "maskray.masking.triton.compile_check", "--arch", "90"],
        env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all masking kernels compiled" in proc.stdout


def test_compiled_reference_where_a_kernel_lost(monkeypatch):
    """An op listed for a GPU (``ops.COMPILED_REFERENCE``) or in ``MASKRAY_MASKING_COMPILED`` runs ``torch.compile``
    of its reference there; CPU tensors never do."""

    class OnCuda:  # what prefers_compiled_reference reads of a tensor
        device = torch.device("cuda", 0)

    monkeypatch.delenv(ops.COMPILED_ENV, raising=False)
    monkeypatch.setattr(ops, "_device_name", lambda index: "NVIDIA H100 80GB HBM3")
    assert not ops.prefers_compiled_reference("masked_patch_loss", OnCuda())
    monkeypatch.setattr(ops, "COMPILED_REFERENCE", {"H100": frozenset({"masked_patch_loss"})})
    assert ops.prefers_compiled_reference("masked_patch_loss", OnCuda())
    assert not ops.prefers_compiled_reference("decoder_unshuffle", OnCuda())
    assert not ops.prefers_compiled_reference("masked_patch_loss", torch.empty(1))
    monkeypatch.setenv(ops.COMPILED_ENV, "none")  # the env overrides the table (the GPU suite measures kernels)
    assert not ops.prefers_compiled_reference("masked_patch_loss", OnCuda())
    monkeypatch.setenv(ops.COMPILED_ENV, "decoder_unshuffle, masked_patch_loss")
    assert ops.prefers_compiled_reference("decoder_unshuffle", OnCuda())
    # the dispatch: the compiled reference, compiled once per op
    compiled = []
    monkeypatch.setattr(ops, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", lambda fn: compiled.append(fn) or fn)
    monkeypatch.setattr(ops, "prefers_compiled_reference", lambda op, tensor: op == "masked_patch_loss")
    masking = _masking(2, 24, 0.75)
    images, pred = torch.randn(2, 3, 16, 24), torch.randn(2, 24, 48)
    for _ in range(2):
        loss = ops.masked_patch_loss(pred, images, masking.mask, 4)
    assert compiled == [ref.masked_patch_loss_reference]
    torch.testing.assert_close(loss, ref.masked_patch_loss_reference(pred, images, masking.mask, 4))
