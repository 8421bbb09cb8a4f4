"""Training-step throughput: the same WALT on walt's fused ops vs the pure-PyTorch path.

One step = noising + self-conditioning pass + forward + backward + walt-train's AdamW on random latents of
the preset's grid (the autoencoder is left out: it is the same on both paths). The fused path
uses walt.ops.window_attention and walt.ops.add_noise; the torch path partitions windows
for scaled_dot_product_attention and draws noise with torch.randn. Both run in this process,
interleaved, with identical weights; the result is tokens/s of each and their ratio.

    python bench/train_step.py [--preset cpu] [--batch 8] [--device cpu]
"""
import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compare, environment, print_table, write_json  # noqa: E402

from walt.config import TrainConfig  # noqa: E402
from walt.diffusion import Diffusion, DiffusionConfig  # noqa: E402
from walt.models import TRANSFORMER_PRESETS, WALT, TransformerConfig, count_parameters  # noqa: E402
from walt.train.loop import make_optimizer  # noqa: E402


def make_step(model, attention, noise, x0):
    """A closure running one training step of `model` with the given attention and noise backends."""
    model.cfg = dataclasses.replace(model.cfg, attention_backend=attention)
    diffusion = Diffusion(DiffusionConfig(noise_backend=noise))
    opt = make_optimizer(model, TrainConfig())  # walt-train's optimizer
    keys = torch.arange(x0.shape[0])
    state = {"step": 0}

    def step():
        loss = diffusion.loss(model, x0, seed=state["step"], keys=keys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["step"] += 1

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", choices=sorted(TRANSFORMER_PRESETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # Alternating rounds, best median of each path: on a shared 2-core VM single runs jump.
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "train_step.json"))
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = TransformerConfig(**TRANSFORMER_PRESETS[args.preset])
    model = WALT(cfg).to(args.device)
    T, H, W = cfg.input_size
    x0 = torch.randn(args.batch, T, H, W, cfg.latent_channels, device=args.device)
    tokens = args.batch * T * (H // cfg.patch_size) * (W // cfg.patch_size)
    print(f"preset {args.preset}: {count_parameters(model) / 1e6:.2f}M parameters, batch {args.batch} x {T}x{H}x{W} "
          f"latents = {tokens} tokens/step on {args.device}")

    unfused = make_step(model, "torch", "torch", x0)
    fused_model = WALT(cfg).to(args.device)  # same weights, its own optimizer
    fused_model.load_state_dict(model.state_dict())
    fused = make_step(fused_model, "fused", "fused", x0)
    tf, tr = compare(fused, unfused, args.device, warmup=2, repeat=args.repeat, rounds=args.rounds)
    rows = [{"path": "fused (walt.ops)", "ms/step": tf * 1e3, "tokens/s": tokens / tf},
            {"path": "torch (partition + SDPA, torch.randn)", "ms/step": tr * 1e3, "tokens/s": tokens / tr}]
    payload = {"env": environment(args.device), "preset": args.preset, "batch": args.batch, "tokens_per_step": tokens,
               "fused_s": tf, "torch_s": tr, "speedup": tr / tf}
    print_table(rows, ["path", "ms/step", "tokens/s"])
    print(f"fused / torch throughput: {payload['speedup']:.2f}x")
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
