"""Models: the causal 3D VAE, the WALT transformer and their named sizes."""
from walt.models.autoencoder import AutoencoderConfig, CausalVAE
from walt.models.presets import AUTOENCODER_PRESETS, TRANSFORMER_PRESETS
from walt.models.transformer import WALT, TransformerConfig, count_parameters

__all__ = ["AUTOENCODER_PRESETS", "AutoencoderConfig", "CausalVAE", "TRANSFORMER_PRESETS", "TransformerConfig", "WALT", "count_parameters"]
