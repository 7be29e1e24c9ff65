"""Train a StyleGAN2-ADA (or DCGAN baseline) network: NVIDIA's options, plus LeCam, augmentation whitelist, Freeze-D.

The options and the training itself live in taxogan_ext.training (train_hier.py trains its stages with the same code).
"""

import click
from click.core import ParameterSource

from stylegan2ada import cli
from taxogan_ext import training


@click.command(cls=cli.Command, context_settings=dict(max_content_width=120))
@training.click_options()
def main(**kwargs):
    """Train a StyleGAN2-ADA network (or the DCGAN baseline) on one dataset.

    \b
    Examples:
    # 256 px on one GPU with ADA and LeCam:
    python train.py --outdir runs --data datasets/Calanoida.zip --gpus 1 --lecam-weight 0.0001
    # Fine-tune from a pickle with a leak-free augmentation whitelist and Freeze-D:
    python train.py --outdir runs --data datasets/Harpacticoida.zip --resume copepoda.pkl --aug-allow leakfree-geom --freezed 10
    # Continue a killed run (its settings come from the snapshot; --kimg, --snap, --tick, --metrics may be changed):
    python train.py --run-dir runs/00003-Calanoida-auto-... --data datasets/Calanoida.zip
    """
    ctx = click.get_current_context()
    given = {name for name in kwargs if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    final = training.run_training(training.TrainingOptions(**kwargs), given=given)
    if final is not None:
        click.echo(f'Final snapshot: {final}')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
