"""Synthetic specimen datasets: a trained plan's generators (or given pickles) -> labelled images with provenance.

`synthesize(SynthesisOptions(...))` runs as: checked_options -> resolve_targets (one generator per taxon: the plan
method's networks as hierarchy.row_generators picks them, or --generator TAXON=PKL[@CLASS]) -> check_outdir ->
make_candidates per taxon (blocks of BLOCK images, each a fixed list of seeds; optionally scored by the taxon
classifier) -> the formats (datasets folder, folder tree, EcoTaxa table) -> OUTDIR/synthesis.json.

Resuming: each block's PNGs and its record (seeds, SHA-256, classifier probabilities) are staged under
OUTDIR/.synthesis-work before any format is written; a rerun reuses every block whose record and PNGs verify and
makes only the others. An image depends only on its generator, its seed and the sampling options, never on which
blocks were made before it, so an interrupted export finishes with the same bytes as an uninterrupted one. Each
format folder is written beside its final place and renamed into it; synthesis.json goes last, and then the staging
folder is removed. A rerun of a complete export checks every file against synthesis.json and writes nothing.
"""

import dataclasses
import hashlib
import io
import math
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stylegan2ada import cli
from stylegan2ada.dataset import IMAGE_EXTENSIONS
from stylegan2ada.image_utils import generate_images, to_pil
from stylegan2ada.pickles import NetworkPickleError, evaluation_network, load_network_pkl
from stylegan2ada.util import UserError, atomic_write, parse_list, remove_stale_temp_files, sha256_file, write_json_atomic
from taxogan_ext import collection, hierarchy, taxonomy
from taxogan_ext.taxon_detector import KIND as TAXON_KIND
from taxogan_ext.taxon_metrics import TaxonError, TaxonFilter
import taxogan_ext.dcgan  # noqa: F401  registers the DCGAN baseline's classes for pickles

SYNTHESIS_FILE      = 'synthesis.json'          # the provenance of an export, written last
SYNTHESIS_FORMAT    = 'taxogan-synthesis/1'
WORK_DIR            = '.synthesis-work'         # staged blocks of a running export
WORK_FORMAT         = 'taxogan-synthesis-work/1'
FORMATS             = ('datasets', 'tree', 'ecotaxa')
NOISE_MODES         = ('const', 'random', 'none')
ECOTAXA_TABLE       = 'ecotaxa_synthetic.tsv'   # EcoTaxa imports only tables whose name starts with 'ecotaxa'
SYNTHETIC_PREFIX    = 'syn-'
REAL_PREFIX         = 'real-'
BLOCK               = 16                        # images per generator pass and per resume record
SEED_RANGE          = 1 << 32                   # numpy's RandomState takes seeds below 2**32

#----------------------------------------------------------------------------

class SynthesisError(UserError):
    """Bad input to an export (a pickle, a taxon, an option, the output folder); one line naming it."""

@dataclasses.dataclass(frozen=True)
class SynthesisOptions:
    """Everything an export depends on; the defaults are those of `dataset_tool_ext.py synthesize`."""
    outdir:             str                             # export folder: one subfolder per format + synthesis.json
    formats:            str | tuple = 'datasets'        # 'datasets', 'tree', 'ecotaxa', comma-separated or a sequence
    plan:               str | None = None               # train_hier.py experiment folder; None: --generator pairs
    method:             str | None = None               # plan row method (descending, ...); with `plan` only
    generators:         tuple = ()                      # 'TAXON=PKL[@CLASS]' strings; without `plan` only
    taxa:               str | tuple | None = None       # taxa to export; None: every target of the plan / generator
    datasets:           str | None = None               # datasets folder (manifest.json); None: the plan's
    num:                int | None = None               # synthetic images per taxon; None: `top_up`
    top_up:             int | None = None               # each taxon up to this many images, its real ones included
    trunc:              float = 1.0                     # truncation psi (1: none)
    noise_mode:         str = 'const'                   # 'const', 'random' or 'none'
    seed:               int = 0                         # base seed; per-taxon seeds derive from it and the name
    with_real:          bool = False                    # also write the taxa's real images (marked real)
    filter:             str | None = None               # 'taxon:PATH' classifier filter; None: keep every image
    filter_threshold:   float = 0.5                     # keep an image when p(its taxon) >= this
    max_tries_factor:   float = 20.0                    # generate at most this many times the images wanted
    compress_level:     int = 1                         # PNG zlib level 0-9
    device:             str = 'cpu'                     # torch device of the generators and the classifier

    def record(self) -> dict:
        """The options as synthesis.json records them (checked_options' values), without the output folder."""
        # Without outdir: an export moved or written elsewhere has the same bytes.
        return {field.name: (list(value) if isinstance(value, tuple) else value)
                for field in dataclasses.fields(self) if field.name != 'outdir'
                for value in [getattr(self, field.name)]}

@dataclasses.dataclass
class Target:
    """One exported taxon: its generator, where it sits in the taxonomy and how many images it gets."""
    taxon:      str
    path:       tuple                   # taxon names from the datasets' top rank down to this one
    pkl:        str                     # network pickle
    sha256:     str                     # of the pickle
    label:      int | None              # class of a conditional generator; None: unconditional
    label_name: str | None              # that class's name, where known
    stage:      str | None              # plan stage of the network; None: given with --generator
    G:          torch.nn.Module         # the generator (G_ema)
    num_real:   int                     # real images of the taxon in the datasets folder
    num:        int = 0                 # synthetic images to keep
    taxon_seed: int = 0                 # seed of the taxon's first candidate

#----------------------------------------------------------------------------
# Options, generators and targets.

def checked_options(options: SynthesisOptions) -> SynthesisOptions:
    """The options with lists parsed; SynthesisError for a bad value or combination."""
    formats = parse_list(options.formats)
    for fmt in formats:
        if fmt not in FORMATS:
            raise SynthesisError(f'--format {fmt}: unknown format (choose from {", ".join(FORMATS)})')
    if not formats or len(set(formats)) != len(formats):
        raise SynthesisError(f'--format {",".join(formats)}: name each of {", ".join(FORMATS)} at most once, at least one')
    if (options.plan is None) == (not options.generators):
        raise SynthesisError('name the generators either with --plan DIR --method NAME or with --generator TAXON=PKL, not both')
    if options.plan is not None and not options.method:
        raise SynthesisError(f'--plan {options.plan}: also name the method whose networks to use (--method descending, ...)')
    if options.plan is None and options.method:
        raise SynthesisError('--method needs --plan')
    if options.plan is None and options.datasets is None:
        raise SynthesisError('--generator needs --datasets DIR (the taxonomy and the real images of the taxa)')
    if (options.num is None) == (options.top_up is None):
        raise SynthesisError('give exactly one of --num N (images per taxon) and --top-up M (each taxon up to M images)')
    if options.noise_mode not in NOISE_MODES:
        raise SynthesisError(f'--noise-mode {options.noise_mode}: must be one of {", ".join(NOISE_MODES)}')
    if options.filter is not None:
        kind, colon, path = options.filter.partition(':')
        if kind != TAXON_KIND or not colon or not path:
            raise SynthesisError(f'--filter {options.filter}: expected taxon:PATH (a taxon classifier file)')
    if not 0 <= options.filter_threshold <= 1:
        raise SynthesisError(f'--filter-threshold {options.filter_threshold}: must be between 0 and 1')
    if options.max_tries_factor < 1:
        raise SynthesisError(f'--max-tries-factor {options.max_tries_factor}: must be at least 1')
    taxa = parse_list(options.taxa) or None
    return dataclasses.replace(options, formats=tuple(formats), generators=tuple(options.generators),
                               taxa=None if taxa is None else tuple(taxa), trunc=float(options.trunc),
                               filter_threshold=float(options.filter_threshold),
                               max_tries_factor=float(options.max_tries_factor))

def parse_generator(text: str) -> tuple[str, str, str | None]:
    """'TAXON=PKL' or 'TAXON=PKL@CLASS' -> (taxon, pkl, class index or name, or None)."""
    taxon, sep, rest = text.partition('=')
    pkl, at, label = rest.rpartition('@') if '@' in rest else (rest, '', '')
    if not sep or not taxon.strip() or not pkl or (at and not label.strip()):
        raise SynthesisError(f'--generator {text}: expected TAXON=PKL or TAXON=PKL@CLASS')
    return taxon.strip(), pkl, label.strip() if at else None

def load_generator(pkl: str, what: str) -> torch.nn.Module:
    """The generator (G_ema) of a network pickle; SynthesisError naming `what` when the file holds none."""
    if not os.path.isfile(pkl):
        raise SynthesisError(f'{what}: {pkl}: no such network pickle')
    try:
        G = evaluation_network(load_network_pkl(pkl))
    except NetworkPickleError as exc:
        raise SynthesisError(f'{what}: not a generator pickle ({exc})') from None
    if not all(hasattr(G, name) for name in ('z_dim', 'c_dim', 'img_resolution', 'img_channels')):
        raise SynthesisError(f'{what}: not a generator pickle ({type(G).__name__} has no z_dim/c_dim/img_resolution)')
    return G.eval().requires_grad_(False)

def _class_index(
    G:          torch.nn.Module,
    label:      str | int | None,       # class index or name (from @CLASS), or the plan's index; None: none given
    taxon:      str,
    manifest:   taxonomy.Manifest,
    what:       str,                    # names the generator in messages
) -> tuple[int | None, str | None]:
    """(class index, class name) of a conditional generator; (None, None) for an unconditional one."""
    if not G.c_dim:
        if label is not None:
            raise SynthesisError(f'{what}: @{label} given, but the network is unconditional')
        return None, None
    if label is None:
        raise SynthesisError(f'{what}: a conditional network ({G.c_dim} classes); name the class of {taxon}: '
                             f'{taxon}=PKL@CLASS (index or name)')
    # Class names: those of the parent's zip, whose children a conditional network of the parent generates.
    parent = manifest.taxa[taxon].parent
    names = manifest.labels(parent) if parent is not None else None
    names = names if names is not None and len(names) == G.c_dim else None
    if isinstance(label, int) or str(label).isdigit():
        index = int(label)
    elif names is not None and label in names:
        index = names.index(label)
    else:
        raise SynthesisError(f'{what}: class {label!r} is not a class name of the network '
                             f'({", ".join(names) if names else "names unknown; give the class index"})')
    if not 0 <= index < G.c_dim:
        raise SynthesisError(f'{what}: class {index} out of range: the network has {G.c_dim} classes (0-{G.c_dim - 1})')
    return index, (names[index] if names is not None else None)

def _lineage(manifest: taxonomy.Manifest, taxon: str) -> tuple:
    return tuple(reversed(manifest.ancestors(taxon))) + (taxon,)

def taxon_seed(seed: int, taxon: str) -> int:
    """The seed of a taxon's first candidate: from the base seed and the name, independent of the other taxa."""
    return int.from_bytes(hashlib.sha256(f'taxogan-synthesize/{seed}/{taxon}'.encode()).digest()[:4], 'little')

def candidate_seed(first: int, index: int) -> int:
    """The seed of a taxon's candidate `index` (its latent z and, with noise mode random, its noise)."""
    return (first + index) % SEED_RANGE

def resolve_targets(options: SynthesisOptions) -> tuple[list[Target], taxonomy.Manifest]:
    """One Target per exported taxon, in the datasets' tree order, with its generator loaded and its count set."""
    if options.plan is not None:
        plan = hierarchy.load_plan(options.plan)
        rows = hierarchy.row_generators(plan, options.plan)
        methods = sorted({row.method for row in plan.rows})
        if options.method not in methods:
            raise SynthesisError(f'--method {options.method}: not a method of the plan {options.plan} '
                                 f'(methods: {", ".join(methods)})')
        taxa = list(options.taxa or plan.targets)
        for taxon in taxa:
            if taxon not in plan.targets:
                raise SynthesisError(f'taxon {taxon!r} is not a target of the plan {options.plan} '
                                     f'(targets: {", ".join(plan.targets)})')
            if taxon not in rows.get(options.method, {}):
                raise SynthesisError(f'plan {options.plan}: no trained network answers {options.method} {taxon} '
                                     f'(train it with train_hier.py, or leave it out with --taxa)')
        chosen = [(t, rows[options.method][t].pkl, rows[options.method][t].label, rows[options.method][t].stage,
                   rows[options.method][t].sha256, f'{options.method} {t} ({rows[options.method][t].pkl})')
                  for t in taxa]
        datasets = options.datasets or plan.datasets
    else:
        parsed = [parse_generator(text) for text in options.generators]
        names = [taxon for taxon, _pkl, _label in parsed]
        if len(set(names)) != len(names):
            raise SynthesisError(f'--generator names a taxon twice: {", ".join(names)}')
        if options.taxa:
            missing = [t for t in options.taxa if t not in names]
            if missing:
                raise SynthesisError(f'--taxa {missing[0]}: no --generator for it (given: {", ".join(names)})')
            parsed = [p for p in parsed if p[0] in options.taxa]
        chosen = [(t, pkl, label, None, None, f'--generator {t}={pkl}' + (f'@{label}' if label is not None else ''))
                  for t, pkl, label in parsed]
        datasets = options.datasets
    manifest = taxonomy.load_manifest(datasets)
    for taxon, *_rest in chosen:
        if taxon not in manifest.taxa:
            raise SynthesisError(f'taxon {taxon!r} is not in the datasets {manifest.root} '
                                 f'(taxa: {", ".join(manifest.taxa)})')
    targets = []
    for taxon, pkl, label, stage, sha, what in chosen:
        G = load_generator(pkl, what)
        index, name = _class_index(G, label, taxon, manifest, what)
        target = Target(taxon=taxon, path=_lineage(manifest, taxon), pkl=str(pkl), sha256=sha or sha256_file(pkl),
                        label=index, label_name=name, stage=stage, G=G, num_real=manifest.num_images(taxon))
        target.num = options.num if options.num is not None else max(0, options.top_up - target.num_real)
        target.taxon_seed = taxon_seed(options.seed, taxon)
        targets.append(target)
    # Tree order, so that every file list and table of an export is the same whatever order the taxa were named in.
    order = {name: i for i, name in enumerate(manifest.taxa)}
    targets.sort(key=lambda t: order[t.taxon])
    for a in targets:
        for b in targets:
            if a.taxon in b.path[:-1]:
                raise SynthesisError(f'taxa {a.taxon} and {b.taxon} overlap ({b.taxon} is below {a.taxon}); '
                                     f'export disjoint taxa')
    _check_shapes(targets, manifest, options)
    return targets, manifest

def _check_shapes(targets: list[Target], manifest: taxonomy.Manifest, options: SynthesisOptions) -> None:
    """The datasets format holds one resolution and channel count; real images must have the generators' ones."""
    if 'datasets' not in options.formats and not options.with_real:
        return
    first = targets[0]
    for target in targets:
        shape = (target.G.img_resolution, target.G.img_channels)
        if shape != (first.G.img_resolution, first.G.img_channels):
            raise SynthesisError(f'{target.pkl}: {shape[0]} px, {shape[1]} channel(s), but {first.pkl} makes '
                                 f'{first.G.img_resolution} px, {first.G.img_channels}; one datasets folder holds one size')
        if options.with_real and shape != (manifest.resolution, manifest.channels):
            raise SynthesisError(f'--with-real: {target.pkl} makes {shape[0]} px, {shape[1]} channel(s) images, '
                                 f'the real ones in {manifest.root} are {manifest.resolution} px, {manifest.channels}')

#----------------------------------------------------------------------------
# The classifier filter.

def load_filter(options: SynthesisOptions, targets: list[Target], manifest: taxonomy.Manifest) -> TaxonFilter | None:
    """The classifier filter of the options (None without --filter); SynthesisError for a taxon it cannot judge."""
    if options.filter is None:
        return None
    try:
        return TaxonFilter(options.filter, options.filter_threshold, manifest, [t.taxon for t in targets], option='--filter')
    except TaxonError as exc:
        raise SynthesisError(str(exc)) from None

#----------------------------------------------------------------------------
# Images: rendering, PNG encoding, staged blocks.

def render(
    G:          torch.nn.Module,
    seeds:      list[int],              # one image per seed
    label:      int | None,             # class of a conditional G; None: unconditional
    psi:        float,                  # truncation psi
    noise_mode: str,                    # 'const', 'random' or 'none'
    device,
) -> torch.Tensor:
    """uint8 [len(seeds), C, H, W]: each image a function of its seed alone (z from it; random noise seeded by it)."""
    onehot = None if label is None else np.eye(G.c_dim, dtype=np.float32)[label]          # [c_dim]
    if noise_mode != 'random':
        return generate_images(G, seeds, label=onehot, truncation_psi=psi, noise_mode=noise_mode, device=device,
                               batch_size=max(1, len(seeds)))
    # Random noise is drawn from torch's global RNG per forward pass: one pass per image, seeded by its seed, so that
    # an image does not depend on its neighbours in the batch.
    out = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == 'cuda' else []):
            torch.manual_seed(seed)
            out.append(generate_images(G, [seed], label=onehot, truncation_psi=psi, noise_mode=noise_mode, device=device))
    return torch.cat(out)

def png_bytes(image: torch.Tensor, compress_level: int) -> bytes:
    """PNG of one uint8 image [C, H, W]: no metadata, fixed zlib level, so the same pixels give the same bytes."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format='PNG', compress_level=compress_level)
    return buf.getvalue()

def _write_png(path: Path, data: bytes) -> None:
    with atomic_write(path, 'wb') as f:
        f.write(data)

def _work_key(target: Target, options: SynthesisOptions, taxon_filter: TaxonFilter | None) -> dict:
    """What a taxon's staged candidates depend on; staged blocks made with another key are discarded."""
    return dict(format=WORK_FORMAT, taxon=target.taxon, sha256=target.sha256, label=target.label,
                taxon_seed=target.taxon_seed, trunc=options.trunc, noise_mode=options.noise_mode, block=BLOCK,
                compress_level=options.compress_level, filter_sha256=taxon_filter.sha256 if taxon_filter else None,
                filter_class=taxon_filter.classes[target.taxon] if taxon_filter else None,
                filter_rule='top-class-and-p' if taxon_filter else None,   # what a staged block's 'keep' means
                filter_threshold=taxon_filter.threshold if taxon_filter else None)

class _Staging:
    """The staged candidates of one taxon: OUTDIR/.synthesis-work/<taxon>/c<index>.png and b<block>.json records."""

    def __init__(self, folder: Path, key: dict):
        self.folder = folder
        record = hierarchy.read_json(folder / 'key.json')
        if record != key:
            # Made with other settings (or not at all): nothing in it can be reused.
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(folder / 'key.json', key)

    def png(self, index: int) -> Path:
        return self.folder / f'c{index:07d}.png'

    def load_block(self, block: int) -> dict | None:
        """The block's record when it and all its PNGs verify; None when it must be made (again)."""
        record = hierarchy.read_json(self.folder / f'b{block:06d}.json')
        if record is None:
            return None
        for k, digest in enumerate(record.get('sha256', [])):
            path = self.png(block * BLOCK + k)
            if not path.is_file() or sha256_file(path) != digest:
                return None
        return record if len(record.get('sha256', [])) == BLOCK else None

    def save_block(self, block: int, record: dict) -> None:
        # The record goes after the block's PNGs: a record on disk vouches for images that are complete.
        write_json_atomic(self.folder / f'b{block:06d}.json', record)

def make_block(
    target:         Target,
    block:          int,                # block number: candidates block * BLOCK ... + BLOCK - 1
    staging:        _Staging,
    options:        SynthesisOptions,
    taxon_filter:   TaxonFilter | None,
    device,
) -> dict:
    """Render, encode and stage one block of a taxon's candidates; returns its record (seeds, sha256, p)."""
    seeds = [candidate_seed(target.taxon_seed, block * BLOCK + k) for k in range(BLOCK)]
    images = render(target.G, seeds, target.label, options.trunc, options.noise_mode, device)     # [BLOCK, C, H, W]
    digests = []
    for k, image in enumerate(images):
        data = png_bytes(image, options.compress_level)
        _write_png(staging.png(block * BLOCK + k), data)
        digests.append(hashlib.sha256(data).hexdigest())
    p = keep = None
    if taxon_filter is not None:
        probs, verdicts = taxon_filter.judge(images, target.taxon, device)
        p, keep = [float(v) for v in probs], [bool(v) for v in verdicts]
    record = dict(seeds=seeds, sha256=digests, p=p, keep=keep)
    staging.save_block(block, record)
    return record

def make_candidates(
    target:         Target,
    options:        SynthesisOptions,
    taxon_filter:   TaxonFilter | None,
    work:           Path,               # the staging folder of the export
    device,
    bar,                                # tqdm bar of kept images
    log,
) -> tuple[list[dict], dict]:
    """The kept images of a taxon [{candidate, seed, sha256, p, staged}] and its filter summary; reuses staged blocks."""
    staging = _Staging(work / hierarchy.safe_name(target.taxon), _work_key(target, options, taxon_filter))
    limit = target.num if taxon_filter is None else math.ceil(options.max_tries_factor * target.num)
    kept, tried, rejected = [], 0, []
    block = 0
    while len(kept) < target.num and tried < limit:
        record = staging.load_block(block) or make_block(target, block, staging, options, taxon_filter, device)
        for k in range(BLOCK):
            if len(kept) == target.num or tried == limit:
                break
            index = block * BLOCK + k
            tried += 1
            p = None if record['p'] is None else record['p'][k]
            item = dict(candidate=index, seed=record['seeds'][k], sha256=record['sha256'][k], p=p)
            if taxon_filter is not None and not record['keep'][k]:
                rejected.append(item)
                continue
            kept.append(dict(item, staged=str(staging.png(index))))
            bar.update(1)
        block += 1
    summary = dict(tried=tried, kept=len(kept), acceptance_rate=len(kept) / tried if tried else None)
    if taxon_filter is not None:
        rate = summary['acceptance_rate'] or 0.0
        if len(kept) < target.num:
            raise SynthesisError(f'{target.taxon}: only {len(kept)} of {tried} generated images ({rate:.1%}) pass '
                                 f'the filter ({taxon_filter.rule()}) of the classifier {options.filter}; {target.num} '
                                 f'needed (at most --max-tries-factor {options.max_tries_factor:g} x {target.num} tried); '
                                 f'lower --filter-threshold')
        log(f'{target.taxon}: kept {len(kept)} of {tried} generated images ({rate:.1%}): {taxon_filter.rule()}')
        summary['rejected'] = rejected
    return kept, summary

#----------------------------------------------------------------------------
# The export's image list and formats.

def _real_images(target: Target, manifest: taxonomy.Manifest, work: Path) -> list[dict]:
    """The taxon's real images, extracted from its dataset zip into the staging folder (sorted by name)."""
    out = []
    folder = work / '_real' / hierarchy.safe_name(target.taxon)
    folder.mkdir(parents=True, exist_ok=True)
    zip_path = manifest.dataset_path(target.taxon)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise SynthesisError(f'--with-real: {zip_path}: cannot read the dataset zip ({exc})') from None
    with zf:
        names = sorted(n for n in zf.namelist() if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
        for name in names:
            data = zf.read(name)
            stem, ext = os.path.splitext(name.replace('/', '_'))
            file = f'{REAL_PREFIX}{hierarchy.safe_name(target.taxon)}-{stem}{ext.lower()}'
            staged = folder / file
            _write_png(staged, data)
            out.append(dict(file=file, taxon=target.taxon, path=list(target.path), synthetic=False, source=name,
                            sha256=hashlib.sha256(data).hexdigest(), staged=str(staged)))
    return out

def image_entries(
    targets:    list[Target],
    kept:       dict,                   # taxon -> make_candidates' kept list
    real:       dict,                   # taxon -> _real_images' list ([] without --with-real)
) -> list[dict]:
    """Every image of the export, one dict each (file name, taxon, path, synthetic or real, seed, ...), by file name."""
    entries = []
    for target in targets:
        for k, item in enumerate(kept[target.taxon]):
            entries.append(dict(file=f'{SYNTHETIC_PREFIX}{hierarchy.safe_name(target.taxon)}-{k:06d}.png', taxon=target.taxon,
                                path=list(target.path), synthetic=True, generator=target.sha256, label=target.label,
                                seed=item['seed'], candidate=item['candidate'], p=item['p'], sha256=item['sha256'],
                                staged=item['staged']))
        entries += real[target.taxon]
    return sorted(entries, key=lambda e: e['file'])

def _fresh_folder(outdir: Path, name: str) -> Path:
    """An empty folder beside OUTDIR/<name>, to be renamed into its place when complete (_replace_folder)."""
    return Path(tempfile.mkdtemp(dir=outdir, prefix=f'.{name}.tmp-'))

def _replace_folder(fresh: Path, final: Path) -> None:
    """Put a complete folder in place of `final` (the old one, if any, is moved aside first, then deleted)."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f'.{final.name}.old-'))
        os.replace(final, old / final.name)
    os.replace(fresh, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

def write_datasets_format(
    folder:     Path,                   # the (fresh) folder to write
    entries:    list[dict],             # image_entries'
    manifest:   taxonomy.Manifest,      # the source datasets (ranks)
    resolution: int,
    channels:   int,
    options:    SynthesisOptions,
) -> None:
    """<Taxon>.zip per taxon (the targets and their ancestors, labelled by child) and manifest.json, as build writes them."""
    ranks = list(manifest.ranks[:max(len(e['path']) for e in entries)])
    paths = [(tuple(e['path']), e['file']) for e in entries]
    try:
        taxa = collection.taxa_entries(taxonomy.build_tree(paths, ranks))
    except ValueError as exc:
        raise SynthesisError(f'{manifest.root}: {exc}') from None
    hashes = collection.write_zips(folder, taxa, [(e['file'], tuple(e['path']), e['staged']) for e in entries])
    listing = [{k: v for k, v in e.items() if k not in ('staged', 'path')} for e in entries]
    config = dict(ranks=ranks, resolution=resolution, source=str(manifest.root), synthesis=SYNTHESIS_FILE,
                  options=options.record())
    data = collection.manifest_data(taxa, hashes, config, channels, [], dict(images=listing))
    write_json_atomic(folder / taxonomy.MANIFEST_NAME, data)

def write_tree_format(folder: Path, entries: list[dict]) -> None:
    """<top taxon>/<...>/<taxon>/<file> for every image (what `build --source` reads as a folder tree)."""
    for e in entries:
        target = folder.joinpath(*e['path']) / e['file']
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(e['staged'], target)

# EcoTaxa import columns: (name, type ('[t]' text, '[f]' number), value of an image entry).
ECOTAXA_COLUMNS = (
    ('img_file_name',                 '[t]', lambda e, t: e['file']),
    ('img_rank',                      '[f]', lambda e, t: '0'),
    ('object_id',                     '[t]', lambda e, t: os.path.splitext(e['file'])[0]),
    ('object_annotation_category',    '[t]', lambda e, t: e['taxon']),
    ('object_annotation_hierarchy',   '[t]', lambda e, t: '>'.join(e['path'])),
    ('object_annotation_status',      '[t]', lambda e, t: 'predicted' if e['synthetic'] else 'validated'),
    ('object_synthetic',              '[f]', lambda e, t: '1' if e['synthetic'] else '0'),
    ('object_generator_sha256',       '[t]', lambda e, t: t.sha256 if e['synthetic'] else ''),
    ('object_generator_pkl',          '[t]', lambda e, t: t.pkl if e['synthetic'] else ''),
    ('object_generator_class',        '[t]', lambda e, t: '' if not e['synthetic'] or t.label is None else str(t.label)),
    ('object_seed',                   '[f]', lambda e, t: str(e['seed']) if e['synthetic'] else ''),
    ('object_filter_probability',     '[f]', lambda e, t: '' if e.get('p') is None else repr(e['p'])),
    ('sample_id',                     '[t]', lambda e, t: 'taxogan_synthetic' if e['synthetic'] else 'taxogan_real'),
)

def write_ecotaxa_format(folder: Path, entries: list[dict], targets: list[Target], options: SynthesisOptions) -> None:
    """The images and an EcoTaxa import table beside them (header row, type row, one row per image)."""
    by_taxon = {t.taxon: t for t in targets}
    rows = ['\t'.join(name for name, _type, _fn in ECOTAXA_COLUMNS), '\t'.join(kind for _name, kind, _fn in ECOTAXA_COLUMNS)]
    for e in entries:
        shutil.copyfile(e['staged'], folder / e['file'])
        cells = [fn(e, by_taxon[e['taxon']]) for _name, _kind, fn in ECOTAXA_COLUMNS]
        rows.append('\t'.join(cell.replace('\t', ' ') for cell in cells))
    with atomic_write(folder / ECOTAXA_TABLE) as f:
        f.write('\n'.join(rows) + '\n')

def _format_files(outdir: Path, formats) -> dict[str, str]:
    """{path relative to OUTDIR: SHA-256} of every file of the format folders."""
    files = {}
    for fmt in formats:
        for dirpath, dirnames, filenames in os.walk(outdir / fmt):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                files[path.relative_to(outdir).as_posix()] = sha256_file(path)
    return files

#----------------------------------------------------------------------------
# The export.

def check_outdir(outdir: Path) -> None:
    """SynthesisError unless OUTDIR is missing, empty, or holds an export of this tool (finished or not)."""
    if not outdir.exists():
        return
    if not outdir.is_dir():
        raise SynthesisError(f'--outdir {outdir}: is a file, not a folder')
    entries = sorted(os.listdir(outdir))
    if not entries:
        return
    ours = {SYNTHESIS_FILE, WORK_DIR, *FORMATS}
    foreign = [name for name in entries if name not in ours and not name.startswith('.')]
    if foreign or not ({SYNTHESIS_FILE, WORK_DIR} & set(entries)):
        shown = ', '.join((foreign or entries)[:5])
        raise SynthesisError(f'--outdir {outdir}: holds something other than an export ({shown}); '
                             f'choose an empty or new folder')

def _remove_leftovers(outdir: Path) -> None:
    """Format folders half-written or half-replaced, and temporary files, of an export killed while writing them."""
    if not outdir.is_dir():
        return
    for name in os.listdir(outdir):
        if any(name.startswith(f'.{fmt}.tmp-') or name.startswith(f'.{fmt}.old-') for fmt in FORMATS):
            shutil.rmtree(outdir / name, ignore_errors=True)
    remove_stale_temp_files(outdir, SYNTHESIS_FILE)

def _complete(outdir: Path, options: SynthesisOptions) -> dict | None:
    """synthesis.json of a finished export with these options whose every file still verifies; else None."""
    record = hierarchy.read_json(outdir / SYNTHESIS_FILE)
    if record is None or record.get('format') != SYNTHESIS_FORMAT or record.get('options') != options.record():
        return None
    try:
        return record if _format_files(outdir, options.formats) == record.get('files') else None
    except OSError:
        return None

def synthesize(
    options:    SynthesisOptions,       # what to export, and how
    log         = print,                # where to print notes and the summary
    progress    = True,                 # tqdm progress bar
) -> dict:
    """Write the export (formats + synthesis.json) into options.outdir, continuing an interrupted one; returns the provenance."""
    options = checked_options(options)
    outdir = Path(options.outdir)
    check_outdir(outdir)
    _remove_leftovers(outdir)
    targets, manifest = resolve_targets(options)
    done = _complete(outdir, options)
    if done is not None:
        log(f'{outdir}: complete, every file matches {SYNTHESIS_FILE}; nothing to do')
        return done
    taxon_filter = load_filter(options, targets, manifest)
    device = cli.pick_device(options.device)
    for target in targets:
        target.G = target.G.to(device)
    work = outdir / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)

    kept, summaries, real = {}, {}, {}
    with tqdm(total=sum(t.num for t in targets), desc='synthesize', unit='img', disable=None if progress else True) as bar:
        for target in targets:
            bar.set_postfix_str(target.taxon)
            kept[target.taxon], summaries[target.taxon] = make_candidates(target, options, taxon_filter, work, device,
                                                                          bar, log)
    for target in targets:
        real[target.taxon] = _real_images(target, manifest, work) if options.with_real else []
    entries = image_entries(targets, kept, real)
    if not entries:
        raise SynthesisError('nothing to export: every taxon has its --top-up count of real images already')

    resolution, channels = targets[0].G.img_resolution, targets[0].G.img_channels
    for fmt in options.formats:
        fresh = _fresh_folder(outdir, fmt)
        try:
            if fmt == 'datasets':
                write_datasets_format(fresh, entries, manifest, resolution, channels, options)
            elif fmt == 'tree':
                write_tree_format(fresh, entries)
            else:
                write_ecotaxa_format(fresh, entries, targets, options)
            _replace_folder(fresh, outdir / fmt)
        finally:
            shutil.rmtree(fresh, ignore_errors=True)
    record = provenance(options, targets, manifest, taxon_filter, summaries, entries,
                        _format_files(outdir, options.formats))
    # Last: a folder with synthesis.json is a complete export.
    write_json_atomic(outdir / SYNTHESIS_FILE, record)
    shutil.rmtree(work, ignore_errors=True)
    for target in targets:
        log(f'{target.taxon}: {len(kept[target.taxon])} synthetic' +
            (f' + {len(real[target.taxon])} real' if options.with_real else '') + ' images')
    log(f'wrote {len(entries)} images as {", ".join(options.formats)} and {SYNTHESIS_FILE} to {outdir}')
    return record

def provenance(
    options:        SynthesisOptions,
    targets:        list[Target],
    manifest:       taxonomy.Manifest,
    taxon_filter:   TaxonFilter | None,
    summaries:      dict,               # taxon -> make_candidates' summary
    entries:        list[dict],         # image_entries'
    files:          dict,               # _format_files'
) -> dict:
    """synthesis.json: options, generators (pickle, SHA-256, class), sampling, filter, every image and every file."""
    # No dates or host names: a resumed export writes the same bytes as an uninterrupted one, this file included.
    return dict(
        format=SYNTHESIS_FORMAT, tool='dataset_tool_ext.py synthesize', options=options.record(),
        datasets=str(manifest.root), truncation_psi=options.trunc, noise_mode=options.noise_mode,
        seed=options.seed, block=BLOCK,
        seed_rule='taxon seed = first 4 bytes (little-endian) of SHA-256("taxogan-synthesize/<seed>/<taxon>"); '
                  'candidate i: (taxon seed + i) mod 2**32; z = np.random.RandomState(seed).randn(z_dim)',
        generators={t.taxon: dict(pkl=t.pkl, sha256=t.sha256, stage=t.stage, method=options.method, label=t.label,
                                  label_name=t.label_name, resolution=t.G.img_resolution, channels=t.G.img_channels,
                                  path=list(t.path), taxon_seed=t.taxon_seed) for t in targets},
        filter=None if taxon_filter is None else dict(
            spec=options.filter, sha256=taxon_filter.sha256, threshold=taxon_filter.threshold,
            classes=dict(taxon_filter.classes), max_tries_factor=options.max_tries_factor),
        taxa={t.taxon: dict(num_real=t.num_real, num_synthetic=summaries[t.taxon]['kept'],
                            num_real_written=sum(1 for e in entries if e['taxon'] == t.taxon and not e['synthetic']),
                            **summaries[t.taxon]) for t in targets},
        images=[{k: v for k, v in e.items() if k != 'staged'} for e in entries],
        files=files,
    )

#----------------------------------------------------------------------------
