"""The taxonomy tree of a dataset collection and its manifest (`DEST/manifest.json`).

`dataset_tool_ext.py build` writes one zip per taxon and a manifest describing the tree;
later code (the hierarchical planner, the report, the taxon detector and metrics) reads it back with `load_manifest()`,
the one reader of the format.
"""

import dataclasses
import json
import os
import re
from pathlib import Path

from stylegan2ada.util import UserError, sha256_file

MANIFEST_FORMAT = 'taxogan-datasets/1'
MANIFEST_NAME = 'manifest.json'
DROP_REASONS = ('too_small', 'unreadable', 'excluded', 'duplicate', 'near_duplicate', 'max_per_taxon',
                'download_failed', 'no_taxon')
UNPLACED_SUFFIX = ' (unplaced)'
# Rank names a folder tree or an EcoTaxa hierarchy may be given (they carry no rank names of their own), top first.
STANDARD_RANKS = ('domain', 'kingdom', 'subkingdom', 'superphylum', 'phylum', 'subphylum', 'infraphylum', 'superclass',
                  'class', 'subclass', 'infraclass', 'superorder', 'order', 'suborder', 'infraorder', 'superfamily',
                  'family', 'subfamily', 'tribe', 'subtribe', 'genus', 'subgenus', 'species', 'subspecies')

# Keys every taxon entry of a manifest must have, with the JSON types they may take.
_TAXON_KEYS = {
    'rank':              (str,),
    'parent':            (str, type(None)),
    'children':          (list,),
    'dataset':           (str,),
    'num_images':        (int,),
    'num_images_direct': (int,),
    'labels':            (list, type(None)),
    'sha256':            (str,),
}

#----------------------------------------------------------------------------

class ManifestError(UserError):
    """A missing, unreadable or inconsistent manifest, or an unknown taxon name."""

#----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Taxon:
    """One taxon of the tree and its dataset."""
    name:               str
    rank:               str
    parent:             str | None          # None for a root of the tree
    children:           tuple[str, ...]     # child taxa at the next chosen rank, sorted
    dataset:            str                 # zip file name, relative to the datasets folder
    num_images:         int                 # images of this taxon and all its descendants
    num_images_direct:  int                 # images identified only to this taxon's rank
    labels:             tuple[str, ...] | None  # class names of the zip's labels; None: unconditional
    sha256:             str                 # hex digest of the zip file

    def to_dict(self) -> dict:
        """The manifest entry of this taxon (without its name, which is the key)."""
        return {
            'rank': self.rank, 'parent': self.parent, 'children': list(self.children), 'dataset': self.dataset,
            'num_images': self.num_images, 'num_images_direct': self.num_images_direct,
            'labels': None if self.labels is None else list(self.labels), 'sha256': self.sha256,
        }

#----------------------------------------------------------------------------

def dataset_file_name(name: str) -> str:
    """Zip file name of a taxon: the name with characters unsafe in file names replaced by '_'."""
    safe = re.sub(r'[^A-Za-z0-9._()\- ]', '_', name).strip(' .')
    return (safe or '_') + '.zip'

def unplaced_label(name: str) -> str:
    """Class name for images identified only to `name` in a zip whose other classes are its children."""
    return name + UNPLACED_SUFFIX

def build_tree(
    paths,          # iterable of (taxon path, source): names from the top chosen rank down, one per image
    ranks,          # chosen ranks, top first; path[i] is a taxon at ranks[i]
) -> dict[str, dict]:
    """Taxa (name -> rank, parent, children, dataset, num_images, num_images_direct) from image paths."""
    # One name at two places of the tree (a homonym or a data error) is a ValueError: taxon names are
    # the keys of the manifest and the names of the zip files.
    taxa = {}
    where = {}  # name -> a source that put it there, for the error message
    for path, source in paths:
        assert 1 <= len(path) <= len(ranks)
        parent = None
        for depth, name in enumerate(path):
            entry = taxa.get(name)
            if entry is None:
                entry = taxa[name] = dict(rank=ranks[depth], parent=parent, children=set(), num_images=0, num_images_direct=0)
                where[name] = source
            elif entry['rank'] != ranks[depth] or entry['parent'] != parent:
                raise ValueError(f"taxon '{name}' appears both as {entry['rank']} under {entry['parent'] or 'the root'} "
                                 f"({where[name]}) and as {ranks[depth]} under {parent or 'the root'} ({source})")
            entry['num_images'] += 1
            if parent is not None:
                taxa[parent]['children'].add(name)
            parent = name
        taxa[path[-1]]['num_images_direct'] += 1
    files = {}
    for name, entry in taxa.items():
        entry['children'] = sorted(entry['children'])
        file = dataset_file_name(name)
        if file in files:
            raise ValueError(f"taxa '{files[file]}' and '{name}' would both be written to {file}")
        files[file] = name
        entry['dataset'] = file
    return taxa

#----------------------------------------------------------------------------

@dataclasses.dataclass
class Manifest:
    """A datasets folder as described by its manifest.json."""
    root:           Path                # the datasets folder
    ranks:          list[str]
    resolution:     int                 # pixels, width = height
    channels:       int                 # 1 or 3
    options:        dict
    taxa:           dict[str, Taxon]    # name -> taxon, in tree order (pre-order, children sorted)
    dropped:        list[dict]          # [{source, reason, detail}, ...]
    dropped_counts: dict[str, int]
    extra:          dict = dataclasses.field(default_factory=dict)   # other top-level keys, kept as read

    def _get(self, name: str) -> Taxon:
        taxon = self.taxa.get(name)
        if taxon is None:
            known = ', '.join(self.taxa) or 'none'
            raise ManifestError(f"{self.root / MANIFEST_NAME}: unknown taxon '{name}' (known: {known})")
        return taxon

    def taxon(self, name: str) -> Taxon:
        """The taxon called `name`."""
        return self._get(name)

    def roots(self) -> list[str]:
        """Taxa without a parent, sorted."""
        return sorted(name for name, taxon in self.taxa.items() if taxon.parent is None)

    def dataset_path(self, name: str) -> Path:
        """Path of the zip holding the images of `name` and its descendants."""
        return self.root / self._get(name).dataset

    def children(self, name: str) -> list[str]:
        """Child taxa at the next chosen rank, sorted."""
        return list(self._get(name).children)

    def parent(self, name: str) -> str | None:
        """Parent taxon, or None for a root."""
        return self._get(name).parent

    def ancestors(self, name: str) -> list[str]:
        """Parent, grandparent, ... up to the root (nearest first)."""
        result = []
        parent = self._get(name).parent
        while parent is not None:
            result.append(parent)
            parent = self._get(parent).parent
        return result

    def descendants(self, name: str) -> list[str]:
        """All taxa below `name`, in pre-order."""
        result = []
        for child in self._get(name).children:
            result.append(child)
            result.extend(self.descendants(child))
        return result

    def siblings(self, name: str) -> list[str]:
        """Other taxa with the same parent (other roots for a root), sorted."""
        parent = self._get(name).parent
        group = self.roots() if parent is None else self.children(parent)
        return [other for other in group if other != name]

    def rank(self, name: str) -> str:
        """Rank of `name`."""
        return self._get(name).rank

    def labels(self, name: str) -> list[str] | None:
        """Class names of the zip's labels (position = class index), or None if it has no labels."""
        labels = self._get(name).labels
        return None if labels is None else list(labels)

    def taxon_of_dataset(self, dataset_path) -> str | None:
        """Name of the taxon whose zip is `dataset_path` (compared by file name), or None."""
        base = os.path.basename(os.path.normpath(dataset_path))
        for name, taxon in self.taxa.items():
            if taxon.dataset == base:
                return name
        return None

    def num_images(self, name: str) -> int:
        """Number of images in the zip of `name`."""
        return self._get(name).num_images

    def sha256(self, name: str) -> str:
        """Hex SHA-256 of the zip of `name`, as written by the build."""
        return self._get(name).sha256

    def verify(self, name: str) -> str:
        """'ok' if the zip of `name` exists and has the SHA-256 of the manifest, else what is wrong."""
        try:
            digest = sha256_file(self.dataset_path(name))
        except OSError as e:
            return f'cannot read: {e.strerror or e}'
        return 'ok' if digest == self._get(name).sha256 else 'SHA-256 differs from the manifest'

    def format_tree(self) -> str:
        """The tree with image counts, one taxon a line, like '1969 Copepoda (class) = 902 Calanoida + ...'."""
        lines = []
        def visit(name, depth):
            taxon = self.taxa[name]
            line = f'{"  " * depth}{taxon.num_images} {name} ({taxon.rank})'
            parts = [f'{self.taxa[child].num_images} {child}' for child in taxon.children]
            if parts and taxon.num_images_direct:
                parts.append(f'{taxon.num_images_direct} unplaced')
            if parts:
                line += ' = ' + ' + '.join(parts)
            lines.append(line)
            for child in taxon.children:
                visit(child, depth + 1)
        for root in self.roots():
            visit(root, 0)
        return '\n'.join(lines)

    def to_dict(self) -> dict:
        """The manifest as JSON-ready data."""
        return {
            'format': MANIFEST_FORMAT, 'ranks': list(self.ranks), 'resolution': self.resolution,
            'channels': self.channels, 'options': self.options,
            'taxa': {name: taxon.to_dict() for name, taxon in self.taxa.items()},
            'dropped': self.dropped, 'dropped_counts': self.dropped_counts, **self.extra,
        }

#----------------------------------------------------------------------------

def manifest_from_dict(data, root: Path) -> Manifest:
    """Validate parsed manifest JSON and wrap it; raises ManifestError naming the first problem."""
    where = Path(root) / MANIFEST_NAME
    def fail(problem):
        raise ManifestError(f'{where}: {problem}')
    if not isinstance(data, dict):
        fail('not a JSON object')
    if data.get('format') != MANIFEST_FORMAT:
        fail(f"format is {data.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    for key, kind in [('ranks', list), ('resolution', int), ('channels', int), ('taxa', dict)]:
        if not isinstance(data.get(key), kind):
            fail(f"missing or malformed '{key}'")
    taxa = {}
    for name, entry in data['taxa'].items():
        if not isinstance(entry, dict):
            fail(f"taxon '{name}' is not an object")
        for key, kinds in _TAXON_KEYS.items():
            if key not in entry or not isinstance(entry[key], kinds):
                fail(f"taxon '{name}' has a missing or malformed '{key}'")
        taxa[name] = Taxon(name=name, rank=entry['rank'], parent=entry['parent'], children=tuple(entry['children']),
                           dataset=entry['dataset'], num_images=entry['num_images'],
                           num_images_direct=entry['num_images_direct'],
                           labels=None if entry['labels'] is None else tuple(entry['labels']), sha256=entry['sha256'])
    for name, taxon in taxa.items():
        if taxon.parent is not None and name not in taxa.get(taxon.parent, taxon).children:
            fail(f"taxon '{name}' names parent '{taxon.parent}', which does not list it as a child")
        for child in taxon.children:
            if child not in taxa or taxa[child].parent != name:
                fail(f"taxon '{name}' lists child '{child}', whose parent is not '{name}'")
        # Walk up to catch cycles, which would make ancestors() loop forever.
        seen, up = {name}, taxon.parent
        while up is not None:
            if up in seen:
                fail(f"taxon '{name}' is its own ancestor")
            seen.add(up)
            up = taxa[up].parent if up in taxa else None
    known = {'format', 'ranks', 'resolution', 'channels', 'options', 'taxa', 'dropped', 'dropped_counts'}
    return Manifest(root=Path(root), ranks=list(data['ranks']), resolution=data['resolution'], channels=data['channels'],
                    options=dict(data.get('options') or {}), taxa=taxa, dropped=list(data.get('dropped') or []),
                    dropped_counts=dict(data.get('dropped_counts') or {}),
                    extra={key: value for key, value in data.items() if key not in known})

def load_manifest(datasets_dir) -> Manifest:
    """Read `datasets_dir/manifest.json` (or a manifest.json path); raises ManifestError on any problem."""
    path = Path(datasets_dir)
    if path.is_dir() or path.name != MANIFEST_NAME:
        path = path / MANIFEST_NAME
    try:
        text = path.read_text(encoding='utf-8')
    except FileNotFoundError:
        raise ManifestError(f'{path}: no such file (build the datasets with dataset_tool_ext.py build)') from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f'{path}: cannot read: {e}') from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f'{path}: not valid JSON ({e})') from None
    return manifest_from_dict(data, path.parent)

def manifest_beside(dataset_path) -> Manifest | None:
    """The manifest of the datasets folder holding a dataset zip (or folder), or None when there is none."""
    folder = Path(os.path.abspath(os.path.normpath(dataset_path))).parent
    return load_manifest(folder) if (folder / MANIFEST_NAME).is_file() else None

def dataset_class_names(
    dataset_path,           # a dataset zip or folder
    label_names,            # its class names from dataset.json, or None
    manifest,               # the Manifest beside it, or None
) -> list[str] | None:
    """A dataset's class names: its own, else (a zip written before dataset.json carried them) its manifest entry's labels."""
    if label_names:
        return list(label_names)
    name = manifest.taxon_of_dataset(dataset_path) if manifest is not None else None
    return manifest.labels(name) if name is not None else None

#----------------------------------------------------------------------------
