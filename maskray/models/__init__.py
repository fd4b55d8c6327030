"""Models: the maskable timm ViT / Beit encoder, the MAE decoder, released weights, and ZeRO-3 registration."""

from maskray.models.decoder import MAEDecoder
from maskray.models.heads import GlobalBatchNorm1d, MLPHead
from maskray.models.pos_embed import sincos_2d
from maskray.models.pretrained import InitFrom, load_pretrained
from maskray.models.vit import EncoderOutput, MaskedViT, attention_probs, is_beit_arch, set_fused_attention
from maskray.models.zero import register_external_parameters

__all__ = [
    "EncoderOutput",
    "GlobalBatchNorm1d",
    "InitFrom",
    "MAEDecoder",
    "MLPHead",
    "MaskedViT",
    "attention_probs",
    "build_encoder",
    "build_initial_encoder",
    "is_beit_arch",
    "load_pretrained",
    "register_external_parameters",
    "set_fused_attention",
    "sincos_2d",
]


def build_encoder(model_config) -> MaskedViT:
    """Build the encoder described by a :class:`maskray.config.ModelConfig`."""
    return MaskedViT(
        arch=model_config.arch,
        img_size=model_config.img_size,
        patch_size=model_config.patch_size,
        in_chans=model_config.in_chans,
        depth=model_config.depth,
        pos_embed=model_config.pos_embed,
        drop_path_rate=model_config.drop_path_rate,
        layer_scale=model_config.layer_scale,
        rel_pos_bias=model_config.rel_pos_bias,
    )


def build_initial_encoder(model_config) -> MaskedViT:
    """The encoder training starts from: :func:`build_encoder` (seed first for the same random weights), then the
    weights of ``model.init_from`` when it is set (:func:`load_pretrained`)."""
    encoder = build_encoder(model_config)
    if model_config.init_from:
        load_pretrained(encoder, model_config.init_from)
    return encoder
