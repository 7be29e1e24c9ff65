"""Taxa for the taxon detector: reading the datasets manifest, the classifier's classes, generator targets.

The engine does not import taxogan_ext, so this reads the few manifest fields it needs itself
(format `taxogan-datasets/1`: `ranks`, and per taxon `rank`, `parent`, `dataset`, `labels`, `num_images`).
"""

import json
import os

import numpy as np

from ..util import UserError

MANIFEST_FILE = 'manifest.json'
MANIFEST_FORMAT_PREFIX = 'taxogan-datasets/'


class TaxonError(UserError):
    """A taxon question that cannot be answered (unknown taxon, bad manifest); one line naming the file."""


def read_manifest(
    path,       # a datasets folder holding manifest.json, or the manifest file itself
):
    """Parsed manifest.json with its folder under '_root'; raises TaxonError naming the file."""
    file = os.path.join(path, MANIFEST_FILE) if os.path.isdir(path) else path
    try:
        with open(file, 'r', encoding='utf-8') as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise TaxonError(f'{file}: no such file') from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise TaxonError(f'{file}: cannot read the manifest ({exc})') from None
    if not isinstance(manifest, dict) or not str(manifest.get('format', '')).startswith(MANIFEST_FORMAT_PREFIX):
        raise TaxonError(f'{file}: not a datasets manifest (expected "format": "{MANIFEST_FORMAT_PREFIX}1")')
    taxa = manifest.get('taxa')
    if not isinstance(taxa, dict) or not all(isinstance(v, dict) for v in taxa.values()):
        raise TaxonError(f'{file}: "taxa" must be an object of taxon entries')
    manifest['_root'] = os.path.dirname(os.path.abspath(file))
    manifest['_file'] = file
    return manifest


def manifest_beside(
    dataset_path,   # a dataset zip or folder
):
    """The manifest in the dataset's folder, or None when there is none."""
    folder = os.path.dirname(os.path.abspath(os.path.normpath(dataset_path)))
    if not os.path.isfile(os.path.join(folder, MANIFEST_FILE)):
        return None
    return read_manifest(folder)


def taxon_of_dataset(
    dataset_path,   # a dataset zip or folder
    manifest,       # parsed manifest or None
):
    """Name of the taxon whose "dataset" is this file in the manifest, else None."""
    if manifest is None:
        return None
    base = os.path.basename(os.path.normpath(dataset_path))
    for name, entry in manifest['taxa'].items():
        if entry.get('dataset') == base:
            return name
    return None


def class_taxa(
    manifest,       # parsed manifest
    rank    = None, # rank whose taxa become the classes; None = the lowest rank of the manifest
):
    """Names of the taxa at `rank` that have a dataset with images, in manifest order."""
    ranks = manifest.get('ranks') or []
    if rank is None:
        if not ranks:
            raise TaxonError(f'{manifest["_file"]}: no "ranks" list; pass the rank to train on')
        rank = ranks[-1]
    names = [name for name, entry in manifest['taxa'].items()
             if entry.get('rank') == rank and entry.get('dataset') and (entry.get('num_images') or 0) > 0]
    if len(names) < 2:
        raise TaxonError(f'{manifest["_file"]}: {len(names)} taxa with images at rank {rank!r}; a classifier needs at least 2')
    return names


def class_of_taxon(
    name,           # taxon name
    class_names,    # the classifier's class names
    manifest,       # parsed manifest or None (then only exact names match)
):
    """Index of `name` or of its nearest ancestor among class_names; None when neither is a class."""
    seen = set()
    while name is not None and name not in seen:
        if name in class_names:
            return class_names.index(name)
        seen.add(name)
        entry = manifest['taxa'].get(name) if manifest is not None else None
        name = entry.get('parent') if entry else None
    return None


def generator_targets(
    dataset_path,   # the dataset the generator was evaluated against
    label_names,    # the dataset's class names (conditional generators), or None
    c_dim,          # the generator's label dimension; 0 = unconditional
    class_names,    # the classifier's class names
    taxon   = None, # taxon of an unconditional generator; None = the dataset's taxon in the manifest
):
    """Classifier class expected for each generator class ([max(c_dim, 1)] int64, -1 = no class) and their names."""
    manifest = manifest_beside(dataset_path)
    if c_dim == 0:
        name = taxon
        if name is None:
            name = taxon_of_dataset(dataset_path, manifest)
        if name is None:
            stem = os.path.splitext(os.path.basename(os.path.normpath(dataset_path)))[0]
            if stem not in class_names:
                raise TaxonError(f'{dataset_path}: cannot tell which taxon this dataset is (no manifest.json entry); pass --taxon NAME')
            name = stem
        index = class_of_taxon(name, class_names, manifest)
        if index is None:
            raise TaxonError(f'taxon {name!r} is neither a class of the taxon detector ({", ".join(class_names)}) '
                             f'nor below one in the manifest')
        return np.array([index], dtype=np.int64), [name]
    if taxon is not None:
        raise TaxonError('--taxon is for unconditional generators; a conditional one takes its taxa from the dataset labels')
    if not label_names:
        raise TaxonError(f'{dataset_path}: the generator is conditional but the dataset has no class names '
                         f'("label_names" in dataset.json or "labels" in manifest.json)')
    names = list(label_names) + [None] * max(0, c_dim - len(label_names))
    targets = [class_of_taxon(n, class_names, manifest) if n is not None else None for n in names[:c_dim]]
    if all(t is None for t in targets):
        raise TaxonError(f'{dataset_path}: none of the classes {names[:c_dim]} is (or is below) a class of the taxon detector '
                         f'({", ".join(class_names)})')
    return np.array([-1 if t is None else t for t in targets], dtype=np.int64), names[:c_dim]
