"""The causal VAE: causality in time, image == 1-frame video, shapes, losses."""
import pytest
import torch

from walt.models import AUTOENCODER_PRESETS, AutoencoderConfig, CausalVAE
from walt.models.autoencoder import PatchDiscriminator3D, kl_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _vae(**over):
    torch.manual_seed(0)
    return CausalVAE(AutoencoderConfig(**{**AUTOENCODER_PRESETS["cpu"], **over})).eval()


def _perturb_latents_after(vae, k, f_t):
    """Latents of a clip and of the same clip with every frame after k replaced."""
    x = torch.rand(1, 17, 3, 16, 16) * 2 - 1
    y = x.clone()
    y[:, k + 1 :] = torch.rand_like(y[:, k + 1 :]) * 2 - 1
    with torch.no_grad():
        return vae.encode(x), vae.encode(y)


@pytest.mark.parametrize("f_t", [1, 2, 4])
def test_encoder_is_causal(f_t):
    vae = _vae(temporal_factor=f_t)
    for k in (0, 4, 9):
        zx, zy = _perturb_latents_after(vae, k, f_t)
        assert zx.shape[1] == 1 + 16 // f_t
        last_unaffected = k // f_t  # latent j sees input frames <= f_t * j
        torch.testing.assert_close(zx[:, : last_unaffected + 1], zy[:, : last_unaffected + 1], rtol=0, atol=0)
        assert (zx[:, last_unaffected + 1 :] - zy[:, last_unaffected + 1 :]).abs().amax() > 1e-4


def test_decoder_is_causal():
    vae = _vae()
    z = torch.randn(1, 5, 4, 4, 8)
    z2 = z.clone()
    z2[:, 3:] = torch.randn_like(z2[:, 3:])
    with torch.no_grad():
        a, b = vae.decode(z), vae.decode(z2)
    assert a.shape == (1, 17, 3, 16, 16)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)  # frames 0..8 come from latents 0..2
    assert (a[:, 9:] - b[:, 9:]).abs().amax() > 1e-4


def test_image_is_a_one_frame_video_and_the_first_latent():
    vae = _vae()
    video = torch.rand(2, 17, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z_img = vae.encode(video[:, 0])
        z_one = vae.encode(video[:, :1])
        z_clip = vae.encode(video)
    assert z_img.shape == (2, 1, 4, 4, 8)
    torch.testing.assert_close(z_img, z_one, rtol=0, atol=0)
    torch.testing.assert_close(z_clip[:, :1], z_img, rtol=1e-5, atol=1e-5)  # first frame encoded on its own
    with torch.no_grad():
        assert vae.decode(z_img).shape == (2, 1, 3, 16, 16)


def test_paper_compression_17x128x128_to_5x16x16x8():
    with torch.device("meta"):
        vae = CausalVAE(AutoencoderConfig(**AUTOENCODER_PRESETS["paper"]))
        z = vae.encode(torch.empty(1, 17, 3, 128, 128))
        assert z.shape == (1, 5, 16, 16, 8)
        assert vae.decode(z).shape == (1, 17, 3, 128, 128)


def test_latent_normalization_round_trip():
    vae = _vae()
    vae.set_latent_stats("video", torch.arange(8.0), torch.full((8,), 2.0))
    vae.set_latent_stats("image", torch.ones(8), torch.full((8,), 4.0))
    x = torch.rand(1, 5, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        raw = vae.encode(x)
        for mode, mean, std in (("video", torch.arange(8.0), 2.0), ("image", torch.ones(8), 4.0)):
            norm = vae.encode(x, mode=mode)
            torch.testing.assert_close(norm, (raw - mean) / std)
            torch.testing.assert_close(vae.decode(norm, mode=mode), vae.decode(raw))
    assert vae.state_dict()["latent_mean"].shape == (2, 8)  # one row per mode
    with pytest.raises(ValueError, match="mode must be one of"):
        vae.encode(x, mode="clip")


def test_bad_input_is_one_clear_sentence():
    vae = _vae()
    with pytest.raises(ValueError, match="1 \\+ a multiple of 4"):
        vae.encode(torch.zeros(1, 16, 3, 16, 16))
    with pytest.raises(ValueError, match="multiple of 4 pixels"):
        vae.encode(torch.zeros(1, 5, 3, 18, 16))
    with pytest.raises(ValueError, match="video \\(B, T, 3, H, W\\)"):
        vae.encode(torch.zeros(1, 5, 16, 16, 3))


def test_losses_and_discriminator_shapes():
    vae = _vae()
    x = torch.rand(2, 5, 3, 16, 16) * 2 - 1
    recon, mean, logvar = vae(x)
    assert recon.shape == x.shape
    assert kl_loss(torch.zeros(3), torch.zeros(3)).item() == 0.0
    assert kl_loss(torch.ones(3), torch.zeros(3)).item() == pytest.approx(0.5)
    logits = PatchDiscriminator3D(8)(recon)
    assert logits.shape[:2] == (2, 1) and logits.shape[2] == 5
