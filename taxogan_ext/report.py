"""Reports of an experiment: the paper's tables (Markdown, CSV), image grids per taxon, charts (matplotlib: PNG, PDF, SVG).

Input is an experiment folder written by train_hier.py: `results.jsonl` (one record per evaluated stage and
taxon) and the stage folders (stage.json, stats.jsonl, metric-*.jsonl, pickles). Table 1 experiments are a
folder of such experiments, one per configuration (`make table1`).

Numbers computed with the taxon classifier as feature detector are not comparable with the paper's, which
use Inception-v3: the tables name the detector of every column and show the paper's values only in columns
labelled "paper (Inception)".

    python -m taxogan_ext.report runs/copepoda
    python -m taxogan_ext.report runs/table1 --layout table1
"""

import csv
import dataclasses
import io
import json
import math
import os
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from stylegan2ada import cli
from stylegan2ada.dataset import ImageFolderDataset
from stylegan2ada.image_utils import generate_images, save_png_atomic
from stylegan2ada.metrics.detectors import resolve_detector
from stylegan2ada.pickles import evaluation_network, load_network_pkl
from stylegan2ada.util import UserError, atomic_write, write_text_atomic
from taxogan_ext import dcgan  # noqa: F401  (registers the DCGAN baseline's classes for its pickles)
from taxogan_ext import hierarchy, utility
from taxogan_ext.taxonomy import ManifestError, load_manifest

#----------------------------------------------------------------------------
# The paper's numbers (Martinel et al. 2024): FID50k and KID50k x 100 with Inception-v3, 256x256, BOLD images.

PAPER_DETECTOR = 'Inception'
PAPER_TABLE1_TAXON = 'Calanoida'
PAPER_TABLE1 = {                            # configuration -> FID50k on Calanoida
    'DCGAN':                    239.240,
    'StyleGAN2':                137.426,
    'StyleGAN2 + ADA':          44.774,
    'StyleGAN2 + ADA + LeCam':  39.341,
}
TABLE1_ORDER = tuple(PAPER_TABLE1)
PAPER_TABLE2 = {                            # taxon -> method -> (FID, KID x 100)
    'Calanoida':         {'direct': (39.341, 1.204),                                'descending': (36.529, 0.931)},
    'Cyclopoida':        {'direct': (60.401, 2.327),  'lateral': (50.504, 1.545),   'descending': (47.017, 1.215)},
    'Harpacticoida':     {'direct': (119.298, 2.323), 'lateral': (114.288, 2.070),  'descending': (108.533, 1.503)},
    'Siphonostomatoida': {'direct': (111.865, 1.611), 'lateral': (107.610, 1.549),  'descending': (96.995, 0.990)},
}
PAPER_TABLE2_SOURCES = {'direct': None, 'lateral': 'Calanoida', 'descending': 'Copepoda'}   # what each paper column started from

METHOD_ORDER = ('direct', 'lateral', 'descending', 'finetune', 'conditional', 'conditional-ft')
GRID_FILE = 'grid-{}.png'
OVERVIEW_FILE = 'overview.png'
CURVES_FILE = 'curves.png'
GAIN_FILE = 'gain.png'
FIGURE_FORMATS = ('png', 'pdf', 'svg')      # each chart (curves, gain) is written in these formats, beside its PNG
CLOSEST_FILE = 'closest-{}.png'
# Results of the k-NN metric families (stylegan2ada.metrics): (family, result-name ending, table label, CSV field).
KNN_RESULTS = (('pr', '_precision', 'P', 'precision'), ('pr', '_recall', 'R', 'recall'),
               ('dc', '_density', 'D', 'density'), ('dc', '_coverage', 'C', 'coverage'),
               ('mem', '_share', 'copies', 'copy_share'), ('mem', '_ct', 'C_T', 'copy_ct'))
BALANCED = 'balanced mean'

#----------------------------------------------------------------------------

class ReportError(UserError):
    """An experiment folder that cannot be reported; one line naming the file."""

#----------------------------------------------------------------------------
# Charts: matplotlib figures on the Agg canvas (no display, no pyplot state), each written as PNG, PDF and SVG.

FIGURE_DPI = 100                            # PNG pixels per inch
# The PDF and SVG files leave out the date of writing, and the SVG's element ids come from this salt instead of a
# random one: the same data give the same bytes, as the image grids do.
_FIGURE_METADATA = {'png': {}, 'pdf': {'CreationDate': None}, 'svg': {'Date': None}}
_SVG_HASH_SALT = 'taxogan'

@dataclasses.dataclass
class Chart:
    """A chart as drawn: the files written and every series plotted (what tests and readers check, not pixels)."""
    paths:  list            # files written, in the order of the formats asked for
    series: list            # one dict per series: panel, label, x, y, and low, high where it has intervals

def new_figure(
    width,                  # inches
    height,                 # inches
):
    """An empty matplotlib Figure on its own Agg canvas (constrained layout), outside pyplot's global figures."""
    # Imported here: matplotlib takes a moment to import, and most users of this module write tables only.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    figure = Figure(figsize=(width, height), layout='constrained')
    FigureCanvasAgg(figure)
    return figure

def save_figure(
    figure,                             # matplotlib Figure
    path,                               # output path; its suffix is replaced by each format's
    formats         = FIGURE_FORMATS,   # file formats, e.g. ('png', 'pdf', 'svg')
) -> list[str]:
    """Write the figure once per format beside `path` (curves.png -> curves.png, curves.pdf, curves.svg), atomically."""
    import matplotlib  # pylint: disable=import-outside-toplevel
    written = []
    for fmt in formats:
        if fmt not in _FIGURE_METADATA:
            raise ValueError(f'figure format {fmt!r}: one of {", ".join(_FIGURE_METADATA)}')
        out = Path(path).with_suffix('.' + fmt)
        with matplotlib.rc_context({'svg.hashsalt': _SVG_HASH_SALT}), atomic_write(out, 'wb') as f:
            figure.savefig(f, format=fmt, dpi=FIGURE_DPI, metadata=_FIGURE_METADATA[fmt])
        written.append(str(out))
    return written

def _stage_handles(labels):
    """Legend entries (a coloured line with a marker) for stages drawn in colours C0, C1, ..."""
    from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel
    return [Line2D([], [], color=f'C{i % 10}', marker='o', markersize=4, label=label) for i, label in enumerate(labels)]

#----------------------------------------------------------------------------
# Records.

def current_records(
    exp_dir,        # experiment folder holding results.jsonl
) -> list[dict]:
    """The latest record of each (stage, taxon), leaving out records of stages retrained since (stale fingerprint)."""
    path = Path(exp_dir) / hierarchy.RESULTS_FILE
    if not path.is_file():
        raise ReportError(f'{path}: no such file (run train_hier.py first)')
    try:
        records = hierarchy.read_results(path)
    except hierarchy.PlanError as exc:
        raise ReportError(str(exc)) from None
    latest = {}
    for record in records:
        latest[(record['stage'], record['taxon'])] = record     # later lines win
    out = []
    for record in latest.values():
        stage = hierarchy.read_json(Path(exp_dir) / record['stage'] / hierarchy.STAGE_FILE)
        if stage is not None and stage.get('fingerprint') != record.get('fingerprint'):
            continue
        out.append(record)
    return out

def metric_value(record: dict, family: str):
    """(name, value) of the record's first metric of a family ('fid', 'kid', 'acc'), or (None, None)."""
    for name, value in record.get('metrics', {}).items():
        if name.startswith(family):
            return name, value
    return None, None

def knn_value(record: dict, family: str, ending: str):
    """(name, value) of the record's first result of a k-NN family ('pr', 'dc', 'mem') ending in e.g. '_recall'."""
    for name, value in record.get('metrics', {}).items():
        if name.startswith(family) and name.endswith(ending):
            return name, value
    return None, None

def _knn_cell(record) -> str:
    """'P 0.812 R 0.450 · copies 0.020 (C_T +0.31)': the k-NN results a record has, '-' for none."""
    if record is None:
        return '-'
    found = {label: knn_value(record, family, ending)[1] for family, ending, label, _ in KNN_RESULTS}
    parts = [' '.join(f'{label} {_fmt(found[label])}' for label in pair if found[label] is not None)
             for pair in (('P', 'R'), ('D', 'C'))]
    if found['copies'] is not None:
        parts.append(f'copies {_fmt(found["copies"])} (C_T {found["C_T"]:+.2f})' if found['C_T'] is not None
                     else f'copies {_fmt(found["copies"])}')
    return ' · '.join(p for p in parts if p) or '-'

def detector_label(spec: str | None) -> str:
    """'Inception', 'taxon classifier (taxon.pt)' or the file name of another detector."""
    if not spec or spec == 'inception':
        return PAPER_DETECTOR
    if spec.startswith('taxon:'):
        return f'taxon classifier ({os.path.basename(spec[len("taxon:"):])})'
    return os.path.basename(spec)

def chain_label(record: dict) -> str:
    """'Copepoda > Calanoida' (the --resume pickle first, ' [cond]' for a conditional stage)."""
    chain = ([record['origin']] if record.get('origin') else []) + list(record.get('chain') or [record['taxon']])
    return ' > '.join(chain) + (' [cond]' if record.get('cond') else '')

def column_key(record: dict) -> tuple:
    """(method, source, origin): the table column a record belongs to."""
    return (record.get('method'), record.get('source'), record.get('origin'))

def column_label(key: tuple) -> str:
    """'direct', 'lateral (from Calanoida)', 'descending (from Copepoda)', ..."""
    method, source, origin = key
    label = {
        'direct': 'direct',
        'lateral': f'lateral (from {source})',
        'descending': f'descending (from {source})',
        'finetune': f'fine-tuned (from {origin})',
        'conditional': f'conditional ({source} classes)',
        'conditional-ft': f'conditional + fine-tune ({source})',
    }.get(method, f'{method} (from {source})' if source else str(method))
    if origin and method != 'finetune':
        label += f' [start: {origin}]'
    return label

def _sort_columns(keys):
    def rank(key):
        method = key[0]
        return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), str(key[1]), str(key[2]))
    return sorted(set(keys), key=rank)

def _taxon_order(records) -> list[str]:
    """Taxa in the manifest's tree order when the manifest can be read, else in order of appearance."""
    seen = list(dict.fromkeys(r['taxon'] for r in records))
    datasets = next((r.get('datasets') for r in records if r.get('datasets')), None)
    if datasets:
        try:
            order = list(load_manifest(datasets).taxa)
            return sorted(seen, key=lambda t: order.index(t) if t in order else len(order))
        except (ManifestError, OSError):
            pass
    return seen

def paper_reference(key: tuple, taxon: str):
    """The paper's (FID, KID x100) for this column and taxon, or None when the paper has no such cell."""
    method, source, origin = key
    if origin is not None or method not in PAPER_TABLE2_SOURCES or PAPER_TABLE2_SOURCES[method] != source:
        return None
    return PAPER_TABLE2.get(taxon, {}).get(method)

def _fmt(value, digits=3) -> str:
    return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:.{digits}f}'

def _cell(record) -> str:
    if record is None:
        return '-'
    if not record.get('metrics'):
        return 'not evaluated'
    _, fid = metric_value(record, 'fid')
    _, kid = metric_value(record, 'kid')
    return f'{_fmt(fid)} / {_fmt(None if kid is None else kid * 100)}'

#----------------------------------------------------------------------------
# Hierarchical experiments (Table 2 layout).

def hier_table(records) -> dict:
    """Rows (taxa) x columns (method, source, origin) of an experiment, with the paper's matching cells."""
    columns = _sort_columns(column_key(r) for r in records)
    taxa = _taxon_order(records)
    cells = {(r['taxon'], column_key(r)): r for r in records}
    is_paper = any(t in PAPER_TABLE2 for t in taxa)
    paper_columns = {key for key in columns if is_paper and any(paper_reference(key, t) for t in taxa)}
    return dict(columns=columns, taxa=taxa, cells=cells, paper_columns=paper_columns)

def _images_of(records, taxon):
    return next((r.get('num_images') for r in records if r['taxon'] == taxon), None)

def _metric_summary(records, cells='Cells are FID / KID x 100.') -> str:
    fids = sorted({metric_value(r, 'fid')[0] for r in records} - {None})
    kids = sorted({metric_value(r, 'kid')[0] for r in records} - {None})
    detectors = sorted({detector_label(r.get('detector')) for r in records if r.get('metrics')}) or ['none']
    return f'Metrics: {", ".join(fids + kids) or "none"}; detector: {", ".join(detectors)}. {cells}'.rstrip()

def _detector_note(records) -> list[str]:
    if all(detector_label(r.get('detector')) == PAPER_DETECTOR for r in records):
        return ['The columns marked "paper ... (Inception)" are the published values (FID50k / KID50k x 100, 256 px, BOLD images); '
                'they compare with ours only at the paper\'s resolution, data and training length.']
    return ['Our numbers use the taxon classifier as feature detector, not Inception-v3: they rank methods within this '
            'table but are NOT comparable with the paper\'s numbers. The columns marked "paper ... (Inception)" are the '
            'published Inception values, shown for reference only.']

def _provenance(records) -> str:
    dates = sorted(r.get('date') for r in records if r.get('date'))
    hosts = sorted({r.get('host') for r in records if r.get('host')})
    # Several records (taxa) can come from one stage: count each stage's training once.
    train = sum(r.get('train_seconds') or 0 for r in {(r.get('experiment_dir'), r['stage']): r for r in records}.values())
    span = dates[0][:10] if dates else '?'
    if dates and dates[-1][:10] != dates[0][:10]:
        span += f' to {dates[-1][:10]}'
    return (f'Evaluated {span}'
            + f' on {", ".join(hosts) or "?"}; training time of these stages {train / 60:.1f} min.')

def hier_markdown(records, title='Results', utility_records=()) -> str:
    """The experiment's table in Markdown: a row per taxon, a column per method (+ the paper's where it has one), and
    the utility measures when they were computed."""
    t = hier_table(records)
    header = ['taxon', 'images']
    for key in t['columns']:
        header.append(column_label(key))
        if key in t['paper_columns']:
            header.append(f'{column_label(key)}: paper ({PAPER_DETECTOR})')
    lines = [f'# {title}', '', _metric_summary(records), '', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for taxon in t['taxa']:
        row = [taxon, str(_images_of(records, taxon) or '-')]
        for key in t['columns']:
            row.append(_cell(t['cells'].get((taxon, key))))
            if key in t['paper_columns']:
                ref = paper_reference(key, taxon)
                row.append(f'{ref[0]:.3f} / {ref[1]:.3f}' if ref else '-')
        lines.append('| ' + ' | '.join(row) + ' |')
    accs = [r for r in records if metric_value(r, 'acc')[0]]
    if accs:
        name = metric_value(accs[0], 'acc')[0]
        lines += ['', f'Taxon-classifier accuracy of generated images ({name}: share classified as their taxon):', '',
                  '| taxon | ' + ' | '.join(column_label(k) for k in t['columns']) + ' |', '|' + '---|' * (len(t['columns']) + 1)]
        for taxon in t['taxa']:
            cells = [_fmt(metric_value(t['cells'][(taxon, k)], 'acc')[1]) if (taxon, k) in t['cells'] else '-'
                     for k in t['columns']]
            lines.append(f'| {taxon} | ' + ' | '.join(cells) + ' |')
    knn = [r for r in records if _knn_cell(r) != '-']
    if knn:
        names = sorted({knn_value(r, family, ending)[0] for r in knn for family, ending, _, _ in KNN_RESULTS} - {None})
        lines += ['', f'Fidelity, diversity and copying ({", ".join(names)}): P / R = precision / recall (k = 3), '
                  'D / C = density / coverage (k = 5), copies = share of generated images nearer to a training image than '
                  '95 % of real images are, C_T = data-copying z-score (below -3: copying; docs/metrics.md).', '',
                  '| taxon | ' + ' | '.join(column_label(k) for k in t['columns']) + ' |', '|' + '---|' * (len(t['columns']) + 1)]
        for taxon in t['taxa']:
            lines.append(f'| {taxon} | ' + ' | '.join(_knn_cell(t['cells'].get((taxon, k))) for k in t['columns']) + ' |')
    unevaluated = [r for r in records if not r.get('metrics')]
    if unevaluated:
        # Trained with --metrics none: say which network each cell stands for, so that it can be evaluated later.
        lines += ['', 'Not evaluated (no per-stage metrics asked for): the stages and their final snapshots.', '',
                  '| stage | chain | kimg | snapshot |', '|---|---|---|---|']
        for r in sorted(unevaluated, key=lambda r: r['stage']):
            lines.append(f'| {r["stage"]} | {chain_label(r)} | {r.get("kimg", 0):g} | {r.get("pkl") or "-"} |')
    lines += utility_markdown(list(utility_records))
    lines += [''] + _detector_note(records) + ['', _provenance(records), '']
    return '\n'.join(lines)

CSV_FIELDS = ('taxon', 'images', 'column', 'method', 'source', 'origin', 'stage', 'kimg', 'detector', 'fid_metric', 'fid',
              'kid_metric', 'kid_x100', 'acc_metric', 'acc', 'paper_fid_inception', 'paper_kid_x100_inception', 'date', 'snapshot',
              'cas_metric', 'cas', 'cas_low', 'cas_high', 'gain_metric', 'gain', 'gain_low', 'gain_high',
              'cas_filtered_metric', 'cas_filtered', 'cas_filtered_low', 'cas_filtered_high',
              'gain_filtered_metric', 'gain_filtered', 'gain_filtered_low', 'gain_filtered_high',
              *(field for _, _, _, field in KNN_RESULTS))

def hier_csv_rows(records, utility_records=()) -> list[dict]:
    """One CSV row per (taxon, column) with a result, with the utility measures of its method; then a row per utility
    value without such a cell (a lateral donor, the balanced means)."""
    t = hier_table(records)
    extra = utility_csv_rows(list(utility_records))
    out = []
    for taxon in t['taxa']:
        for key in t['columns']:
            r = t['cells'].get((taxon, key))
            if r is None:
                continue
            fid_name, fid = metric_value(r, 'fid')
            kid_name, kid = metric_value(r, 'kid')
            acc_name, acc = metric_value(r, 'acc')
            ref = paper_reference(key, taxon) if key in t['paper_columns'] else None
            out.append(dict(taxon=taxon, images=r.get('num_images'), column=column_label(key), method=key[0], source=key[1] or '',
                            origin=key[2] or '', stage=r['stage'], kimg=r.get('kimg'), detector=r.get('detector'),
                            fid_metric=fid_name or '', fid=fid, kid_metric=kid_name or '',
                            kid_x100=None if kid is None else kid * 100,
                            acc_metric=acc_name or '', acc=acc, paper_fid_inception=ref[0] if ref else None,
                            paper_kid_x100_inception=ref[1] if ref else None, date=r.get('date'), snapshot=r.get('pkl'),
                            **{field: knn_value(r, family, ending)[1] for family, ending, _, field in KNN_RESULTS},
                            **{k: v for k, v in extra.pop((taxon, key[0]), {}).items() if k != 'stage'}))
    for (taxon, method), values in extra.items():
        out.append(dict(values, taxon=taxon, method=method, column=method))
    return out

#----------------------------------------------------------------------------
# Do the generated images help? (cas_taxon, gain_taxon of each method's networks)

def current_utility(exp_dir) -> list[dict]:
    """The latest utility.jsonl record of each (method, metric) whose networks are still the stages' final pickles."""
    try:
        records = utility.read_utility_records(Path(exp_dir) / utility.UTILITY_FILE)
    except utility.UtilityError as exc:
        raise ReportError(str(exc)) from None
    latest = {}
    for record in records:
        latest[(record.get('method'), record.get('metric'))] = record
    return [r for r in latest.values()
            if all(hierarchy.final_sha256(exp_dir, stage) == r.get('generator_sha256', {}).get(t)
                   for t, stage in (r.get('stages') or {}).items())]

def _methods_of(utility_records) -> list[str]:
    methods = list(dict.fromkeys(r['method'] for r in utility_records))
    return sorted(methods, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER))

def _utility_kind(record) -> str:
    """'cas', 'gain', 'cas_filtered' or 'gain_filtered': which measure a utility record holds."""
    spec = utility.parse_utility_metric(record['metric'])
    return spec.kind + ('_filtered' if spec.filtered else '')

def _utility_of(utility_records, kind, method):
    return next((r for r in utility_records if r['method'] == method and _utility_kind(r) == kind), None)

def _signed(value, low=None, high=None, digits=3) -> str:
    if value is None or math.isnan(value):
        return '-'
    text = f'{value:+.{digits}f}'
    if low is not None and not math.isnan(low):
        text += f' [{low:+.{digits}f}, {high:+.{digits}f}]'
    return text

def utility_markdown(utility_records) -> list[str]:
    """The lines of the table's section on classifier accuracy with generated images (none without records)."""
    unmeasured = [r for r in utility_records if 'error' in r]
    utility_records = [r for r in utility_records if 'error' not in r]
    if not utility_records:
        return []
    methods = _methods_of(utility_records)
    first = utility_records[0]
    taxa = list(first['targets'])
    cas = {m: _utility_of(utility_records, 'cas', m) for m in methods}
    gain = {m: _utility_of(utility_records, 'gain', m) for m in methods}
    # The filtered variants (only images the filter classifier assigns to their taxon) beside the plain ones.
    cas_f = {m: _utility_of(utility_records, 'cas_filtered', m) for m in methods}
    gain_f = {m: _utility_of(utility_records, 'gain_filtered', m) for m in methods}
    header = ['taxon', 'real train / held-out', 'real-trained']
    header += [f'CAS {m}' for m in methods if cas[m]] + [f'CAS {m} filtered' for m in methods if cas_f[m]]
    header += [f'gain {m}' for m in methods if gain[m]] + [f'gain {m} filtered' for m in methods if gain_f[m]]
    opts = first.get('seeds'), first.get('num_test', {})
    lines = ['', '## Do the generated images help a classifier?', '',
             f'Classifiers (the taxon classifier\'s architecture, the same steps, batch and augmentation for every arm) '
             f'tested on {sum(opts[1].values())} held-out real images that trained nothing, generators included '
             f'({first.get("heldout_fraction", "?")} of each taxon, seed {first.get("heldout_seed", "?")}). '
             f'Cells: held-out accuracy (per taxon; balanced mean last), mean over {opts[0]} seeds, '
             f'[95 % t-interval] on the balanced mean. '
             f'CAS ({", ".join(sorted({r["metric"] for r in cas.values() if r}))}): trained on generated images only. '
             f'Gain ({", ".join(sorted({r["metric"] for r in gain.values() if r}))}): real + generated minus real only '
             f'(paired by seed).' + _filter_note(list(cas_f.values()) + list(gain_f.values())), '',
             '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for taxon in taxa:
        row = [taxon, f'{first["num_train"][taxon]} / {first["num_test"][taxon]}', _fmt(first['real_per_taxon'][taxon][0])]
        row += [_fmt(c[m]['per_taxon'][taxon][0]) for c in (cas, cas_f) for m in methods if c[m]]
        row += [_signed(g[m]['per_taxon'][taxon][0]) for g in (gain, gain_f) for m in methods if g[m]]
        lines.append('| ' + ' | '.join(row) + ' |')
    real = first.get('real_accuracy', first.get('accuracy_real'))
    real_interval = first.get('real_interval') or [float('nan')] * 2
    row = [f'**{BALANCED}**', '', _fmt(real) + ('' if math.isnan(real_interval[0]) else
                                               f' [{real_interval[0]:.3f}, {real_interval[1]:.3f}]')]
    row += [_fmt(c[m]['value']) + ('' if math.isnan(c[m]['interval'][0]) else
                                   f' [{c[m]["interval"][0]:.3f}, {c[m]["interval"][1]:.3f}]')
            for c in (cas, cas_f) for m in methods if c[m]]
    row += [_signed(g[m]['value'], *g[m]['interval']) for g in (gain, gain_f) for m in methods if g[m]]
    lines.append('| ' + ' | '.join(row) + ' |')
    if any(gain.values()):
        lines += ['', f'Per-taxon gains with their intervals: {GAIN_FILE}.']
    for r in unmeasured:
        lines += ['', f'Not measured: {r["metric"]} of {r["method"]} ({r["error"]}).']
    return lines

def _filter_note(records) -> str:
    """' Filtered: ...' naming the filter classifier and threshold of the filtered columns ('' without any)."""
    found = next((r.get('filter') for r in records if r and r.get('filter')), None)
    if not found:
        return ''
    rule = found.get('rule') or f'p >= {found["threshold"]:g}'
    return (f' Filtered: only generated images that the classifier {os.path.basename(found["classifier"])} (trained on '
            f'the training images only) assigns to their taxon ({rule}).')

def utility_csv_rows(utility_records) -> list[dict]:
    """CSV values of the utility measures: {(taxon or BALANCED, method): {cas_metric, cas, ..., gain_filtered_high}}."""
    out = {}
    for r in utility_records:
        if 'error' in r:
            continue
        kind = _utility_kind(r)
        cells = [(t, v) for t, v in r['per_taxon'].items()] + [(BALANCED, [r['value']] + list(r['interval']))]
        for taxon, (value, low, high) in cells:
            entry = out.setdefault((taxon, r['method']), dict(stage=(r.get('stages') or {}).get(taxon)))
            entry.update({f'{kind}_metric': r['metric'], kind: value, f'{kind}_low': low, f'{kind}_high': high})
    return out

def write_gain_chart(
    utility_records,                    # current_utility's records
    path,                               # output file (gain.png); the other formats beside it
    formats         = FIGURE_FORMATS,   # file formats written
) -> Chart | None:
    """Per-taxon bar chart of the augmentation gain, one bar per method with its interval; None without gain records."""
    gains = [r for r in utility_records if _utility_kind(r) == 'gain' and 'error' not in r]
    if not gains:
        return None
    methods = _methods_of(gains)
    groups = list(gains[0]['targets']) + [BALANCED]
    series = []
    for m in methods:
        r = _utility_of(gains, 'gain', m)
        triples = [r['per_taxon'][t] for t in groups[:-1]] + [[r['value']] + list(r['interval'])]
        series.append(dict(panel='gain', label=m, x=list(groups), y=[t[0] for t in triples],
                           low=[t[1] for t in triples], high=[t[2] for t in triples]))
    figure = new_figure(1.4 + 1.5 * len(groups), 4.2)
    ax = figure.add_subplot()
    width = 0.8 / len(methods)
    for i, item in enumerate(series):
        x = np.arange(len(groups)) - 0.4 + (i + 0.5) * width
        y, low, high = (np.asarray(item[k], dtype=np.float64) for k in ('y', 'low', 'high'))
        shown = np.isfinite(y)                  # a method without a value for a taxon leaves its place empty
        ax.bar(x[shown], y[shown], width * 0.9, color=f'C{i % 10}', label=item['label'])
        ranged = shown & np.isfinite(low)       # one seed: no interval
        ax.errorbar(x[ranged], y[ranged], yerr=[y[ranged] - low[ranged], high[ranged] - y[ranged]], fmt='none',
                    ecolor='black', elinewidth=1, capsize=4)
    # A gain in accuracy lies in [-1, 1]: intervals of few seeds that reach beyond are cut at the edge of the axes.
    values = [min(max(v, -1.0), 1.0) for item in series for k in ('y', 'low', 'high') for v in item[k] if not math.isnan(v)]
    lo, hi = min(values + [0.0]), max(values + [0.0])
    pad = 0.1 * (hi - lo or 0.1)
    ax.set_ylim(max(lo - pad, -1.0), min(hi + pad, 1.0))
    ax.axhline(0, color='black', linewidth=0.8)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.yaxis.set_major_formatter('{x:+.2f}')
    ax.set_ylabel('gain in held-out accuracy')
    ax.grid(True, axis='y', color='0.9')
    ax.set_axisbelow(True)
    ax.set_title(f'Gain in held-out accuracy from adding generated images ({gains[0]["metric"]}; '
                 f'mean over {gains[0].get("seeds")} seeds, 95 % t-interval)', loc='left', fontsize='medium')
    figure.legend(loc='outside lower left', ncols=len(methods), frameon=False)
    return Chart(save_figure(figure, path, formats), series)

#----------------------------------------------------------------------------
# Table 1: configurations on one taxon.

def table1_configuration(options: dict) -> str:
    """The Table 1 row a run's train.py options belong to (options not given are train.py's defaults)."""
    if options.get('model', 'stylegan2') == 'dcgan':
        return 'DCGAN'
    if options.get('aug', 'ada') == 'noaug':
        return 'StyleGAN2'
    name = 'StyleGAN2 + ADA' if options.get('aug', 'ada') == 'ada' else f'StyleGAN2 + {options["aug"]} augmentation'
    if float(options.get('lecam_weight', 0) or 0) > 0:
        name += ' + LeCam'
    return name

def table1_records(root) -> list[tuple[str, dict]]:
    """(configuration, record) for each experiment folder under `root` (its direct record on the Table 1 taxon)."""
    out = []
    for sub in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
        if not (sub / hierarchy.RESULTS_FILE).is_file():
            continue
        records = [r for r in current_records(sub) if r.get('method') == 'direct']
        for record in records:
            out.append((table1_configuration(record.get('train_options') or {}), dict(record, experiment_dir=str(sub))))
    if not out:
        raise ReportError(f'{root}: no experiment folders with {hierarchy.RESULTS_FILE} inside')
    order = {name: i for i, name in enumerate(TABLE1_ORDER)}
    return sorted(out, key=lambda item: (order.get(item[0], len(order)), item[0], item[1]['taxon']))

def table1_markdown(items, title='Table 1') -> str:
    """Table 1 layout: a row per configuration, FID and KID x100 with the detector named, the paper's FID beside."""
    records = [r for _, r in items]
    multi = len({r['taxon'] for r in records}) > 1
    header = (['configuration'] + (['taxon'] if multi else [])
              + ['images', 'kimg', 'FID', 'KID x 100', f'paper FID50k ({PAPER_DETECTOR})'])
    lines = [f'# {title}', '', _metric_summary(records, cells=''), '', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for name, r in items:
        _, fid = metric_value(r, 'fid')
        _, kid = metric_value(r, 'kid')
        paper = PAPER_TABLE1.get(name) if r['taxon'] == PAPER_TABLE1_TAXON else None
        row = [name] + ([r['taxon']] if multi else []) + [str(r.get('num_images', '-')), f'{r.get("kimg", 0):g}', _fmt(fid),
                                                          _fmt(None if kid is None else kid * 100), _fmt(paper)]
        lines.append('| ' + ' | '.join(row) + ' |')
    lines += [''] + _detector_note(records) + ['', _provenance(records), '']
    return '\n'.join(lines)

TABLE1_CSV_FIELDS = ('configuration', 'taxon', 'images', 'kimg', 'experiment', 'detector', 'fid_metric', 'fid', 'kid_metric',
                     'kid_x100', 'paper_fid50k_inception', 'date')

def table1_csv_rows(items) -> list[dict]:
    """One CSV row per configuration."""
    rows = []
    for name, r in items:
        fid_name, fid = metric_value(r, 'fid')
        kid_name, kid = metric_value(r, 'kid')
        rows.append(dict(configuration=name, taxon=r['taxon'], images=r.get('num_images'), kimg=r.get('kimg'),
                         experiment=os.path.basename(r['experiment_dir']), detector=r.get('detector'), fid_metric=fid_name or '',
                         fid=fid, kid_metric=kid_name or '', kid_x100=None if kid is None else kid * 100,
                         paper_fid50k_inception=PAPER_TABLE1.get(name) if r['taxon'] == PAPER_TABLE1_TAXON else None,
                         date=r.get('date')))
    return rows

#----------------------------------------------------------------------------
# Files.

def _csv_text(fields, rows) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator='\n')
    writer.writeheader()
    for row in rows:
        writer.writerow({k: '' if row.get(k) is None else (f'{row[k]:.6g}' if isinstance(row[k], float) else row[k])
                         for k in fields})
    return buf.getvalue()

def _save_png(image: Image.Image, path) -> None:
    save_png_atomic(image, str(path))

#----------------------------------------------------------------------------
# Image grids.

def _font(size=12):
    return ImageFont.load_default(size=size)

def _text_width(draw, text, font) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0]

def _to_rgb_image(array_chw, cell) -> Image.Image:
    """uint8 [C, H, W] -> RGB PIL image resized to cell x cell."""
    array = np.asarray(array_chw).transpose(1, 2, 0)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    image = Image.fromarray(np.ascontiguousarray(array), 'RGB')
    if image.size != (cell, cell):
        image = image.resize((cell, cell), Image.Resampling.BICUBIC if cell > image.size[0] else Image.Resampling.LANCZOS)
    return image

def real_images(data, num, seed=0) -> np.ndarray:
    """`num` real images of a dataset (a fixed random choice; repeats when it has fewer), uint8 [N, C, H, W]."""
    dataset = ImageFolderDataset(data, use_labels=False, cache=False)
    rnd = np.random.RandomState(seed)
    idx = rnd.permutation(len(dataset))[:num] if len(dataset) >= num else rnd.randint(len(dataset), size=num)
    images = np.stack([dataset[int(i)][0] for i in idx])
    dataset.close()
    return images

def generated_images(pkl, data, num, seed=0, device='cpu') -> np.ndarray:
    """`num` images of a pickle's G_ema (z from seeds seed..seed+num-1, psi 1, const noise), uint8 [N, C, H, W].

    A conditional generator draws the class of the dataset's first image (the derived per-child datasets hold one)."""
    G = evaluation_network(load_network_pkl(pkl)).eval().to(device)
    label = None
    if G.c_dim:
        dataset = ImageFolderDataset(data, use_labels=True, cache=False)
        label = dataset.get_label(0)
        dataset.close()
    return generate_images(G, list(range(seed, seed + num)), label=label, device=device).numpy()

def compose_grid(
    rows,                   # list of (label, uint8 [N, C, H, W]) drawn one row each
    title       = '',       # line above the grid
    cell        = None,     # pixels per image; None = the images' side, at least 64 and at most 256
    gap         = 2,        # pixels between images
) -> Image.Image:
    """Label column + one row of images per entry, white background."""
    font, title_font = _font(12), _font(14)
    probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    side = rows[0][1].shape[2]
    cell = cell or int(min(max(side, 64), 256))
    ncols = max(len(images) for _, images in rows)
    label_w = max(_text_width(probe, label, font) for label, _ in rows) + 12
    top = 24 if title else 4
    width = label_w + ncols * (cell + gap) + gap
    height = top + len(rows) * (cell + gap) + gap
    canvas = Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 4), title, fill='black', font=title_font)
    for r, (label, images) in enumerate(rows):
        y = top + gap + r * (cell + gap)
        draw.text((6, y + cell // 2 - 6), label, fill='black', font=font)
        for c, image in enumerate(images):
            canvas.paste(_to_rgb_image(image, cell), (label_w + gap + c * (cell + gap), y))
    return canvas

def _grid_entries(records, by_label):
    """[(taxon, [(row label, record)])] for the grids; by_label = row label of a record."""
    out = {}
    for record in records:
        out.setdefault(record['taxon'], []).append((by_label(record), record))
    return out

def write_grids(
    exp_dir,                # experiment folder: grid-<Taxon>.png and overview.png go here
    entries,                # {taxon: [(row label, record), ...]} (record['pkl'] relative to base_dir)
    base_dir    = None,     # folder the records' pkl paths are relative to; None = exp_dir
    num         = 8,        # images per row of a taxon's grid
    overview    = 4,        # images per block of the overview
    device      = 'cpu',    # torch device of the generators
) -> list[str]:
    """Per taxon a grid (real images, then each method's generated images) and one overview of all taxa."""
    written = []
    blocks = {}         # taxon -> {row label: images}, for the overview
    for taxon, items in entries.items():
        real = real_images(items[0][1]['data'], num)
        rows = [('real', real)]
        for label, record in items:
            pkl = Path(record.get('experiment_dir') or base_dir or exp_dir) / record['pkl']
            rows.append((label, generated_images(str(pkl), record['data'], num, device=device)))
        path = Path(exp_dir) / GRID_FILE.format(hierarchy.safe_name(taxon))
        _save_png(compose_grid(rows, title=f'{taxon} ({items[0][1].get("num_images", "?")} images): real, then generated'), path)
        written.append(str(path))
        blocks[taxon] = {label: images[:overview] for label, images in rows}
    if blocks:
        # One block of images per row label, in first-seen order; a taxon without that row gets white cells.
        labels = list(dict.fromkeys(label for row in blocks.values() for label in row))
        shape = next(iter(next(iter(blocks.values())).values())).shape
        blank = np.full([overview] + list(shape[1:]), 255, dtype=np.uint8)
        over_rows = [(taxon, np.concatenate([row.get(label, blank) for label in labels])) for taxon, row in blocks.items()]
        title = f'Blocks of {overview}: ' + ' | '.join(labels)
        image = compose_grid(over_rows, title=title, cell=min(max(shape[2], 64), 128))
        path = Path(exp_dir) / OVERVIEW_FILE
        _save_png(image, path)
        written.append(str(path))
    return written

def _detector_features(
    detector,               # stylegan2ada.metrics Detector
    images,                 # uint8 numpy [N, C, H, W]
    device,                 # torch device
) -> torch.Tensor:
    """float64 [N, D] features of images, 64 at a time."""
    return torch.from_numpy(np.concatenate([detector.features(torch.from_numpy(images[i:i + 64]), device)
                                            for i in range(0, len(images), 64)])).to(torch.float64)

def training_features(
    data,                   # the training images (dataset zip or folder)
    detector,               # stylegan2ada.metrics Detector
    device      = 'cpu',    # torch device
) -> tuple:
    """(uint8 [N, C, H, W] images, float64 [N, D] features) of every training image."""
    dataset = ImageFolderDataset(data, use_labels=False, cache=False)
    images = np.stack([dataset[i][0] for i in range(len(dataset))])                    # [N, C, H, W]
    dataset.close()
    return images, _detector_features(detector, images, device)

def closest_pairs(
    pkl,                    # network pickle (its G_ema)
    data,                   # the training images of its taxon (dataset zip or folder)
    detector,               # stylegan2ada.metrics Detector whose features measure closeness
    num         = 64,       # generated images searched (seeds 0..num-1, as the grids draw them)
    pairs       = 6,        # pairs returned
    device      = 'cpu',    # torch device of the generator and the detector
    training    = None,     # training_features(data, detector) when already computed; None = computed here
) -> list[tuple]:
    """The generated images nearest to a training image: [(generated uint8 [C, H, W], nearest training image, distance)],
    closest first (what a reader checks for copies of the few training images)."""
    generated = generated_images(pkl, data, num, device=device)                        # [num, C, H, W]
    images, feats = training if training is not None else training_features(data, detector, device)
    distances = torch.cdist(_detector_features(detector, generated, device), feats)   # [num, N]
    nearest, index = distances.min(dim=1)
    order = torch.argsort(nearest)[:pairs].tolist()
    return [(generated[i], images[int(index[i])], float(nearest[i])) for i in order]

def write_closest_pairs(
    exp_dir,                # experiment folder: closest-<Taxon>.png go here
    entries,                # {taxon: [(row label, record), ...]}: records whose metrics include a mem result
    num         = 64,       # generated images searched per network
    pairs       = 4,        # pairs per row
    device      = 'cpu',    # torch device
    cache_dir   = None,     # detector cache; None = the default
) -> list[str]:
    """Per taxon a grid of each method's closest pairs (generated | nearest training image), in the detector's
    features of its mem metric."""
    detectors, training = {}, {}        # spec -> Detector; (data, spec) -> training_features: once, not once per method
    written = []
    for taxon, items in entries.items():
        rows, spec = [], None
        for label, record in items:
            spec = record.get('detector') or 'inception'
            if spec not in detectors:
                detectors[spec] = resolve_detector(spec, cache_dir=cache_dir, progress=False)
            if (record['data'], spec) not in training:
                training[(record['data'], spec)] = training_features(record['data'], detectors[spec], device)
            pkl = Path(record.get('experiment_dir') or exp_dir) / record['pkl']
            found = closest_pairs(str(pkl), record['data'], detectors[spec], num=num, pairs=pairs, device=device,
                                  training=training[(record['data'], spec)])
            images = np.stack([image for gen, real, _ in found for image in (gen, real)])
            rows.append((f'{label} (d {found[0][2]:.3g}..{found[-1][2]:.3g})', images))
        path = Path(exp_dir) / CLOSEST_FILE.format(hierarchy.safe_name(taxon))
        _save_png(compose_grid(rows, title=f'{taxon}: the {pairs} generated images (of {num}) nearest to a training image, '
                                           f'each beside it ({detector_label(spec)} features)'), path)
        written.append(str(path))
    return written

#----------------------------------------------------------------------------
# Training curves.

def _read_jsonl(path) -> list[dict]:
    out = []
    try:
        with open(path, encoding='utf-8') as f:
            for line in f:
                try:
                    item = json.loads(line)
                except ValueError:
                    continue        # a line cut by a crash: the rest of the curve is still worth drawing
                if isinstance(item, dict):
                    out.append(item)
    except OSError:
        pass
    return out

def stage_curves(stage_dir, fid_metric) -> dict:
    """dict(augment=[(kimg, p)], fid=[(kimg, value)]) of one stage folder (stats.jsonl, metric-<fid_metric>.jsonl).

    A metric line has no kimg of its own: it is written just before the stats line of its tick, so it takes the kimg
    of the first stats line written after it (the last one for the evaluation after training)."""
    stats = _read_jsonl(Path(stage_dir) / 'stats.jsonl')
    augment = [(s['Progress/kimg'], s.get('Progress/augment', 0.0)) for s in stats if 'Progress/kimg' in s]
    fid = []
    if fid_metric:
        for line in _read_jsonl(Path(stage_dir) / f'metric-{fid_metric}.jsonl'):
            value = line.get('results', {}).get(fid_metric)
            if value is None:
                continue
            after = [s['Progress/kimg'] for s in stats
                     if s.get('timestamp', 0) >= line.get('timestamp', 0) and 'Progress/kimg' in s]
            kimg = after[0] if after else (augment[-1][0] if augment else 0.0)
            fid.append((kimg, value))
    return dict(augment=augment, fid=sorted(fid))

def write_curves(
    exp_dir,                            # experiment folder (curves.png, .pdf, .svg go here)
    stages,                             # [(label, stage folder, fid metric name)]
    path            = None,             # output file; None = exp_dir/curves.png (other formats beside it)
    formats         = FIGURE_FORMATS,   # file formats written
) -> Chart | None:
    """FID and augment p over kimg, one line per stage; None when no stage has statistics."""
    data = [(label, stage_curves(folder, metric)) for label, folder, metric in stages]
    data = [(label, d) for label, d in data if d['augment'] or d['fid']]
    if not data:
        return None
    series = [dict(panel=panel, label=label, x=[x for x, _ in d[panel]], y=[y for _, y in d[panel]])
              for panel in ('fid', 'augment') for label, d in data if d[panel]]
    metric_names = sorted({m for _, _, m in stages if m})
    figure = new_figure(9, 7.5)
    fid_ax, p_ax = figure.subplots(2, 1)
    axes = {'fid': fid_ax, 'augment': p_ax}
    color = {label: f'C{i % 10}' for i, (label, _) in enumerate(data)}     # a stage keeps its colour in both panels
    for item in series:
        axes[item['panel']].plot(item['x'], item['y'], color=color[item['label']], marker='o', markersize=3, linewidth=1.5)
    fid_ax.set_title(f'FID over training ({", ".join(metric_names) or "no FID metric"}; points: evaluations)', loc='left')
    fid_ax.set_ylabel('FID')
    p_ax.set_title('ADA augmentation probability p', loc='left')
    p_ax.set_ylabel('p')
    p_ax.set_ylim(bottom=0)
    for ax in axes.values():
        ax.set_xlabel('kimg of the stage')
        ax.set_xlim(left=0)
        ax.grid(True, color='0.9')
    figure.legend(handles=_stage_handles([label for label, _ in data]), loc='outside lower left',
                  ncols=2 if len(data) > 4 else 1, frameon=False)
    return Chart(save_figure(figure, Path(path) if path else Path(exp_dir) / CURVES_FILE, formats), series)

#----------------------------------------------------------------------------
# Whole reports.

def write_report(
    exp_dir,                # experiment folder of train_hier.py
    grids       = True,     # write the image grids
    curves      = True,     # write the training curves
    num_images  = 8,        # images per grid row
    device      = 'cpu',    # torch device for the grids
    title       = None,     # table title; None = the folder name
) -> list[str]:
    """table.md, table.csv, grid-<Taxon>.png, overview.png and curves.png of an experiment; returns the paths."""
    exp_dir = Path(exp_dir)
    records = current_records(exp_dir)
    if not records:
        raise ReportError(f'{exp_dir / hierarchy.RESULTS_FILE}: no current records')
    written = []
    useful = current_utility(exp_dir)
    write_text_atomic(exp_dir / 'table.md', hier_markdown(records, title or f'Experiment {exp_dir.resolve().name}', useful))
    write_text_atomic(exp_dir / 'table.csv', _csv_text(CSV_FIELDS, hier_csv_rows(records, useful)))
    written += [str(exp_dir / 'table.md'), str(exp_dir / 'table.csv')]
    chart = write_gain_chart(useful, exp_dir / GAIN_FILE)
    if chart:
        written += chart.paths
    if grids:
        order = {key: i for i, key in enumerate(_sort_columns(column_key(r) for r in records))}
        taxa = _taxon_order(records)
        entries = _grid_entries(sorted(records, key=lambda r: (taxa.index(r['taxon']), order[column_key(r)])),
                                lambda r: column_label(column_key(r)))
        written += write_grids(exp_dir, entries, num=num_images, device=device)
        copying = {taxon: [(label, r) for label, r in items if knn_value(r, 'mem', '_share')[0]] for taxon, items in entries.items()}
        written += write_closest_pairs(exp_dir, {taxon: items for taxon, items in copying.items() if items}, device=device)
    if curves:
        stages = {}
        for r in records:
            stages.setdefault(r['stage'], (chain_label(r), str(exp_dir / r['stage']), metric_value(r, 'fid')[0]))
        chart = write_curves(exp_dir, list(stages.values()))
        if chart:
            written += chart.paths
    return written

def write_table1_report(
    root,                   # folder of Table 1 experiments (one sub-folder per configuration)
    grids       = True,     # write grid-<Taxon>.png with a row per configuration
    curves      = True,     # write curves.png with a line per configuration
    num_images  = 8,        # images per grid row
    device      = 'cpu',    # torch device for the grids
) -> list[str]:
    """table.md and table.csv in the paper's Table 1 layout (plus grids and curves) under `root`."""
    root = Path(root)
    items = table1_records(root)
    written = [str(root / 'table.md'), str(root / 'table.csv')]
    taxa = ', '.join(dict.fromkeys(r['taxon'] for _, r in items))
    write_text_atomic(root / 'table.md', table1_markdown(items, title=f'Table 1: {taxa}, one network per configuration'))
    write_text_atomic(root / 'table.csv', _csv_text(TABLE1_CSV_FIELDS, table1_csv_rows(items)))
    if grids:
        entries = {}
        for name, record in items:
            entries.setdefault(record['taxon'], []).append((name, record))
        written += write_grids(root, entries, num=num_images, device=device)
    if curves:
        stages = [(name, str(Path(r['experiment_dir']) / r['stage']), metric_value(r, 'fid')[0]) for name, r in items]
        chart = write_curves(root, stages)
        if chart:
            written += chart.paths
    return written

#----------------------------------------------------------------------------
# Command line.

@click.command(cls=cli.Command)
# Main options.
@click.argument('exp_dir', metavar='DIR', type=str)
@click.option('--layout',     help='Experiment layout: a train_hier.py folder, or a folder of Table 1 runs (auto: by what is there)',
              type=click.Choice(['auto', 'hier', 'table1']), default='auto', show_default=True)
# I/O-related.
@click.option('--grids/--no-grids',   help='Write the image grids', default=True, show_default=True)
@click.option('--curves/--no-curves', help='Write the training curves', default=True, show_default=True)
@click.option('--num',        help='Images per grid row', metavar='INT', type=click.IntRange(min=1, max=64), default=8, show_default=True)
# Performance-related.
@click.option('--device',     help='Device for generating grid images', type=click.Choice(['cpu', 'cuda']), default='cpu', show_default=True)
def main(**kwargs):
    """Write table.md, table.csv, grids and curves of an experiment folder.

    \b
    Examples:
    python -m taxogan_ext.report runs/copepoda
    python -m taxogan_ext.report runs/table1 --layout table1
    """
    c = dict(kwargs)
    exp_dir = Path(c['exp_dir'])
    if not exp_dir.is_dir():
        raise ReportError(f'{exp_dir}: no such folder')
    device = cli.pick_device(c['device'])
    layout = c['layout']
    if layout == 'auto':
        layout = 'hier' if (exp_dir / hierarchy.RESULTS_FILE).is_file() else 'table1'
    if layout == 'hier':
        written = write_report(exp_dir, grids=c['grids'], curves=c['curves'], num_images=c['num'], device=device)
    else:
        written = write_table1_report(exp_dir, grids=c['grids'], curves=c['curves'], num_images=c['num'], device=device)
    for path in written:
        click.echo(f'wrote {path}')

if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
