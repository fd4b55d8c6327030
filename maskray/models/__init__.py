"""Models: the maskable timm ViT / Beit encoder, the MAE decoder, released weights, and ZeRO-3 registration."""

from maskray.models.decoder import MAEDecoder
from maskray.models.heads import GlobalBatchNorm1d, MLPHead
from maskray.models.pos_embed import sincos_2d
from maskray.models.pretrained import InitFrom, load_pretrained
from maskray.models.vit import (
    EncoderOutput,
    MaskedViT,
    MaskedViTCfg,
    attention_probs,
    is_beit_arch,
    set_fused_attention,
)
from maskray.models.zero import register_external_parameters

__all__ = [
    "EncoderOutput",
    "GlobalBatchNorm1d",
    "InitFrom",
    "MAEDecoder",
    "MLPHead",
    "MaskedViT",
    "MaskedViTCfg",
    "attention_probs",
    "build_encoder",
    "build_initial_encoder",
    "is_beit_arch",
    "load_pretrained",
    "register_external_parameters",
    "set_fused_attention",
    "sincos_2d",
]


def build_encoder(model_config: MaskedViTCfg) -> MaskedViT:
    """The encoder of a run's ``model`` section (:class:`maskray.config.ModelConfig`, a :class:`MaskedViTCfg`)."""
    return MaskedViT(model_config)


def build_initial_encoder(model_config) -> MaskedViT:
    """The encoder training starts from: :func:`build_encoder` (seed first for the same random weights), then the
    weights of ``model.init_from`` when it is set (:func:`load_pretrained`)."""
    encoder = build_encoder(model_config)
    if model_config.init_from:
        load_pretrained(encoder, model_config.init_from)
    return encoder
