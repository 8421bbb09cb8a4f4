"""walt-train: train the causal VAE (stage `autoencoder`) or WALT (stage `diffusion`).

    walt-train autoencoder --out runs/ae
    walt-train diffusion --mode video --autoencoder runs/ae --out runs/vwalt
    walt-train diffusion --mode image --autoencoder runs/ae --out runs/iwalt
    walt-train --preset L --dry-run            # resolved config and parameter counts
    torchrun --nproc_per_node 2 -m walt.cli.train diffusion ...   # DDP (gloo on CPU)

Settings layer as: defaults <- --preset <- --config YAML files <- --set key.sub=value <- options.

Exit status: 0 done (or stopped by --stop-after), 1 an error (one sentence), 2 a bad command line
or config, or a non-finite loss, 3 interrupted by SIGTERM/SIGUSR1 after writing a checkpoint:
rerun the same command with --resume.
"""
import errno
import logging
import os
import sys

import click
import torch

from walt.config import ConfigError, resolve, to_yaml


# Errors of a full disk or a read-only file system, whichever file they hit.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EFBIG, errno.EDQUOT}


def _count(cfg):
    from walt.models import WALT, CausalVAE, count_parameters

    with torch.device("meta"):
        return count_parameters(WALT(cfg.model)), count_parameters(CausalVAE(cfg.autoencoder))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("stage", required=False, type=click.Choice(["autoencoder", "diffusion"]))
@click.option("--preset", help="cpu, S, B, L, XL or G (default: cpu, or the config file's).")
@click.option("--config", "configs", multiple=True, type=click.Path(dir_okay=False), help="YAML file(s), applied in order.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one setting, e.g. train.lr=3e-4.")
@click.option("--mode", type=click.Choice(["video", "image"]), help="Diffusion stage: V-WALT (video) or I-WALT (image).")
@click.option("--out", "out_dir", help="Output directory (checkpoints, metrics, samples, weights).")
@click.option("--autoencoder", "autoencoder_run", help="Diffusion stage: the output directory of the autoencoder run.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint, bit-exactly.")
@click.option("--stop-after", type=click.IntRange(min=1), help="Stop (with a checkpoint) after this many steps of this invocation.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and parameter counts, then exit.")
def main(stage, preset, configs, sets, mode, out_dir, autoencoder_run, resume, stop_after, dry_run):
    """Train the causal VAE (STAGE autoencoder) or WALT (STAGE diffusion, the default).

    \b
    walt-train autoencoder --out runs/ae
    walt-train diffusion --mode video --autoencoder runs/ae --out runs/vwalt
    walt-train diffusion --mode image --autoencoder runs/ae --out runs/iwalt
    walt-train --preset L --dry-run

    Settings layer as defaults <- --preset <- --config files <- --set <- options. Runs write
    config.yaml, metrics.jsonl, checkpoint.pt and, when done, model/ema.safetensors to --out.
    SIGTERM or SIGUSR1 write a checkpoint and exit with status 3; continue with --resume.
    """
    extra = {}
    if stage:
        extra["stage"] = stage
    if mode:
        extra["model"] = {"mode": mode}
    if out_dir:
        extra["out_dir"] = out_dir
    if autoencoder_run:
        extra["autoencoder_run"] = autoencoder_run
    try:
        cfg = resolve(preset, configs, sets, extra)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    if dry_run:
        if cfg.stage == "diffusion" and cfg.autoencoder_run and os.path.isdir(cfg.autoencoder_run):
            import dataclasses

            from walt.runs import autoencoder_config

            cfg = dataclasses.replace(cfg, autoencoder=autoencoder_config(cfg.autoencoder_run))
        n_walt, n_vae = _count(cfg)
        click.echo(to_yaml(cfg), nl=False)
        click.echo(f"# preset {cfg.preset}: WALT ({cfg.model.mode}) {n_walt:,} parameters ({n_walt / 1e6:.1f}M); "
                   f"autoencoder {n_vae:,} parameters ({n_vae / 1e6:.1f}M)")
        return
    from walt.train.checkpoint import WriteError
    from walt.train.loop import EXIT_INTERRUPTED, Interrupted, NonFiniteLoss, train

    if cfg.stage == "autoencoder":
        from walt.train.autoencoder import make_task
    else:
        from walt.train.diffusion import make_task
    try:
        out = train(cfg, make_task, resume=resume, stop_after=stop_after)
    except NonFiniteLoss as e:
        logging.getLogger("walt.train").error("%s", e)
        sys.exit(2)
    except Interrupted as e:
        if os.environ.get("RANK", "0") == "0":
            click.echo(f"walt-train: {e}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # a full or read-only disk: one sentence, and how to continue
        if not isinstance(e, WriteError) and e.errno not in _WRITE_ERRNOS:
            raise
        what = str(e) if isinstance(e, WriteError) else f"cannot write to {cfg.out_dir}: {e.strerror}"
        again = "with --resume" if os.path.exists(os.path.join(cfg.out_dir, "checkpoint.pt")) else "without --resume"
        raise click.ClickException(f"{what}; files written before are kept: free space (or fix the file system) and "
                                   f"rerun {again}") from None
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"done: {out}")


if __name__ == "__main__":
    main()
