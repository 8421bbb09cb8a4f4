"""How each mode sees a clip (walt.data.modes.latents_for): the one definition, pinned."""
import pytest
import torch

from conftest import TINY_AE
from walt.data.modes import frame_index, latent_frames, latents_for
from walt.models import CausalVAE
from walt.models.autoencoder import AutoencoderConfig


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    vae = CausalVAE(AutoencoderConfig(**TINY_AE)).eval()
    vae.set_latent_stats("video", torch.linspace(-1, 1, 8), torch.full((8,), 0.5))
    vae.set_latent_stats("image", torch.linspace(1, -1, 8), torch.full((8,), 2.0))
    return vae


def test_frame_alignment():
    assert latent_frames("video", 17, 4) == 5 and latent_frames("image", 17, 4) == 17
    assert frame_index("video", 17, 4).tolist() == [0, 4, 8, 12, 16]
    assert frame_index("image", 5, 4).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="mode must be one of"):
        frame_index("clip", 17, 4)


@torch.no_grad()
def test_video_mode_is_the_causal_encoding_with_video_statistics(vae):
    video = torch.rand(2, 9, 3, 16, 16) * 2 - 1
    z = latents_for("video", vae, video)
    assert z.shape == (2, 3, 4, 4, 8)
    torch.testing.assert_close(z, vae.encode(video, mode="video"), rtol=0, atol=0)
    changed = video.clone()
    changed[:, 6] = 0  # input frame 6 lies in latent frame 2 (frames 5..8)
    dz = (latents_for("video", vae, changed) - z).abs().amax(dim=(0, 2, 3, 4))
    assert dz[:2].max() == 0 and dz[2] > 1e-4  # causal: earlier latent frames do not move


@torch.no_grad()
def test_image_mode_encodes_every_frame_alone_with_image_statistics(vae):
    video = torch.rand(2, 5, 3, 16, 16) * 2 - 1
    z = latents_for("image", vae, video)
    assert z.shape == (2, 5, 4, 4, 8)
    for j in range(5):
        torch.testing.assert_close(z[:, j : j + 1], vae.encode(video[:, j : j + 1], mode="image"), rtol=1e-5, atol=1e-5)
    for j in (0, 2, 4):  # changing frame j changes latent frame j only
        changed = video.clone()
        changed[:, j] = -video[:, j]
        dz = (latents_for("image", vae, changed) - z).abs().amax(dim=(0, 2, 3, 4))
        assert dz[j] > 1e-4
        assert torch.cat([dz[:j], dz[j + 1 :]]).max() == 0


def test_the_modes_use_their_own_statistics(vae):
    frame = torch.rand(1, 1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        raw = vae.encode(frame)
        torch.testing.assert_close(latents_for("video", vae, frame), (raw - vae.latent_mean[0]) / vae.latent_std[0])
        torch.testing.assert_close(latents_for("image", vae, frame), (raw - vae.latent_mean[1]) / vae.latent_std[1])
