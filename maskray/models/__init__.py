"""Models: the maskable timm ViT encoder and the MAE decoder."""

from maskray.models.decoder import MAEDecoder
from maskray.models.pos_embed import sincos_2d
from maskray.models.vit import EncoderOutput, MaskedViT, attention_probs

__all__ = ["EncoderOutput", "MAEDecoder", "MaskedViT", "attention_probs", "build_encoder", "sincos_2d"]


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
    )
