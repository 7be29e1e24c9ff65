"""Build per-taxon training sets from a taxonomic image collection, and show what was built.

Examples:
    python dataset_tool_ext.py build --source bold_copepoda.tsv --dest datasets --ranks class,order
    python dataset_tool_ext.py build --source photos/ --dest datasets --min-size 0 --dry-run
    python dataset_tool_ext.py info datasets
    python dataset_tool_ext.py synthesize --plan runs/demo --method descending --num 200 --outdir synthetic --format datasets,tree
"""

import dataclasses
import types

import click

from stylegan2ada import cli
from taxogan_ext import collection, taxonomy

# The build's defaults are declared once, in collection.BuildOptions; the options below show them.
DEFAULTS = types.MappingProxyType({field.name: field.default for field in dataclasses.fields(collection.BuildOptions)})

#----------------------------------------------------------------------------

class LazyGroup(cli.Group):
    """The tool's commands, `synthesize` made only when it is asked for."""

    # synthesize needs torch and the networks (about 1 s of imports); build and info need neither.
    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), 'synthesize'])

    def get_command(self, ctx, cmd_name):
        if cmd_name == 'synthesize':
            return synthesize_command()
        return super().get_command(ctx, cmd_name)

@click.group(cls=LazyGroup)
def cmdline():
    """Taxonomic image collections -> per-taxon dataset zips + manifest.json."""

#----------------------------------------------------------------------------

@cmdline.command()

# Main options.
@click.option('--source',             help='Folder tree, BOLD-style TSV/CSV or EcoTaxa TSV', metavar='PATH', type=str, required=True)
@click.option('--dest',               help='Output folder for <Taxon>.zip and manifest.json', metavar='DIR', type=str, required=True)
@click.option('--ranks',              help='Ranks to build a dataset for, top first', metavar='LIST', type=str, default=DEFAULTS['ranks'], show_default=True)
@click.option('--resolution',         help='Output side in pixels (power of two)', metavar='INT', type=click.IntRange(min=4), default=DEFAULTS['resolution'], show_default=True)

# Source-related.
@click.option('--format', 'fmt',      help='Source format', type=click.Choice(['auto', 'tree', 'bold', 'ecotaxa']), default=DEFAULTS['fmt'], show_default=True)
@click.option('--rank-cols',          help='BOLD taxonomy columns, top first', metavar='LIST', type=str, default=','.join(DEFAULTS['rank_cols']), show_default=True)
@click.option('--path-col',           help='Column with the image path or URL  [default: detect]', metavar='NAME', type=str, default=None)
@click.option('--id-col',             help='Column with the id matched by --exclude  [default: processid, sampleid, object_id]', metavar='NAME', type=str, default=None)
@click.option('--tree-ranks',         help='Ranks of the folder / EcoTaxa hierarchy levels, from --root down  [default: --ranks]', metavar='LIST', type=str, default=None)
@click.option('--root',               help='Taxon at the first tree rank  [default: top folders; EcoTaxa: deepest shared taxon]', metavar='NAME', type=str, default=None)

# Filters.
@click.option('--min-size',           help='Drop images with a side below this (pixels; 0 keeps all)', metavar='INT', type=click.IntRange(min=0), default=DEFAULTS['min_size'], show_default=True)
@click.option('--exclude',            help='File of ids, paths or URLs to leave out, one a line', metavar='FILE', type=str, default=None)
@click.option('--near-dup-threshold', help='Max dHash Hamming distance (of 64 bits) of a near duplicate; -1: off', metavar='INT', type=click.IntRange(min=-1, max=64), default=DEFAULTS['near_dup_threshold'], show_default=True)
@click.option('--max-per-taxon',      help='Images kept per taxon at its deepest rank  [default: all]', metavar='INT', type=click.IntRange(min=1), default=None)

# Transforms.
@click.option('--square',             help='How to make images square', type=click.Choice(list(collection.SQUARE_MODES)), default=DEFAULTS['square'], show_default=True)
@click.option('--channels',           help='Output channels (auto: 1 only if every image is grayscale)', type=click.Choice(['1', '3', 'auto']), default=DEFAULTS['channels'], show_default=True)

# Performance-related.
@click.option('--workers',            help='Processes  [default: all cores]', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--download-threads',   help='Concurrent downloads', metavar='INT', type=click.IntRange(min=1), default=DEFAULTS['download_threads'], show_default=True)

# I/O-related.
@click.option('--cache',              help='Download cache  [default: DEST/.download-cache]', metavar='DIR', type=str, default=None)
@click.option('--timeout',            help='HTTP connect/read timeout (seconds)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=DEFAULTS['timeout'], show_default=True)
@click.option('--retries',            help='HTTP retries after the first try', metavar='INT', type=click.IntRange(min=0), default=DEFAULTS['retries'], show_default=True)
@click.option('--compress-level',     help='PNG compression level', metavar='INT', type=click.IntRange(min=0, max=9), default=DEFAULTS['compress_level'], show_default=True)
@click.option('--jpeg-draft/--no-jpeg-draft', help='Decode large JPEGs at 1/2, 1/4 or 1/8 size (DCT scaling) when the output is at most that', default=DEFAULTS['jpeg_draft'], show_default=True)
@click.option('--dry-run',            help='Print what would be built; read no images, write nothing', is_flag=True)

def build(**kwargs):
    """Build DEST/<Taxon>.zip for every taxon at --ranks, and DEST/manifest.json."""
    collection.build_datasets(collection.BuildOptions(**kwargs), log=click.echo)

#----------------------------------------------------------------------------

@cmdline.command()
@click.argument('datasets', metavar='DIR', type=str)
@click.option('--verify', help='Recompute each zip\'s SHA-256 and compare it with the manifest', is_flag=True)
def info(datasets, verify):
    """Print the taxonomy tree and image counts of a datasets folder."""
    manifest = taxonomy.load_manifest(datasets)
    click.echo(f'{manifest.root}: {len(manifest.taxa)} datasets, ranks {",".join(manifest.ranks)}, '
               f'{manifest.resolution}x{manifest.resolution}, {manifest.channels} channel(s)')
    click.echo(manifest.format_tree())
    click.echo(collection.format_dropped(manifest.dropped_counts))
    if verify:
        bad = [name for name in manifest.taxa if manifest.verify(name) != 'ok']
        for name in bad:
            click.echo(f'{manifest.dataset_path(name)}: {manifest.verify(name)}')
        if bad:
            raise click.ClickException(f'{len(bad)} of {len(manifest.taxa)} datasets do not match {taxonomy.MANIFEST_NAME}')
        click.echo(f'all {len(manifest.taxa)} datasets match their SHA-256')

#----------------------------------------------------------------------------

def synthesize_command() -> click.Command:
    """The synthesize command (imports torch and the networks)."""
    from taxogan_ext import synthesize as synthesis  # pylint: disable=import-outside-toplevel  (see LazyGroup)
    syn_defaults = types.MappingProxyType({field.name: field.default for field in dataclasses.fields(synthesis.SynthesisOptions)})

    @click.command(cls=cli.Command)

    # Generators.
    @click.option('--plan',               help='train_hier.py experiment folder whose networks to use (with --method)', metavar='DIR', type=str, default=None)
    @click.option('--method',             help='Plan method whose network answers each target (direct, lateral, descending, conditional, ...)', metavar='NAME', type=str, default=None)
    @click.option('--generator', 'generators', help='A network per taxon instead of a plan (repeat); @CLASS: class index or name of a conditional one', metavar='TAXON=PKL[@CLASS]', type=str, multiple=True)
    @click.option('--taxa',               help='Taxa to export  [default: every target of the plan / every --generator]', metavar='LIST', type=str, default=None)
    @click.option('--datasets',           help='Datasets folder of the taxa (taxonomy, real images)  [default: the plan\'s]', metavar='DIR', type=str, default=None)

    # How many.
    @click.option('--num',                help='Synthetic images per taxon', metavar='INT', type=click.IntRange(min=1), default=None)
    @click.option('--top-up',             help='Instead of --num: each taxon up to this many images, its real ones included', metavar='INT', type=click.IntRange(min=1), default=None)

    # Sampling.
    @click.option('--trunc',              help='Truncation psi', metavar='FLOAT', type=click.FloatRange(min=-2, max=2), default=syn_defaults['trunc'], show_default=True)
    @click.option('--noise-mode',         help='Noise mode', type=click.Choice(list(synthesis.NOISE_MODES)), default=syn_defaults['noise_mode'], show_default=True)
    @click.option('--seed',               help='Base seed (each taxon\'s seeds derive from it and the taxon name)', metavar='INT', type=click.IntRange(min=0), default=syn_defaults['seed'], show_default=True)

    # Filter.
    @click.option('--filter', 'filter',   help='Keep only images the taxon classifier assigns to their taxon', metavar='taxon:PATH', type=str, default=None)
    @click.option('--filter-threshold',   help='Minimum classifier probability of the image\'s taxon', metavar='P', type=click.FloatRange(min=0, max=1), default=syn_defaults['filter_threshold'], show_default=True)
    @click.option('--max-tries-factor',   help='Generate at most this many times the images wanted per taxon', metavar='FLOAT', type=click.FloatRange(min=1), default=syn_defaults['max_tries_factor'], show_default=True)

    # Output.
    @click.option('--outdir',             help='Export folder: one subfolder per format and synthesis.json', metavar='DIR', type=str, required=True)
    @click.option('--format', 'formats',  help=f'Comma list of {", ".join(synthesis.FORMATS)}', metavar='LIST', type=str, default=syn_defaults['formats'], show_default=True)
    @click.option('--with-real',          help='Also write the taxa\'s real images (marked real)', is_flag=True)
    @click.option('--compress-level',     help='PNG compression level', metavar='INT', type=click.IntRange(min=0, max=9), default=syn_defaults['compress_level'], show_default=True)
    @click.option('--device',             help='Device to run on', type=click.Choice(['auto', 'cpu', 'cuda']), default='cpu', show_default=True)
    @click.option('--quiet',              help='No progress bar', is_flag=True)

    def synthesize(quiet, **kwargs):
        """Export generated images per taxon as a datasets folder, a folder tree or an EcoTaxa table, with provenance.

        \b
        Examples:
        python dataset_tool_ext.py synthesize --plan runs/demo --method descending --num 200 --outdir synthetic
        python dataset_tool_ext.py synthesize --generator Calanoida=cal.pkl --datasets datasets --top-up 500 \\
            --with-real --format datasets,ecotaxa --filter taxon:taxon.pt --filter-threshold 0.8 --outdir synthetic
        """
        kwargs['generators'] = tuple(kwargs['generators'])
        synthesis.synthesize(synthesis.SynthesisOptions(**kwargs), log=click.echo, progress=not quiet)

    return synthesize

#----------------------------------------------------------------------------

if __name__ == '__main__':
    cmdline()

#----------------------------------------------------------------------------
