"""Hierarchical transfer plans: direct, lateral, descending and conditional training along the taxonomy.

A plan is an ordered list of stages. A stage trains one network on one taxon's dataset, starting from
scratch, from another stage's final pickle, or from a given pickle, and is then evaluated. Stages that
several methods or targets need appear once: the Copepoda stage feeds all four orders, and the direct
Calanoida stage is also the lateral donor.

Running a plan (`run_plan`) skips a stage whose final pickle and evaluation record exist, resumes an
interrupted stage from its newest snapshot, and reruns a stage whose inputs changed (dataset hash,
training options, starting pickle), moving the old folder to `OUTDIR/superseded/` instead of reusing it.
Training itself is passed in as a function (train_hier.py passes train.py's), so this module needs no CLI.

Building (`build_plan`): the arguments are checked, then each (method, target) adds its rows (`_lateral_rows`,
`_descending_rows`, `_conditional_rows`) and the stages they need to a `_StageBook`, which keeps each stage once.
Running (`run_plan`): for each stage in order, its current state (`inspect_stage`, from where it starts:
`stage_start_pkl`, `stage_start_sha256`), then `_PlanRun.train` and `_PlanRun.evaluate` as the state asks.
"""

import contextlib
import copy
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import time
import zipfile
from pathlib import Path

import tqdm

from stylegan2ada.dataset import IMAGE_EXTENSIONS
from stylegan2ada.metrics import metric_main
from stylegan2ada.metrics.detectors import DetectorError, resolve_detector
from stylegan2ada.pickles import evaluation_network, load_network_pkl
from stylegan2ada.training_loop import latest_snapshot
from stylegan2ada.util import UserError, atomic_write, parse_list, sha256_file, write_json_atomic  # noqa: F401  (parse_list: hierarchy.parse_list for its callers)
# Plug-ins evaluate_pickle needs: the DCGAN baseline's classes (its pickles load), the taxon detector and acc metrics.
from taxogan_ext import dcgan, taxon_metrics  # noqa: F401

METHODS         = ('direct', 'lateral', 'descending', 'conditional')
STAGE_FILE      = 'stage.json'
RESULTS_FILE    = 'results.jsonl'
PLAN_FILE       = 'plan.json'
LOCK_FILE       = '.train_hier.lock'
LOCK_FD_ENV     = 'TAXOGAN_HIER_LOCK_FD'   # set by the parallel driver for its stage processes: its lock's inherited fd
DERIVED_DIR     = '_data'           # labelled per-child zips of the conditional method
SUPERSEDED_DIR  = 'superseded'      # stage folders whose inputs changed
STAGE_FORMAT    = 'taxogan-stage/1'
RESULTS_FORMAT  = 'taxogan-results/1'
PLAN_FORMAT     = 'taxogan-plan/1'

# train.py options that change how a run is reported or scheduled, not the network it produces:
# changing them never makes a finished stage stale.
NON_RESULT_OPTIONS = ('snap', 'tick', 'workers', 'nobench', 'cuda_graphs', 'metrics', 'detector', 'device', 'keep_snaps',
                      'no_space_check')
# Options that only make sense when a stage starts from a trained network (Freeze-D on a random D freezes noise;
# a partial transfer needs something to transfer from).
FINETUNE_ONLY_OPTIONS = ('freezed', 'resume_partial')

#----------------------------------------------------------------------------

class PlanError(UserError):
    """A plan that cannot be built or run; one line naming the problem."""

#----------------------------------------------------------------------------
# Plan data.

@dataclasses.dataclass(frozen=True)
class DerivedData:
    """A child's images relabelled as one class of its parent's conditional network (conditional method)."""
    path:           str                 # zip written at run time
    source:         str                 # the child's own dataset zip
    source_sha256:  str                 # manifest hash of `source`
    label_names:    tuple[str, ...]     # the parent's classes
    label:          int                 # class index of the child

@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluation of a stage's network: against the real images of `taxon`."""
    taxon:          str
    data:           str                 # dataset of the real images (and of the labels drawn for a conditional G)
    num_images:     int
    derived:        DerivedData | None  # set when `data` is made from the child's zip at run time

@dataclasses.dataclass(frozen=True)
class Stage:
    """One training run of a plan."""
    key:            str                 # unique name; also the folder OUTDIR/<key>
    taxon:          str                 # taxon of the training set
    method:         str                 # direct, lateral, descending, finetune, conditional, conditional-ft
    source:         str | None          # taxon the transfer starts from (donor, top of the chain, parent set); None: scratch
    origin:         str | None          # file name of the --resume pickle at the start of the chain; None: none
    chain:          tuple[str, ...]     # taxa the weights went through, this stage's taxon last
    data:           str                 # training dataset path
    data_sha256:    str                 # hash of the training data as the manifest gives it
    num_images:     int                 # images of the training set
    cond:           bool                # class-conditional training (labels of the dataset)
    start_kind:     str                 # 'scratch', 'stage' or 'pickle'
    start:          str | None          # key of the start stage, or the pickle path; None for scratch
    kimg:           float               # training length
    train_options:  dict                # train.py options that differ from its defaults (no data/kimg/resume)
    overrides:      dict                # engine config values set after train.py builds its config (e.g. ema_kimg)
    evaluations:    tuple[Evaluation, ...]
    derived:        DerivedData | None  # the training zip is derived (conditional fine-tuning)

    @property
    def label(self) -> str:
        """'Copepoda > Calanoida' (with the pickle first when the chain starts from one)."""
        return ' > '.join(([self.origin] if self.origin else []) + list(self.chain)) + (' [cond]' if self.cond else '')

@dataclasses.dataclass(frozen=True)
class Row:
    """What the plan produces for one (method, target): the stage evaluated on the target, or a note why none."""
    method:         str
    target:         str
    stage:          str | None
    note:           str = ''

@dataclasses.dataclass
class Plan:
    """Stages in run order (every stage after the one it starts from) and the rows they answer."""
    stages:         list[Stage]
    rows:           list[Row]
    methods:        list[str]
    targets:        list[str]
    datasets:       str                 # the datasets folder
    outdir:         str

    def stage(self, key: str) -> Stage:
        """The stage called `key`."""
        for stage in self.stages:
            if stage.key == key:
                return stage
        raise KeyError(key)

    def to_dict(self) -> dict:
        """JSON-ready description (written to OUTDIR/plan.json)."""
        return dict(format=PLAN_FORMAT, datasets=self.datasets, methods=list(self.methods), targets=list(self.targets),
                    stages=[dataclasses.asdict(s) for s in self.stages], rows=[dataclasses.asdict(r) for r in self.rows])

#----------------------------------------------------------------------------
# Building a plan.

def safe_name(name: str) -> str:
    """A taxon or file stem as a file-name part: anything but letters, digits and ._()+- becomes _."""
    return re.sub(r'[^A-Za-z0-9._()+-]', '_', name)

def parse_metrics(text, option: str = '--metrics') -> list[str]:
    """Metric names of a comma list; 'none' (or nothing) = no evaluation, as train.py's --metrics none."""
    names = parse_list(text)
    if 'none' in names and len(names) > 1:
        raise PlanError(f'{option} {text}: none means no metrics and cannot be combined with metric names')
    return [] if names == ['none'] else names

def default_donor(manifest, target: str) -> str | None:
    """The taxon with the most images among the target's parent's children (ties: first by name)."""
    parent = manifest.parent(target)
    group = manifest.roots() if parent is None else manifest.children(parent)
    if not group:
        return None
    return max(sorted(group), key=lambda name: manifest.num_images(name))

def descending_chain(
    manifest,                   # taxonomy.Manifest
    target:     str,            # last taxon of the chain
    parent:     str | None,     # top of the chain; None = the `depth`-th ancestor
    depth:      int | None,     # levels above the target; None = 1, or whatever `parent` implies
) -> list[str]:
    """Taxa from the top of the descending chain down to the target, e.g. [Copepoda, Calanoida, Calanidae]."""
    ancestors = manifest.ancestors(target)          # nearest first
    if parent is not None:
        if parent not in ancestors:
            raise PlanError(f'--parent {parent} is not an ancestor of {target} '
                            f'(its ancestors: {", ".join(ancestors) or "none"})')
        levels = ancestors.index(parent) + 1
        if depth is not None and depth != levels:
            raise PlanError(f'--depth {depth} disagrees with --parent {parent}, which is {levels} level(s) above {target}')
    else:
        levels = 1 if depth is None else depth
        if levels > len(ancestors):
            raise PlanError(f'--depth {levels}: {target} has only {len(ancestors)} ancestor(s) in the manifest')
    return list(reversed(ancestors[:levels])) + [target]

def _parse_methods(methods) -> list[str]:
    """Methods of a comma list (or 'all') in METHODS' order, direct stages first; PlanError for an unknown one."""
    methods = list(METHODS) if methods in ('all', ['all'], ('all',)) else parse_list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise PlanError(f'unknown method(s) {", ".join(unknown) or "(none)"}; choose from {", ".join(METHODS)} or all')
    return [m for m in METHODS if m in methods]

def _plan_targets(
    manifest,                   # taxonomy.Manifest
    targets,                    # comma list or list of taxa; None = the children of `parent` (or of the single root)
    parent:     str | None,     # top of the descending chains
) -> list[str]:
    """The taxa a plan produces, checked against the manifest."""
    targets = parse_list(targets)
    if not targets:
        top = parent
        if top is None:
            roots = manifest.roots()
            if len(roots) != 1:
                raise PlanError(f'the manifest has {len(roots)} roots ({", ".join(roots)}); name --parent or --targets')
            top = roots[0]
        targets = manifest.children(top)
        if not targets:
            raise PlanError(f'{top} has no child taxa in the manifest; name --targets')
    for target in targets:
        manifest.taxon(target)                                # ManifestError for an unknown name
    if len(set(targets)) != len(targets):
        raise PlanError(f'--targets names a taxon twice: {", ".join(targets)}')
    return targets

class _StageBook:
    """The stages of a plan being built, in run order; a stage several rows need is added once."""

    def __init__(self,
        manifest,                       # taxonomy.Manifest
        outdir,                         # experiment folder (derived zips go below it)
        resume_pkl,                     # pickle at the start of every chain; None = scratch
        kimg_parent,                    # kimg of a stage trained from scratch
        kimg_child,                     # kimg of a stage that starts from a network
        train_options,                  # train.py options of every stage; None = none
        overrides,                      # engine config values of every stage; None = none
    ):
        self.manifest = manifest
        self.derived_dir = os.path.join(str(outdir), DERIVED_DIR)
        self.resume_pkl = resume_pkl
        self.origin = os.path.basename(resume_pkl) if resume_pkl is not None else None
        self.kimg_parent = kimg_parent
        self.kimg_child = kimg_child
        self.options = dict(train_options or {})
        self.overrides = dict(overrides or {})
        self.fields = {}                # key -> dict of Stage fields (evaluations still a list), in run order

    def stages(self) -> list[Stage]:
        """The stages, frozen."""
        return [Stage(**dict(fields, evaluations=tuple(fields['evaluations']))) for fields in self.fields.values()]

    def _stage_options(self, start_kind: str) -> dict:
        # Fine-tuning options are left out of a stage that starts from random weights.
        return {k: v for k, v in self.options.items() if not (start_kind == 'scratch' and k in FINETUNE_ONLY_OPTIONS)}

    def _evaluation(self, taxon: str) -> Evaluation:
        return Evaluation(taxon=taxon, data=str(self.manifest.dataset_path(taxon)),
                          num_images=self.manifest.num_images(taxon), derived=None)

    def _add(self, key: str, **fields) -> str:
        if key not in self.fields:
            self.fields[key] = dict(key=key, **fields)
        return key

    def root_stage(self, taxon: str, cond: bool = False) -> str:
        """The stage that starts a chain on `taxon`: from scratch, or from --resume."""
        m, resume_pkl = self.manifest, self.resume_pkl
        name = safe_name(taxon + ('-cond' if cond else ''))
        start_kind = 'scratch' if resume_pkl is None else 'pickle'
        key = name if resume_pkl is None else f'from-{safe_name(Path(resume_pkl).stem)}__{name}'
        method = 'conditional' if cond else ('direct' if resume_pkl is None else 'finetune')
        return self._add(key, taxon=taxon, method=method, source=(taxon if cond else None), origin=self.origin,
                         chain=(taxon,), data=str(m.dataset_path(taxon)), data_sha256=m.sha256(taxon),
                         num_images=m.num_images(taxon), cond=cond, start_kind=start_kind, start=resume_pkl,
                         kimg=float(self.kimg_parent if resume_pkl is None else self.kimg_child),
                         train_options=self._stage_options(start_kind), overrides=self.overrides,
                         evaluations=[] if cond else [self._evaluation(taxon)], derived=None)

    def child_stage(self, start_key: str, taxon: str, method: str, source: str) -> str:
        """The stage that trains `taxon` from the final network of stage `start_key`."""
        m = self.manifest
        return self._add(f'{start_key}__{safe_name(taxon)}', taxon=taxon, method=method, source=source, origin=self.origin,
                         chain=self.fields[start_key]['chain'] + (taxon,), data=str(m.dataset_path(taxon)),
                         data_sha256=m.sha256(taxon), num_images=m.num_images(taxon), cond=False, start_kind='stage',
                         start=start_key, kimg=float(self.kimg_child), train_options=self._stage_options('stage'),
                         overrides=self.overrides, evaluations=[self._evaluation(taxon)], derived=None)

    def child_as_class(self, cond_key: str, target: str, up: str, labels: list[str]) -> Evaluation:
        """The evaluation of conditional stage `cond_key` on `target`, one class of its parent `up` (added once)."""
        derived = DerivedData(path=os.path.join(self.derived_dir, f'{safe_name(target)}-as-{safe_name(up)}-class.zip'),
                              source=str(self.manifest.dataset_path(target)), source_sha256=self.manifest.sha256(target),
                              label_names=tuple(labels), label=labels.index(target))
        ev = Evaluation(taxon=target, data=derived.path, num_images=self.manifest.num_images(target), derived=derived)
        if ev not in self.fields[cond_key]['evaluations']:
            self.fields[cond_key]['evaluations'].append(ev)
        return ev

    def conditional_finetune_stage(self, cond_key: str, ev: Evaluation, up: str) -> str:
        """The stage that fine-tunes conditional stage `cond_key` on the child of evaluation `ev` (labelled as its class)."""
        target, derived = ev.taxon, ev.derived
        return self._add(f'{cond_key}__{safe_name(target)}', taxon=target, method='conditional-ft', source=up,
                         origin=self.origin, chain=self.fields[cond_key]['chain'] + (target,), data=derived.path,
                         data_sha256=derived.source_sha256, num_images=ev.num_images, cond=True, start_kind='stage',
                         start=cond_key, kimg=float(self.kimg_child), train_options=self._stage_options('stage'),
                         overrides=self.overrides, evaluations=[ev], derived=derived)

def _lateral_rows(book: _StageBook, target: str, donor: str | None) -> list[Row]:
    """Lateral: `target` fine-tuned from its donor sibling (the sibling with the most images unless named)."""
    chosen = donor if donor is not None else default_donor(book.manifest, target)
    siblings = book.manifest.siblings(target)
    if chosen == target:
        return [Row('lateral', target, None, 'is the donor')]
    if chosen is None or chosen not in siblings:
        raise PlanError(f'lateral: the donor {chosen} is not a sibling of {target} '
                        f'(siblings: {", ".join(siblings) or "none"})')
    return [Row('lateral', target, book.child_stage(book.root_stage(chosen), target, 'lateral', chosen))]

def _descending_rows(book: _StageBook, target: str, parent: str | None, depth: int | None) -> list[Row]:
    """Descending: a chain of stages from an ancestor down to `target`, each starting from the one above."""
    chain = descending_chain(book.manifest, target, parent, depth)
    key = book.root_stage(chain[0])
    for taxon in chain[1:]:
        key = book.child_stage(key, taxon, 'descending', chain[0])
    return [Row('descending', target, key)]

def _conditional_rows(book: _StageBook, target: str, cond_finetune: bool) -> list[Row]:
    """Conditional: the parent's network conditioned on its children, evaluated on `target`'s class (and fine-tuned)."""
    up = book.manifest.parent(target)
    if up is None:
        raise PlanError(f'conditional: {target} has no parent taxon whose dataset could hold it as a class')
    labels = book.manifest.labels(up)
    if not labels or target not in labels:
        raise PlanError(f'conditional: the {up} dataset has no class {target} '
                        f'(its labels: {", ".join(labels or []) or "none"}); rebuild the datasets with both ranks')
    cond_key = book.root_stage(up, cond=True)
    ev = book.child_as_class(cond_key, target, up, labels)
    rows = [Row('conditional', target, cond_key)]
    if cond_finetune:
        rows.append(Row('conditional-ft', target, book.conditional_finetune_stage(cond_key, ev, up)))
    return rows

def build_plan(
    manifest,                           # taxonomy.Manifest of the datasets folder
    outdir,                             # experiment folder (the conditional method writes derived zips under it)
    methods,                            # list of METHODS (or 'all')
    targets         = None,             # taxa to produce; None = the children of `parent` (or of the single root)
    parent          = None,             # top of the descending chains; None = `depth` levels above each target
    donor           = None,             # lateral donor; None = the sibling with the most images
    depth           = None,             # descending: levels above each target; None = 1 (or what `parent` implies)
    resume_pkl      = None,             # pickle that replaces "from scratch" at the start of every chain; None = scratch
    kimg_parent     = 1000.0,           # kimg of every stage trained from scratch (parents, donors, direct runs)
    kimg_child      = 500.0,            # kimg of every stage that starts from a network (fine-tuning)
    train_options   = None,             # train.py options (non-default ones) given to every stage; None = none
    overrides       = None,             # engine config values for every stage that train.py has no option for; None = none
    cond_finetune   = False,            # conditional: also fine-tune the conditional network on each child
) -> Plan:
    """Stages and rows of an experiment; raises PlanError (or taxonomy.ManifestError) on bad input."""
    methods = _parse_methods(methods)
    if not (kimg_parent > 0 and kimg_child > 0):
        raise PlanError(f'--kimg-parent and --kimg-child must be > 0 (got {kimg_parent}, {kimg_child})')
    if depth is not None and depth < 1:
        raise PlanError(f'--depth must be >= 1, got {depth}')
    if parent is not None:
        manifest.taxon(parent)                                # ManifestError for an unknown name
    targets = _plan_targets(manifest, targets, parent)
    if donor is not None:
        manifest.taxon(donor)
    if resume_pkl is not None and not os.path.isfile(resume_pkl):
        raise PlanError(f'--resume {resume_pkl}: no such file')

    book = _StageBook(manifest, outdir, resume_pkl, kimg_parent, kimg_child, train_options, overrides)
    rows = []
    for method in methods:
        for target in targets:
            if method == 'direct':
                rows.append(Row('direct', target, book.root_stage(target)))
            elif method == 'lateral':
                rows += _lateral_rows(book, target, donor)
            elif method == 'descending':
                rows += _descending_rows(book, target, parent, depth)
            elif method == 'conditional':
                rows += _conditional_rows(book, target, cond_finetune)
    return Plan(stages=book.stages(), rows=rows, methods=methods, targets=targets, datasets=str(manifest.root),
                outdir=str(outdir))

#----------------------------------------------------------------------------
# Fingerprints and the state of a stage folder.

def stage_inputs(
    stage:          Stage,
    start_sha256:   str | None,     # hash of the starting pickle; None for scratch
) -> dict:
    """What a stage's result depends on (its fingerprint is the hash of this)."""
    options = {k: v for k, v in sorted(stage.train_options.items()) if k not in NON_RESULT_OPTIONS}
    derived = None
    if stage.derived is not None:
        derived = dict(label_names=list(stage.derived.label_names), label=stage.derived.label)
    inputs = dict(taxon=stage.taxon, data_sha256=stage.data_sha256, derived=derived, cond=stage.cond, kimg=stage.kimg,
                  options=options, start=dict(kind=stage.start_kind, sha256=start_sha256))
    if stage.overrides:
        inputs['overrides'] = dict(sorted(stage.overrides.items()))     # absent when empty: older records stay current
    return inputs

def fingerprint(inputs: dict) -> str:
    """Hash of stage_inputs()."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode('utf-8')).hexdigest()[:32]

def describe_change(old: dict | None, new: dict) -> str:
    """Which inputs differ, in words ('dataset changed', 'options changed (gamma: 1 -> 2)', ...)."""
    if not isinstance(old, dict):
        return 'no record of its inputs'
    changes = []
    if old.get('data_sha256') != new['data_sha256'] or old.get('derived') != new['derived']:
        changes.append('dataset changed')
    for key in ('options', 'overrides'):
        if (old.get(key) or {}) != (new.get(key) or {}):
            a, b = old.get(key) or {}, new.get(key) or {}
            diff = [f'{k}: {a.get(k, "default")} -> {b.get(k, "default")}' for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            changes.append(f'{key} changed ({", ".join(diff)})')
    if old.get('kimg') != new['kimg']:
        changes.append(f'kimg {old.get("kimg")} -> {new["kimg"]}')
    if old.get('start') != new['start']:
        changes.append('starting network changed')
    if old.get('cond') != new['cond'] or old.get('taxon') != new['taxon']:
        changes.append('stage definition changed')
    return ', '.join(changes) or 'inputs changed'

def read_json(path) -> dict | None:
    """Parsed JSON object at `path`, or None when missing or unreadable."""
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

def read_results(path) -> list[dict]:
    """Records of a results.jsonl (missing file: none); raises PlanError naming a malformed line."""
    records = []
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.readlines()
    except FileNotFoundError:
        return records
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise PlanError(f'{path}:{number}: not valid JSON ({exc}); remove the line to continue') from None
        if not isinstance(record, dict) or 'stage' not in record or 'taxon' not in record:
            raise PlanError(f'{path}:{number}: not a results record (needs "stage" and "taxon")')
        records.append(record)
    return records

def append_record(path, record: dict) -> None:
    """Append one JSON line with a single write, so a reader never sees half a record."""
    # One os.write on an O_APPEND descriptor: stage processes of a parallel run append side by side.
    data = (json.dumps(record) + '\n').encode('utf-8')
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        written = os.write(fd, data)
    finally:
        os.close(fd)
    if written != len(data):
        raise OSError(f'{path}: short append ({written} of {len(data)} bytes)')

def snapshot_nimg(pkl) -> int:
    """Training progress (images) stored in one of our snapshots; 0 for a pickle without progress."""
    progress = load_network_pkl(pkl).get('progress')
    return int(progress['cur_nimg']) if progress else 0

@dataclasses.dataclass
class StageState:
    """Where a stage stands in its folder."""
    status:         str             # done, evaluate, resume, rerun, todo, waiting
    detail:         str             # in words, for the dry run
    fingerprint:    str | None      # None while the start stage is not finished
    inputs:         dict | None
    done_kimg:      float = 0.0     # progress of the newest snapshot (resume)
    snapshot:       str | None = None   # newest snapshot (resume)
    final_pkl:      str | None = None   # final pickle (done, evaluate)

def detector_identity(detector) -> str | None:
    """Content identity of a detector file (taxon:PATH or PATH), so that a retrained detector is noticed; None for
    'inception' (one fixed published file) and for files that do not exist."""
    if detector == 'inception':
        return None
    try:
        return resolve_detector(detector).id
    except DetectorError:
        return None


def _evaluated_taxa(records, stage_key, fp, metrics, detector, detector_id) -> set[str]:
    """Taxa for which results hold a record of this stage (these inputs) with these metrics and this detector.

    With no metrics asked for (--metrics none), any record of the stage's inputs will do: a record without metrics
    must not be written after, and so hide in the report, one that has them."""
    if not metrics:
        return {r['taxon'] for r in records if r.get('stage') == stage_key and r.get('fingerprint') == fp}
    return {r['taxon'] for r in records
            if r.get('stage') == stage_key and r.get('fingerprint') == fp and r.get('requested_metrics') == list(metrics)
            and r.get('detector') == detector and (detector_id is None or r.get('detector_id') == detector_id)}


def _evaluated(records, stage, fp, metrics, detector, detector_id=None) -> bool:
    """True when results hold a record of every evaluation of the stage, with these inputs, metrics and detector."""
    return {ev.taxon for ev in stage.evaluations} <= _evaluated_taxa(records, stage.key, fp, metrics, detector, detector_id)

def inspect_stage(
    stage:          Stage,
    outdir,                         # experiment folder
    start_sha256:   str | None,     # hash of the starting pickle; None: scratch, or the start is not finished
    start_ready:    bool,           # False while the start stage still has to be trained
    records:        list,           # results.jsonl records
    metrics:        list,           # evaluation metrics asked for
    detector:       str,            # detector asked for
    read_progress:  bool = True,    # load the newest snapshot to report its kimg (a dry run of big pickles may skip it)
    detector_id:    str | None = None,  # detector_identity(detector); None = compare the detector spec only
) -> StageState:
    """The status of a stage: what running the plan would do with it."""
    folder = Path(outdir) / stage.key
    if not start_ready:
        return StageState('waiting', f'after {stage.start}', None, None)
    inputs = stage_inputs(stage, start_sha256)
    fp = fingerprint(inputs)
    record = read_json(folder / STAGE_FILE)
    has_files = folder.is_dir() and any(folder.iterdir())
    if not has_files:
        return StageState('todo', 'to train', fp, inputs)
    if record is None or record.get('fingerprint') != fp:
        why = describe_change(record.get('inputs') if record else None, inputs)
        return StageState('rerun', f'rerun: {why}', fp, inputs)
    final = record.get('final_pkl')
    if record.get('state') == 'trained' and final and (folder / final).is_file():
        final_path = str(folder / final)
        if _evaluated(records, stage, fp, metrics, detector, detector_id):
            return StageState('done', 'done', fp, inputs, done_kimg=stage.kimg, final_pkl=final_path)
        return StageState('evaluate', 'trained; to evaluate', fp, inputs, done_kimg=stage.kimg, final_pkl=final_path)
    snapshot = latest_snapshot(str(folder))
    if snapshot is None:
        return StageState('todo', 'to train (no snapshot yet)', fp, inputs)
    done_kimg = snapshot_nimg(snapshot) / 1000 if read_progress else 0.0
    return StageState('resume', f'interrupted at {done_kimg:g} of {stage.kimg:g} kimg; resumes', fp, inputs,
                      done_kimg=done_kimg, snapshot=snapshot)

def final_sha256(outdir, stage_key: str) -> str | None:
    """Hash of a finished stage's final pickle (kept in its stage.json, recomputed when the file changed)."""
    folder = Path(outdir) / stage_key
    record = read_json(folder / STAGE_FILE)
    if not record or record.get('state') != 'trained' or not record.get('final_pkl'):
        return None
    path = folder / record['final_pkl']
    if not path.is_file():
        return None
    stat = path.stat()
    if record.get('final_size') == stat.st_size and record.get('final_mtime_ns') == stat.st_mtime_ns and record.get('final_sha256'):
        return record['final_sha256']
    return sha256_file(path)

def stage_start_pkl(
    stage:      Stage,
    outdir,                         # experiment folder
    final       = True,             # a start stage's final pickle (read from its stage.json; it must be trained);
                                    # False = its folder, where that pickle will be (to check options before training)
) -> str | None:
    """Where a stage starts from: None (scratch), the --resume pickle, or its start stage's final pickle."""
    if stage.start_kind == 'scratch':
        return None
    if stage.start_kind == 'pickle':
        return stage.start
    folder = Path(outdir) / stage.start
    if not final:
        return str(folder)
    return str(folder / read_json(folder / STAGE_FILE)['final_pkl'])

def stage_start_sha256(stage: Stage, outdir) -> str | None:
    """Hash of the pickle a stage starts from; None for scratch, or while its start stage has no final pickle."""
    if stage.start_kind == 'scratch':
        return None
    if stage.start_kind == 'pickle':
        return sha256_file(stage.start)
    return final_sha256(outdir, stage.start)

@dataclasses.dataclass(frozen=True)
class RowGenerator:
    """The network that answers one (method, target) row: a stage's final pickle, and the target's class in it."""
    stage:      str                     # stage key
    pkl:        str                     # its final pickle
    sha256:     str                     # the pickle's hash
    label:      int | None              # class of the target in a conditional network; None = unconditional

def row_generators(plan: Plan, outdir) -> dict[str, dict[str, RowGenerator]]:
    """{row method: {target: RowGenerator}} of the rows whose stage is trained. A lateral row whose target is the donor
    takes the donor's own stage (the network the method would use for that taxon); rows still untrained are left out."""
    out = {}
    for row in plan.rows:
        key = row.stage
        if key is None:
            key = next((s.key for s in plan.stages if s.taxon == row.target and s.start_kind != 'stage' and not s.cond), None)
        sha = final_sha256(outdir, key) if key is not None else None
        if sha is None:
            continue
        stage = plan.stage(key)
        folder = Path(outdir) / key
        label = None
        if stage.cond:
            ev = next(ev for ev in stage.evaluations if ev.taxon == row.target)
            label = ev.derived.label
        out.setdefault(row.method, {})[row.target] = RowGenerator(
            stage=key, pkl=str(folder / read_json(folder / STAGE_FILE)['final_pkl']), sha256=sha, label=label)
    return out

def plan_from_dict(data: dict, outdir) -> Plan:
    """A Plan from its plan.json data (Plan.to_dict's); PlanError naming the file when it does not fit."""
    where = Path(outdir) / PLAN_FILE
    if not isinstance(data, dict) or data.get('format') != PLAN_FORMAT:
        raise PlanError(f'{where}: not a plan (format {data.get("format") if isinstance(data, dict) else None!r}, '
                        f'expected {PLAN_FORMAT!r})')

    def derived(d):
        return None if d is None else DerivedData(**dict(d, label_names=tuple(d['label_names'])))

    try:
        stages = [Stage(**dict(s, chain=tuple(s['chain']), derived=derived(s['derived']),
                               evaluations=tuple(Evaluation(**dict(e, derived=derived(e['derived'])))
                                                 for e in s['evaluations'])))
                  for s in data['stages']]
        rows = [Row(**r) for r in data['rows']]
        return Plan(stages=stages, rows=rows, methods=list(data['methods']), targets=list(data['targets']),
                    datasets=str(data['datasets']), outdir=str(outdir))
    except (KeyError, TypeError) as exc:
        raise PlanError(f'{where}: written by another version of train_hier.py ({type(exc).__name__}: {exc})') from None

def load_plan(outdir) -> Plan:
    """The plan an experiment folder was trained with (OUTDIR/plan.json); PlanError when there is none."""
    data = read_json(Path(outdir) / PLAN_FILE)
    if data is None:
        raise PlanError(f'{Path(outdir) / PLAN_FILE}: no such file or not JSON (train the plan with train_hier.py first)')
    return plan_from_dict(data, outdir)

def plan_states(plan: Plan, records, metrics, detector, read_progress=True, detector_id=None) -> dict[str, StageState]:
    """StageState of every stage, in plan order, as the dry run shows them (detector_id: detector_identity's, if known)."""
    states = {}
    detector_id = detector_id or (detector_identity(detector) if metrics else None)
    for stage in plan.stages:
        ready = stage.start_kind != 'stage' or states[stage.start].status in ('done', 'evaluate')
        sha = stage_start_sha256(stage, plan.outdir) if ready else None
        states[stage.key] = inspect_stage(stage, plan.outdir, sha, ready, records, metrics, detector, read_progress, detector_id)
    return states

#----------------------------------------------------------------------------
# The dry run: the plan as a tree.

def format_plan(plan: Plan, states: dict[str, StageState]) -> str:
    """The stages as a tree (each under the stage it starts from) with image counts, kimg and status."""
    children = {}
    for stage in plan.stages:
        children.setdefault(stage.start if stage.start_kind == 'stage' else None, []).append(stage)
    rows_of = {}
    for row in plan.rows:
        if row.stage is not None:
            rows_of.setdefault(row.stage, []).append(f'{row.method} {row.target}')
    lines = []

    def visit(stage, prefix, last, top):
        state = states[stage.key]
        start = '' if not top else ('from scratch' if stage.start_kind == 'scratch' else f'from {os.path.basename(stage.start)}')
        what = f'{stage.taxon}{" [conditional]" if stage.cond else ""} ({stage.num_images} img, {stage.kimg:g} kimg'
        what += f', {start})' if start else ')'
        answers = f'  -> {"; ".join(rows_of[stage.key])}' if stage.key in rows_of else ''
        branch = '' if top else ('`-- ' if last else '|-- ')
        lines.append(f'{prefix}{branch}{what}  [{state.detail}]{answers}')
        kids = children.get(stage.key, [])
        for i, kid in enumerate(kids):
            visit(kid, prefix + ('' if top else ('    ' if last else '|   ')), i == len(kids) - 1, False)

    for stage in children.get(None, []):
        visit(stage, '', True, True)
    notes = [f'{row.method} {row.target}: {row.note}' for row in plan.rows if row.stage is None]
    counts = {}
    for state in states.values():
        counts[state.status] = counts.get(state.status, 0) + 1
    to_train = [s for s in plan.stages if states[s.key].status in ('todo', 'rerun', 'resume', 'waiting')]
    remaining = sum(max(s.kimg - states[s.key].done_kimg, 0) for s in to_train)
    summary = (f'Plan: {", ".join(plan.methods)} for {", ".join(plan.targets)}: {len(plan.stages)} stage(s) '
               f'({", ".join(f"{n} {k}" for k, n in counts.items())}); {remaining:g} kimg to train')
    return '\n'.join([summary] + lines + [f'  ({note})' for note in notes])

#----------------------------------------------------------------------------
# Running a plan.

def write_derived_zip(derived: DerivedData) -> None:
    """Write the child's images with dataset.json labelling them all as its class of the parent (skipped if current)."""
    path = Path(derived.path)
    stamp = dict(source_sha256=derived.source_sha256, label_names=list(derived.label_names), label=derived.label)
    if path.is_file():
        try:
            with zipfile.ZipFile(path) as z:
                meta = json.loads(z.read('dataset.json'))
            if meta.get('derived_from') == stamp:
                return
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            pass
    try:
        source = zipfile.ZipFile(derived.source)
    except (OSError, zipfile.BadZipFile) as exc:
        raise PlanError(f'{derived.source}: cannot read the dataset zip ({exc})') from None
    with source, atomic_write(path, 'wb') as f, zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as out:
        names = sorted(n for n in source.namelist() if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
        for name in names:
            # A fixed date keeps the file byte-identical from run to run.
            out.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), source.read(name))
        meta = dict(labels=[[name, derived.label] for name in names], label_names=list(derived.label_names), derived_from=stamp)
        out.writestr(zipfile.ZipInfo('dataset.json', date_time=(1980, 1, 1, 0, 0, 0)), json.dumps(meta))

def _flock(f, mode, message):
    """Take an flock without waiting; PlanError(message) when another process holds it."""
    try:
        fcntl.flock(f, mode | fcntl.LOCK_NB)
    except OSError:
        raise PlanError(message) from None

def _inherited_lock(path) -> bool:
    """True when this process inherited the experiment lock from the parallel driver that holds it (LOCK_FD_ENV)."""
    fd = os.environ.get(LOCK_FD_ENV, '')
    try:
        held, lock = os.fstat(int(fd)), os.stat(path)
        if (held.st_dev, held.st_ino) != (lock.st_dev, lock.st_ino):
            return False
        # The same open file as the driver's: taking it again is a no-op that cannot fail while the driver holds it.
        fcntl.flock(int(fd), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (OSError, ValueError):
        return False

@contextlib.contextmanager
def experiment_lock(
    outdir,                         # experiment folder
    stage           = None,         # key of the one stage this driver trains (--stage); None = the whole plan
):
    """Hold OUTDIR/.train_hier.lock so two drivers never train the same stages at once; yields the lock's open file.

    The whole plan holds it exclusively. A driver of one stage holds it shared (stage jobs of one plan run side by side,
    a whole-plan driver is refused meanwhile) or, started by the parallel driver, inherits that driver's; in both cases
    it also holds OUTDIR/.train_hier.<stage>.lock exclusively.
    """
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, LOCK_FILE)
    busy = f'{outdir}: another train_hier.py is running on this folder (lock {path})'
    with contextlib.ExitStack() as held:
        f = None
        if stage is None or not _inherited_lock(path):
            f = held.enter_context(open(path, 'a+'))
            _flock(f, fcntl.LOCK_EX if stage is None else fcntl.LOCK_SH, busy)
            held.callback(fcntl.flock, f, fcntl.LOCK_UN)
        if stage is not None:
            stage_path = os.path.join(outdir, f'{LOCK_FILE}.{stage}')
            g = held.enter_context(open(stage_path, 'a+'))
            _flock(g, fcntl.LOCK_EX, f'{outdir}: another train_hier.py is training stage {stage} (lock {stage_path})')
            held.callback(fcntl.flock, g, fcntl.LOCK_UN)
        yield f

def _supersede(outdir, key) -> str:
    """Move a stale stage folder to OUTDIR/superseded/<key>-<n>; returns the new path."""
    base = Path(outdir) / SUPERSEDED_DIR
    base.mkdir(parents=True, exist_ok=True)
    n = 1
    while (base / f'{key}-{n}').exists():
        n += 1
    shutil.move(str(Path(outdir) / key), str(base / f'{key}-{n}'))
    return str(base / f'{key}-{n}')

def _check_dataset(manifest, stage: Stage) -> None:
    """The training zip must still have the manifest's hash (a zip edited after the build would be trained silently)."""
    if stage.derived is not None:
        check = manifest.verify(stage.taxon)
        if check != 'ok':
            raise PlanError(f'{stage.derived.source}: {check}; rebuild the datasets')
        write_derived_zip(stage.derived)
        return
    check = manifest.verify(stage.taxon)
    if check != 'ok':
        raise PlanError(f'{stage.data}: {check}; rebuild the datasets')

def evaluate_pickle(
    pkl,                            # network pickle to evaluate (its G_ema)
    evaluation:     Evaluation,     # the real images
    metrics,                        # metric names, e.g. ['fid50k_full', 'kid50k_full']
    detector,                       # 'inception', 'taxon:PATH' or a TorchScript path
    device          = None,         # torch device; None = cuda when available, else cpu
    run_dir         = None,         # also append metric-<name>.jsonl here; None = do not
    cache_dir       = None,         # detector and real-feature cache; None = the default
    progress        = True,         # progress bars
) -> dict:
    """Compute the metrics of a pickle against the evaluation's images: dict(metrics, detector_id, num_real, num_gen)."""
    G = copy.deepcopy(evaluation_network(load_network_pkl(pkl))).eval().requires_grad_(False)
    if device is not None:
        G = G.to(device)
    kwargs = dict(path=evaluation.data, use_labels=G.c_dim > 0, max_size=None, xflip=False, random_seed=0,
                  resolution=G.img_resolution)
    out = dict(metrics={}, detector_id=None, num_real=None, num_gen=None, extra={})
    for metric in metrics:
        try:
            result = metric_main.calc_metric(metric, G, kwargs, detector=detector, device=device, progress=progress,
                                             cache_dir=cache_dir, taxon=None if G.c_dim else evaluation.taxon)
        except metric_main.MetricError as exc:
            # Classifier accuracy has no answer for a taxon above the classifier's classes (the parent stage).
            if not metric_main.parse_metric_name(metric).family == 'acc':
                raise
            out['extra'].setdefault('skipped', {})[metric] = str(exc)
            continue
        metric_main.report_metric(result, run_dir, pkl)
        out['metrics'].update(result['results'])
        out['detector_id'] = result['detector_id']
        out['num_real'] = result.get('num_real', out['num_real'])
        out['num_gen'] = result.get('num_gen', out['num_gen'])
        if 'per_taxon' in result:
            out['extra'][result['metric'] + '_per_taxon'] = result['per_taxon']
    return out

class _PlanProgress:
    """The overall progress bar of a run: kimg of the whole plan, with its ETA."""

    def __init__(self,
        total_kimg:     float,          # kimg left to train in the plan
        enabled:        bool,           # False: no bar
    ):
        self.total_kimg = total_kimg
        self.trained_kimg = 0.0         # kimg of the stages trained so far in this run
        self.bar = tqdm.tqdm(total=round(total_kimg, 3), unit='kimg', disable=not enabled or total_kimg == 0,
                             dynamic_ncols=True,
                             bar_format='{desc} {percentage:3.0f}%|{bar}| {n:.3f}/{total:.3f} kimg [{elapsed}<{remaining}]')

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.bar.close()

    def stage_callback(self, header: str, stage: Stage, done_kimg: float):
        """The progress_callback(cur_nimg, total_nimg) of a stage that starts at `done_kimg`."""
        self.bar.set_description_str(f'{header} ({stage.kimg:g} kimg)')
        return functools.partial(self._show, self.trained_kimg, done_kimg, stage.kimg)

    def _show(self, base_kimg, done_kimg, stage_kimg, cur_nimg, total_nimg):
        # The last batch may overshoot the stage's kimg; the bar counts the plan's kimg only.
        self.bar.n = round(min(base_kimg + min(cur_nimg / 1000, stage_kimg) - done_kimg, self.total_kimg), 3)
        self.bar.set_postfix_str(f'stage kimg {cur_nimg / 1000:.3f}/{total_nimg / 1000:g}')
        self.bar.refresh()

    def stage_trained(self, stage: Stage, done_kimg: float):
        """Count a stage that started at `done_kimg` as trained."""
        self.trained_kimg += max(stage.kimg - done_kimg, 0)
        self.bar.n = round(min(self.trained_kimg, self.total_kimg), 3)
        self.bar.refresh()

@dataclasses.dataclass
class _PlanRun:
    """What the steps of running a plan share."""
    plan:           Plan
    manifest:       object              # taxonomy.Manifest the plan was built from
    outdir:         Path
    metrics:        list
    detector:       str
    detector_id:    str | None          # detector_identity(detector) when metrics are asked for
    records:        list                # results.jsonl records, those of this run appended
    experiment:     str                 # name stored in the records
    log:            object              # where status lines go

    def current_state(self, stage: Stage) -> StageState:
        """The stage's state now (its start stage may have been trained since the plan was printed)."""
        start_sha = stage_start_sha256(stage, self.outdir)
        if stage.start_kind == 'stage' and start_sha is None:
            raise PlanError(f'stage {stage.key}: its start stage {stage.start} has no final pickle')
        return inspect_stage(stage, self.outdir, start_sha, True, self.records, self.metrics, self.detector,
                             detector_id=self.detector_id)

    def train(self, stage: Stage, state: StageState, header: str, train_fn, progress: _PlanProgress) -> str:
        """Train a stage (afresh, again in a new folder, or resumed), recording it in its stage.json; the final pickle."""
        folder = self.outdir / stage.key
        if state.status == 'rerun':
            moved = _supersede(self.outdir, stage.key)
            self.log(f'{header}: {state.detail}; old folder moved to {moved}')
        elif state.status == 'todo' and folder.exists():
            shutil.rmtree(folder)       # only files of a run that never wrote a snapshot
        _check_dataset(self.manifest, stage)
        stage_record = dict(format=STAGE_FORMAT, key=stage.key, state='training', fingerprint=state.fingerprint,
                            inputs=state.inputs, start_pkl=stage_start_pkl(stage, self.outdir), started=time.time())
        if state.status == 'resume':
            old = read_json(folder / STAGE_FILE) or {}
            stage_record['started'] = old.get('started', stage_record['started'])
        write_json_atomic(folder / STAGE_FILE, stage_record)

        callback = progress.stage_callback(header, stage, state.done_kimg)
        self.log(f'{header}: {"resuming from " + os.path.basename(state.snapshot) if state.snapshot else "training"} '
                 f'on {stage.num_images} images, {stage.kimg:g} kimg')
        t0 = time.time()
        final = train_fn(stage, str(folder), state.snapshot, stage_record['start_pkl'], callback)
        progress.stage_trained(stage, state.done_kimg)
        if final is None or not os.path.isfile(final):
            raise PlanError(f'stage {stage.key}: training returned no final snapshot')
        stat = os.stat(final)
        stage_record.update(state='trained', final_pkl=os.path.basename(final), final_sha256=sha256_file(final),
                            final_size=stat.st_size, final_mtime_ns=stat.st_mtime_ns, train_seconds=time.time() - t0,
                            resumed=state.status == 'resume', finished=time.time())
        write_json_atomic(folder / STAGE_FILE, stage_record)
        return final

    def evaluate(self, stage: Stage, state: StageState, header: str, evaluate_fn) -> list[dict]:
        """Evaluate a trained stage on each of its taxa not evaluated yet; the records appended to results.jsonl."""
        folder = self.outdir / stage.key
        train_seconds = read_json(folder / STAGE_FILE).get('train_seconds')
        evaluated = _evaluated_taxa(self.records, stage.key, state.fingerprint, self.metrics, self.detector,
                                    self.detector_id)
        appended = []
        for ev in stage.evaluations:
            if ev.taxon in evaluated:
                continue        # evaluated already (a conditional stage evaluates several taxa)
            t0 = time.time()
            if not self.metrics:
                # --metrics none: a record without figures, so that the report lists the stage and its network.
                self.log(f'{header}: {ev.taxon}: not evaluated (no metrics asked for)')
                out = dict(metrics={}, detector_id=None, num_real=None, num_gen=None, extra={})
            else:
                if ev.derived is not None:
                    write_derived_zip(ev.derived)
                self.log(f'{header}: evaluating {", ".join(self.metrics)} on {ev.taxon} ({ev.num_images} real images)')
                out = evaluate_fn(state.final_pkl, ev, self.metrics, self.detector, run_dir=str(folder))
            record = self.result_record(stage, state, ev, out, train_seconds, time.time() - t0)
            append_record(self.outdir / RESULTS_FILE, record)
            self.records.append(record)
            appended.append(record)
            evaluated.add(ev.taxon)
            if self.metrics:
                self.log(f'{header}: {ev.taxon}: ' + ', '.join(f'{k} {v:.4g}' for k, v in out['metrics'].items()))
        return appended

    def result_record(self, stage, state, ev, out, train_seconds, eval_seconds) -> dict:
        """The results.jsonl record of one evaluation (format RESULTS_FORMAT)."""
        return dict(
            format=RESULTS_FORMAT, experiment=self.experiment, stage=stage.key, taxon=ev.taxon, method=stage.method,
            source=stage.source, origin=stage.origin, chain=list(stage.chain), trained_on=stage.taxon,
            num_images=ev.num_images, train_images=stage.num_images, kimg=stage.kimg, cond=stage.cond,
            fingerprint=state.fingerprint, pkl=os.path.relpath(state.final_pkl, self.outdir), data=ev.data,
            datasets=self.plan.datasets, requested_metrics=self.metrics, detector=self.detector if self.metrics else None,
            detector_id=self.detector_id or out.get('detector_id'),
            metrics=out['metrics'], num_real=out.get('num_real'), num_gen=out.get('num_gen'), extra=out.get('extra', {}),
            train_options=stage.train_options, overrides=stage.overrides, train_seconds=train_seconds,
            eval_seconds=eval_seconds, timestamp=time.time(),
            date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'), host=platform.node(),
        )

def run_plan(
    plan:           Plan,
    manifest,                       # taxonomy.Manifest the plan was built from
    train_fn,                       # f(stage, run_dir, resume_snapshot, start_pkl, progress_callback) -> final pickle path
    metrics,                        # evaluation metric names
    detector,                       # evaluation detector spec
    evaluate_fn     = evaluate_pickle,  # f(pkl, evaluation, metrics, detector, run_dir=...) -> dict (see evaluate_pickle)
    log             = print,        # where status lines go
    progress        = True,         # overall progress bar (kimg of the whole plan, with its ETA)
    experiment      = None,         # name stored in the records; None = the folder name
    only            = None,         # key of the one stage to train and evaluate (its start must be trained); None = all
    lock            = True,         # False: the caller holds the experiment lock (the parallel driver)
) -> list[dict]:
    """Train and evaluate every stage that is not done; returns the records appended to results.jsonl."""
    outdir = Path(plan.outdir)
    metrics = list(metrics)
    appended = []
    if only is not None:
        plan.stage(only)                                    # KeyError for a key of no stage: the caller checks keys
    with experiment_lock(outdir, stage=only) if lock else contextlib.nullcontext():
        write_json_atomic(outdir / PLAN_FILE, plan.to_dict())
        records = read_results(outdir / RESULTS_FILE)
        detector_id = detector_identity(detector) if metrics else None
        stages = [s for s in plan.stages if only is None or s.key == only]
        if only is None:
            states = plan_states(plan, records, metrics, detector, detector_id=detector_id)
            log(format_plan(plan, states))
        run = _PlanRun(plan, manifest, outdir, metrics, detector, detector_id, records,
                       experiment or outdir.resolve().name, log)
        if only is not None:
            states = {only: run.current_state(stages[0])}
        todo = [s for s in stages if states[s.key].status in ('todo', 'rerun', 'resume', 'waiting')]
        with _PlanProgress(sum(max(s.kimg - states[s.key].done_kimg, 0) for s in todo), progress) as bar:
            for stage in stages:
                index = plan.stages.index(stage) + 1
                state = run.current_state(stage)
                header = f'[{index}/{len(plan.stages)}] {stage.label}'
                if state.status == 'done':
                    log(f'{header}: done, skipped')
                    continue
                if state.status != 'evaluate':
                    state.final_pkl = run.train(stage, state, header, train_fn, bar)
                appended += run.evaluate(stage, state, header, evaluate_fn)
    return appended

def stage_dependencies(plan: Plan) -> dict[str, tuple[str, ...]]:
    """{stage key: keys of the stages whose final pickle it needs}, in plan order (a stage starts from at most one)."""
    return {s.key: (s.start,) if s.start_kind == 'stage' else () for s in plan.stages}

#----------------------------------------------------------------------------
