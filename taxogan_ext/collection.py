"""Image collections (folder tree, BOLD-style table, EcoTaxa export) -> per-taxon training sets.

The build runs in stages, each over all images in a fixed order (sources sorted by name):
read the source into records, drop records without a taxon or on the exclusion list, download
URLs into a cache, decode/check/square/resize every image in parallel (writing a staged PNG),
drop exact and near duplicates and images over --max-per-taxon, then write one zip per taxon
and the manifest, every file under a temporary name renamed into place at the end.
"""

import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import requests
from PIL import Image, ImageChops, ImageOps, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

from stylegan2ada.util import UserError, make_temp_file
from taxogan_ext import taxonomy

DEFAULT_RANK_COLS = ('phylum_name', 'class_name', 'order_name', 'family_name', 'genus_name', 'species_name')
PATH_COL_CANDIDATES = ('image_path', 'image_file', 'image_url', 'image_urls', 'img_file_name', 'file', 'path', 'url')
ID_COL_CANDIDATES = ('processid', 'sampleid', 'object_id', 'id')
ECOTAXA_PATH_COL = 'img_file_name'
ECOTAXA_HIERARCHY_COL = 'object_annotation_hierarchy'
ECOTAXA_ID_COL = 'object_id'
MISSING_VALUES = frozenset(['', 'na', 'n/a', 'none', 'null', 'nan'])   # taxonomy cells meaning "not identified"
IMAGE_SUFFIXES = frozenset(['.jpg', '.jpeg', '.png', '.tif', '.tiff', '.bmp', '.gif', '.webp'])
SQUARE_MODES = ('pad', 'crop', 'stretch')
GRAY_TOLERANCE = 2          # max |R-G|, |G-B| (8-bit) still called grayscale: JPEG rounds gray pixels by 1-2
HTTP_RETRY_STATUS = (429, 500, 502, 503, 504)

#----------------------------------------------------------------------------

class CollectionError(UserError):
    """Bad input to the build: the message names the file and the problem in one line."""

@dataclasses.dataclass
class Record:
    """One image of the collection, as listed by its source."""
    source:     str                     # what the user wrote: path relative to the tree or table, or URL
    location:   str                     # absolute local path or URL
    ident:      str | None              # id from the table (processid, object_id) or the file's stem
    lineage:    tuple                   # ((rank, name), ...) top rank first
    problem:    str = ''                # why the record has no usable taxonomy ('' if it has one)
    path:       tuple = ()              # taxon names at the chosen ranks, top first (set later)
    local:      str | None = None       # local file to read (the download for a URL)

#----------------------------------------------------------------------------
# Reading sources.

def _is_url(text: str) -> bool:
    return re.match(r'^https?://', text, re.IGNORECASE) is not None

def _missing(value) -> bool:
    return value is None or value.strip().lower() in MISSING_VALUES

def _parse_list(text) -> list[str]:
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        return [str(item).strip() for item in text if str(item).strip()]
    return [item.strip() for item in str(text).split(',') if item.strip()]

def detect_format(source: Path) -> str:
    """'tree' for a folder, 'ecotaxa' for a table with EcoTaxa's columns, else 'bold'."""
    if source.is_dir():
        return 'tree'
    header, _rows = read_table(source, max_rows=0)
    return 'ecotaxa' if ECOTAXA_HIERARCHY_COL in header else 'bold'

def read_table(
    path:       Path,
    max_rows:   int | None = None,      # rows to read; None: all
) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and (line number, row dict) of a TSV/CSV; an EcoTaxa type row ([t], [f]) is skipped."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CollectionError(f'{path}: cannot read: {e.strerror or e}') from None
    try:
        text = raw.decode('utf-8-sig')
    except UnicodeDecodeError:
        text = raw.decode('latin-1')    # BOLD exports from spreadsheets are often Windows-1252
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise CollectionError(f'{path}: empty table (no header line)')
    if path.suffix.lower() == '.csv':
        delimiter = ','
    elif path.suffix.lower() in ('.tsv', '.tab'):
        delimiter = '\t'
    else:
        delimiter = '\t' if '\t' in lines[0] else ','
    reader = csv.reader(lines, delimiter=delimiter)
    header = [name.strip() for name in next(reader)]
    duplicated = sorted({name for name in header if header.count(name) > 1 and name})
    if duplicated:
        raise CollectionError(f'{path}: column {duplicated[0]!r} appears more than once')
    rows = []
    for line_no, cells in enumerate(reader, start=2):
        if max_rows is not None and len(rows) >= max_rows:
            break
        if not any(cell.strip() for cell in cells):
            continue
        if line_no == 2 and all(re.fullmatch(r'\[[a-z]\]', cell.strip()) for cell in cells if cell.strip()):
            continue
        rows.append((line_no, {name: (cells[i] if i < len(cells) else None) for i, name in enumerate(header)}))
    return header, rows

def _pick_column(
    path:       Path,
    header:     list[str],
    given:      str | None,             # the column asked for; None: the first candidate present
    candidates: tuple,
    what:       str,                    # for the message
    option:     str,                    # the CLI option to name in the message
    required:   bool,
) -> str | None:
    if given is not None:
        if given not in header:
            raise CollectionError(f"{path}: no column '{given}' ({what}; columns: {_preview(header)})")
        return given
    for name in candidates:
        if name in header:
            return name
    if required:
        raise CollectionError(f"{path}: no {what} column (tried {', '.join(candidates)}; pass {option})")
    return None

def _preview(items, limit=12) -> str:
    items = list(items)
    return ', '.join(items[:limit]) + (f', ... ({len(items)} in all)' if len(items) > limit else '')

def _resolve_location(value: str, base: Path) -> str:
    if _is_url(value):
        return value
    return str((base / value).resolve()) if not os.path.isabs(value) else str(Path(value).resolve())

def read_bold(
    path:       Path,
    rank_cols:  list[str],              # taxonomy columns, top rank first
    path_col:   str | None,             # image path/URL column; None: detect
    id_col:     str | None,             # image/specimen id column; None: detect (processid, sampleid, ...)
) -> tuple[list[Record], list[str]]:
    """Records of a BOLD-style table and the ranks its taxonomy columns give."""
    header, rows = read_table(path)
    for col in rank_cols:
        if col not in header:
            raise CollectionError(f"{path}: no column '{col}' (taxonomy; columns: {_preview(header)}; see --rank-cols)")
    path_col = _pick_column(path, header, path_col, PATH_COL_CANDIDATES, 'image path', '--path-col', True)
    id_col = _pick_column(path, header, id_col, ID_COL_CANDIDATES, 'id', '--id-col', False)
    ranks = [col[:-len('_name')] if col.endswith('_name') else col for col in rank_cols]
    records = []
    for line_no, row in rows:
        cell = row.get(path_col)
        if _missing(cell):
            continue    # a specimen without an image: nothing to build from
        lineage = tuple((rank, row[col].strip()) for rank, col in zip(ranks, rank_cols) if not _missing(row.get(col)))
        ident = None if id_col is None or _missing(row.get(id_col)) else row[id_col].strip()
        # BOLD's combined exports list several image URLs of one specimen separated by '|'.
        for value in [v.strip() for v in cell.split('|') if v.strip()]:
            records.append(Record(source=value, location=_resolve_location(value, path.parent), ident=ident,
                                  lineage=lineage))
    return records, ranks

def _cut_at_root(parts: list[str], root: str | None, where: str) -> tuple[list[str], str]:
    if root is None:
        return parts, ''
    if root not in parts:
        return [], f"{where} does not contain --root '{root}'"
    return parts[parts.index(root):], ''

def _ranked(parts: list[str], tree_ranks: list[str]) -> tuple:
    # Levels deeper than the named ranks are below every chosen rank: they do not change the datasets.
    return tuple(zip(tree_ranks, parts))

def read_ecotaxa(
    path:       Path,
    tree_ranks: list[str],              # ranks of the hierarchy levels from the root down
    root:       str | None,             # taxon at tree_ranks[0]; None: the deepest taxon all rows share
    path_col:   str | None,             # image path column; None: img_file_name
) -> list[Record]:
    """Records of an EcoTaxa export TSV (img_file_name, object_annotation_hierarchy a>b>c)."""
    header, rows = read_table(path)
    for col in ([] if path_col else [ECOTAXA_PATH_COL]) + [ECOTAXA_HIERARCHY_COL]:
        if col not in header:
            raise CollectionError(f"{path}: no column '{col}' (EcoTaxa export; columns: {_preview(header)})")
    path_col = _pick_column(path, header, path_col, (ECOTAXA_PATH_COL,), 'image path', '--path-col', True)
    listed = []
    for line_no, row in rows:
        if _missing(row.get(path_col)):
            continue
        hierarchy = row.get(ECOTAXA_HIERARCHY_COL) or ''
        parts = [part.strip() for part in hierarchy.split('>') if part.strip()]
        listed.append((row, parts))
    if root is None and listed:
        # The deepest taxon shared by every annotated row is the top of the tree (e.g. Copepoda).
        annotated = [parts for _row, parts in listed if parts]
        common = annotated[0] if annotated else []
        for parts in annotated[1:]:
            n = 0
            while n < min(len(common), len(parts)) and common[n] == parts[n]:
                n += 1
            common = common[:n]
        if annotated and not common:
            raise CollectionError(f'{path}: the annotation hierarchies share no taxon; pass --root NAME')
        root = common[-1] if common else None
    records = []
    for row, parts in listed:
        value = row[path_col].strip()
        ident = None if _missing(row.get(ECOTAXA_ID_COL)) else row[ECOTAXA_ID_COL].strip()
        if not parts:
            lineage, problem = (), 'no annotation'
        else:
            kept, problem = _cut_at_root(parts, root, '>'.join(parts))
            lineage = _ranked(kept, tree_ranks)
        records.append(Record(source=value, location=_resolve_location(value, path.parent), ident=ident,
                              lineage=lineage, problem=problem))
    return records

def read_tree(
    path:       Path,
    tree_ranks: list[str],              # ranks of the folder levels from the top (or the root) down
    root:       str | None,             # folder name at tree_ranks[0]; None: the folders right below `path`
    skip:       list[Path],             # folders not to descend into (the destination, the cache)
) -> list[Record]:
    """Records of a folder tree whose folders are taxa (Copepoda/Calanoida/x.jpg); every visible file counts."""
    skip = {os.path.realpath(p) for p in skip}
    records = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith('.') and os.path.realpath(os.path.join(dirpath, d)) not in skip)
        rel_dir = Path(dirpath).relative_to(path)
        parts = list(rel_dir.parts)
        for filename in sorted(filenames):
            if filename.startswith('.'):
                continue    # .DS_Store and editors' files are not part of a collection
            rel = (rel_dir / filename).as_posix()
            kept, problem = _cut_at_root(parts, root, rel_dir.as_posix() or '.')
            if not problem and not kept:
                problem = 'not inside a taxon folder'
            records.append(Record(source=rel, location=str((Path(dirpath) / filename).resolve()),
                                  ident=Path(filename).stem, lineage=_ranked(kept, tree_ranks), problem=problem))
    return records

def read_source(
    source:     Path,
    fmt:        str,                    # 'auto', 'tree', 'bold' or 'ecotaxa'
    rank_cols:  list[str],
    path_col:   str | None,
    id_col:     str | None,
    tree_ranks: list[str],
    root:       str | None,
    skip:       list[Path],
) -> tuple[list[Record], list[str], str]:
    """Records, the ranks the source can give, and the resolved format."""
    if not source.exists():
        raise CollectionError(f'{source}: no such file or folder')
    if fmt == 'auto':
        fmt = detect_format(source)
    if fmt == 'tree':
        if not source.is_dir():
            raise CollectionError(f'{source}: --format tree needs a folder')
        return read_tree(source, tree_ranks, root, skip), list(tree_ranks), fmt
    if source.is_dir():
        raise CollectionError(f'{source}: --format {fmt} needs a table file, not a folder')
    if fmt == 'ecotaxa':
        return read_ecotaxa(source, tree_ranks, root, path_col), list(tree_ranks), fmt
    records, ranks = read_bold(source, rank_cols, path_col, id_col)
    return records, ranks, fmt

def read_exclusions(path: Path) -> list[str]:
    """Entries of an exclusion list: one id, path or URL a line; blank lines and '#' comments skipped."""
    try:
        text = path.read_text(encoding='utf-8-sig')
    except OSError as e:
        raise CollectionError(f'{path}: cannot read exclusion list: {e.strerror or e}') from None
    except UnicodeDecodeError as e:
        raise CollectionError(f'{path}: exclusion list is not UTF-8 text (byte {e.start}); save it as UTF-8') from None
    entries = []
    for line in text.splitlines():
        line = line.split('#', 1)[0].strip() if not _is_url(line.strip()) else line.strip()
        if line:
            entries.append(line)
    return entries

def _exclusion_keys(record: Record) -> set[str]:
    keys = {record.source, record.location, record.source.rsplit('/', 1)[-1]}
    if record.ident:
        keys.add(record.ident)
    return keys

#----------------------------------------------------------------------------
# Downloads.

def _cache_name(url: str) -> str:
    suffix = Path(requests.utils.urlparse(url).path).suffix.lower()
    return hashlib.sha256(url.encode('utf-8')).hexdigest()[:40] + (suffix if suffix in IMAGE_SUFFIXES else '.img')

def make_session(
    retries:    int,                    # retries after the first try, for connection errors and 429/5xx
) -> requests.Session:
    """A requests session that retries failed GETs with exponential backoff."""
    retry = Retry(total=retries, connect=retries, read=retries, status=retries, backoff_factor=0.5,
                  status_forcelist=HTTP_RETRY_STATUS, allowed_methods=frozenset(['GET']), raise_on_status=False)
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount('http://', adapter)
    session.mount('https://', adapter)
    return session

def download(
    url:        str,
    cache_dir:  Path,
    session:    requests.Session,
    timeout:    float,                  # seconds, per connect and per read
) -> str:
    """Local path of `url`, downloading it into the cache unless it is there; raises OSError on failure."""
    target = cache_dir / _cache_name(url)
    if target.is_file():
        return str(target)
    try:
        response = session.get(url, timeout=timeout, stream=True)
    except requests.RequestException as e:
        raise OSError(f'{type(e).__name__}: {_one_line(e)}') from None
    with response:
        if response.status_code != 200:
            raise OSError(f'HTTP {response.status_code} {response.reason or ""}'.strip())
        fd, tmp = make_temp_file(cache_dir, prefix=f'.{target.name}.', suffix='.tmp')
        try:
            with os.fdopen(fd, 'wb') as f:
                for chunk in response.iter_content(chunk_size=1 << 16):
                    f.write(chunk)
            os.replace(tmp, target)
        except requests.RequestException as e:
            os.remove(tmp)
            raise OSError(f'{type(e).__name__}: {_one_line(e)}') from None
        except BaseException:
            os.remove(tmp)
            raise
    return str(target)

def download_all(
    urls:       list[str],
    cache_dir:  Path,
    timeout:    float,                  # seconds
    retries:    int,
    threads:    int,                    # concurrent downloads
) -> dict[str, tuple[str | None, str]]:
    """url -> (local path, '') or (None, why it failed), for every url; failures are not fatal."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CollectionError(f'{cache_dir}: cannot create the download cache: {e.strerror or e}') from None
    local = threading.local()   # requests sessions are not thread-safe: one per thread
    def fetch(url):
        if not hasattr(local, 'session'):
            local.session = make_session(retries)
        try:
            return url, (download(url, cache_dir, local.session, timeout), '')
        except OSError as e:
            return url, (None, _one_line(e))
    results = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for url, result in tqdm(pool.map(fetch, urls), total=len(urls), desc='download', unit='img', disable=None):
            results[url] = result
    return results

def _one_line(error) -> str:
    return ' '.join(str(error).split()) or type(error).__name__

#----------------------------------------------------------------------------
# Images.

def border_colour(img: Image.Image) -> tuple | int:
    """Per-channel median of the image's outermost pixels: the microscope background."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    frame = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]], axis=0)     # [border pixels, C]
    colour = tuple(int(v) for v in np.round(np.median(frame, axis=0)))
    return colour[0] if len(colour) == 1 else colour

def to_square(img: Image.Image, square: str) -> Image.Image:
    """Square the image: pad with its border colour, crop the centre, or leave it for stretching."""
    w, h = img.size
    if w == h or square == 'stretch':
        return img
    if square == 'crop':
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return img.crop((left, top, left + s, top + s))
    if square == 'pad':
        s = max(w, h)
        canvas = Image.new(img.mode, (s, s), border_colour(img))
        canvas.paste(img, ((s - w) // 2, (s - h) // 2))
        return canvas
    raise ValueError(f'unknown square mode {square!r}')

def to_canonical(img: Image.Image) -> tuple[Image.Image, bool]:
    """The image as 8-bit 'L' (if grayscale) or 'RGB', and whether it is grayscale."""
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
        arr = np.asarray(img).astype(np.float64)
        if img.mode == 'F' and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        elif img.mode != 'F' and arr.max(initial=0) > 255:
            arr = arr / 257.0   # 16-bit samples: 65535 -> 255
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), 'L'), True
    if img.mode == '1':
        return img.convert('L'), True
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
        rgba = img.convert('RGBA')
        # Transparent parts have no colour of their own; white is the usual slide background.
        img = Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba).convert('RGB')
    if img.mode == 'L':
        return img, True
    if img.mode != 'RGB':
        img = img.convert('RGB')
    r, g, b = img.split()
    # Pillow's C loops: about 10x faster than the same test on NumPy int16 arrays.
    spread = max(ImageChops.difference(r, g).getextrema()[1], ImageChops.difference(g, b).getextrema()[1])
    if spread <= GRAY_TOLERANCE:
        return img.convert('L'), True
    return img, False

def content_hash(img: Image.Image) -> str:
    """SHA-256 of the decoded pixels with mode and size: equal for exact copies in any file format."""
    h = hashlib.sha256(f'{img.mode} {img.width}x{img.height}\n'.encode())
    h.update(img.tobytes())
    return h.hexdigest()

def dhash64(img: Image.Image) -> int:
    """64-bit difference hash: 9x8 gray thumbnail, one bit per horizontal neighbour pair (left < right)."""
    small = np.asarray(img.convert('L').resize((9, 8), Image.Resampling.BOX), dtype=np.int16)   # [8, 9]
    bits = (small[:, 1:] > small[:, :-1]).reshape(-1)                                          # [64]
    return int.from_bytes(np.packbits(bits).tobytes(), 'big')

def hamming(a: int, b: int) -> int:
    """Number of differing bits of two hashes."""
    return bin(a ^ b).count('1')

POPCOUNT_IMPLS = ('auto', 'ref', 'numpy', 'bytes')

def popcount64(
    values:     np.ndarray,             # uint64 array of any shape
    impl:       str = 'auto',           # 'ref' (Python ints), 'numpy' (np.bitwise_count, NumPy >= 2), 'bytes' (any NumPy);
                                        # 'auto' = numpy where available, else bytes
) -> np.ndarray:
    """Number of set bits of each element (int64, same shape), on NumPy 1 and 2."""
    values = np.asarray(values, dtype=np.uint64)
    if impl == 'auto':
        impl = 'numpy' if hasattr(np, 'bitwise_count') else 'bytes'
    if impl == 'ref':
        return np.array([bin(int(v)).count('1') for v in values.reshape(-1)], dtype=np.int64).reshape(values.shape)
    if impl == 'numpy':
        if not hasattr(np, 'bitwise_count'):
            raise ValueError(f'popcount64: impl numpy needs NumPy >= 2.0 (this is {np.__version__}); use bytes or auto')
        return np.bitwise_count(values).astype(np.int64)
    if impl == 'bytes':
        # Each uint64 as 8 bytes, each byte's count from a 256-entry table.
        table = np.array([bin(i).count('1') for i in range(256)], dtype=np.int64)
        as_bytes = np.ascontiguousarray(values).view(np.uint8).reshape(values.shape + (8,))      # [..., 8]
        return table[as_bytes].sum(axis=-1)
    raise ValueError(f'popcount64: impl {impl!r} is not one of {", ".join(POPCOUNT_IMPLS)}')

def process_image(task: dict) -> dict:
    """Decode, check and transform one image, writing the staged PNG; returns what the build needs to know."""
    out = dict(index=task['index'])
    try:
        with open(task['local'], 'rb') as f:
            data = f.read()
    except OSError as e:
        return dict(out, status='unreadable', detail=e.strerror or _one_line(e))
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return dict(out, status='unreadable', detail='not an image file Pillow can read')
    except Exception as e:  # Pillow raises many types for broken headers
        return dict(out, status='unreadable', detail=_one_line(e))
    w, h = img.size
    min_size = task['min_size']
    if w < min_size or h < min_size:
        return dict(out, status='too_small', detail=f'{w}x{h} < {min_size}')
    try:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)    # camera photos store their rotation in EXIF
        img, gray = to_canonical(img)
    except Exception as e:  # truncated data, bad EXIF, decompression bombs
        return dict(out, status='unreadable', detail=_one_line(e))
    res = task['resolution']
    staged = to_square(img, task['square'])
    if staged.size != (res, res):
        staged = staged.resize((res, res), Image.Resampling.LANCZOS)
    staged.save(task['stage'], format='PNG', compress_level=task['compress_level'])
    return dict(out, status='ok', detail='', width=w, height=h, gray=gray, content=content_hash(img), dhash=dhash64(img))

def convert_staged(task: dict) -> None:
    """Rewrite a staged PNG with the output channel count (1: luma, 3: gray repeated)."""
    with Image.open(task['stage']) as img:
        img = img.convert('L' if task['channels'] == 1 else 'RGB')
    img.save(task['stage'], format='PNG', compress_level=task['compress_level'])

def _parallel_map(fn, tasks: list, workers: int, desc: str) -> list:
    """fn over tasks on `workers` processes, results in task order, with a progress bar."""
    bar = dict(total=len(tasks), desc=desc, unit='img', disable=None)
    if workers <= 1 or len(tasks) <= 1:
        return [fn(task) for task in tqdm(tasks, **bar)]
    chunksize = max(1, min(16, len(tasks) // (workers * 8)))
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(fn, tasks, chunksize=chunksize), **bar))

def default_workers() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1

#----------------------------------------------------------------------------
# Zips.

def _zip_info(name: str, compress: int) -> zipfile.ZipInfo:
    # A fixed timestamp and mode make the zip's bytes, and so its SHA-256, depend on the content only.
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = compress
    info.external_attr = 0o644 << 16
    return info

def write_zip(
    path:       Path,                   # final path; written to a temporary name beside it first
    members:    list[tuple[str, str]],  # (name in zip, staged file), sorted by name
    labels:     list | None,            # [[name, class index], ...] or None
) -> tuple[str, str]:
    """Write a dataset zip under a temporary name; returns (temporary path, hex SHA-256 of its bytes)."""
    fd, tmp = make_temp_file(path.parent, prefix=f'.{path.name}.', suffix='.tmp')   # final zip: readable by others
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, 'w') as zf:
            for name, staged in members:
                # PNGs are compressed already: storing them keeps reads fast and costs nothing.
                with open(staged, 'rb') as f:
                    zf.writestr(_zip_info(name, zipfile.ZIP_STORED), f.read())
            meta = json.dumps({'labels': labels}, separators=(',', ':'))
            zf.writestr(_zip_info('dataset.json', zipfile.ZIP_DEFLATED), meta)
        digest = hashlib.sha256()
        with open(tmp, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                digest.update(block)
    except BaseException:
        os.remove(tmp)
        raise
    return tmp, digest.hexdigest()

#----------------------------------------------------------------------------
# The build.

def _write_zips(
    dest:       Path,
    taxa:       dict,                   # name -> entry with rank, dataset, labels (tree order)
    files:      list[tuple],            # (name in zip, taxon path, staged PNG), sorted by name
    ranks:      list[str],              # chosen ranks, top first
    tmp_zips:   list[str],              # temporary files written so far; the caller removes leftovers
) -> dict[str, str]:
    """Write every taxon's zip under a temporary name, then rename them all; returns name -> SHA-256."""
    members = {name: [] for name in taxa}
    labels = {name: [] for name in taxa}
    class_index = {name: {label: i for i, label in enumerate(e['labels'] or [])} for name, e in taxa.items()}
    for file, path, staged in files:
        for depth, name in enumerate(path):
            members[name].append((file, staged))
            if taxa[name]['labels'] is not None:
                label = path[depth + 1] if depth + 1 < len(path) else taxonomy.unplaced_label(name)
                labels[name].append([file, class_index[name][label]])
    hashes = {}
    done = []
    with tqdm(total=sum(len(m) for m in members.values()), desc='zips', unit='img', disable=None) as bar:
        for name, entry in taxa.items():
            tmp, hashes[name] = write_zip(dest / entry['dataset'], members[name],
                                          labels[name] if entry['labels'] is not None else None)
            tmp_zips.append(tmp)
            done.append((tmp, dest / entry['dataset']))
            bar.update(len(members[name]))
    # Renamed only once all are written, so an interrupted build leaves the previous zips as they were.
    for tmp, final in done:
        os.replace(tmp, final)
        tmp_zips.remove(tmp)
    return hashes

def _check_ranks(
    ranks:      list[str],              # ranks asked for
    available:  list[str],              # ranks they must come from, top first
    source:     Path,
    option:     str,                    # the option that sets `available`, for the message
    what:       str = '--ranks',        # the option that set `ranks`
) -> None:
    if not ranks:
        raise CollectionError(f'{what} is empty')
    if len(set(ranks)) != len(ranks):
        raise CollectionError(f"{what} {','.join(ranks)}: a rank is listed twice")
    for rank in ranks:
        if rank not in available:
            raise CollectionError(f"{source}: unknown rank '{rank}' in {what} (known: {_preview(available, 24)}; "
                                  f"see {option})")
    order = [available.index(rank) for rank in ranks]
    if order != sorted(order):
        raise CollectionError(f"{what} {','.join(ranks)}: list the ranks from the top down, as in {', '.join(available)}")

def _check_dest(dest: Path) -> None:
    try:
        dest.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=dest, prefix='.write-test-')
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CollectionError(f'{dest}: destination is not writable: {e.strerror or e}') from None

def _drop(dropped: list, record: Record, reason: str, detail: str) -> None:
    dropped.append(dict(source=record.source, reason=reason, detail=detail))

def _taxa_entries(tree: dict) -> dict:
    """Tree-ordered taxa with their label lists, from build_tree's output."""
    ordered = {}
    def visit(name):
        entry = dict(tree[name])
        if entry['children']:
            entry['labels'] = list(entry['children'])
            if entry['num_images_direct']:
                entry['labels'].append(taxonomy.unplaced_label(name))
        else:
            entry['labels'] = None
        ordered[name] = entry
        for child in entry['children']:
            visit(child)
    for root in sorted(name for name, entry in tree.items() if entry['parent'] is None):
        visit(root)
    return ordered

def _make_manifest(taxa: dict, hashes: dict, config: dict, channels: int, dropped: list, extra: dict):
    counts = {reason: 0 for reason in taxonomy.DROP_REASONS}
    for item in dropped:
        counts[item['reason']] += 1
    data = {
        'format': taxonomy.MANIFEST_FORMAT, 'ranks': list(config['ranks']), 'resolution': config['resolution'],
        'channels': channels, 'options': config,
        'taxa': {name: dict(rank=e['rank'], parent=e['parent'], children=e['children'], dataset=e['dataset'],
                            num_images=e['num_images'], num_images_direct=e['num_images_direct'], labels=e['labels'],
                            sha256=hashes.get(name, '')) for name, e in taxa.items()},
        'dropped': dropped, 'dropped_counts': counts, **extra,
    }
    return data

def format_dropped(counts: dict) -> str:
    """'dropped 5: too_small 3, unreadable 2' (reasons with a zero count left out)."""
    total = sum(counts.values())
    parts = [f'{reason} {n}' for reason, n in counts.items() if n]
    return f'dropped {total}' + (': ' + ', '.join(parts) if parts else '')

def build_datasets(
    source:             str,            # folder tree, BOLD-style table or EcoTaxa export
    dest:               str,            # output folder for <Taxon>.zip and manifest.json
    ranks:              str | list,     # ranks to build a dataset for, top first (list or 'a,b')
    resolution:         int,            # output side in pixels, a power of two
    fmt:                str,            # 'auto', 'tree', 'bold' or 'ecotaxa'
    rank_cols:          str | list | None,  # BOLD taxonomy columns, top first; None: DEFAULT_RANK_COLS
    path_col:           str | None,     # image path/URL column; None: detect
    id_col:             str | None,     # id column matched by --exclude; None: detect
    tree_ranks:         str | list | None,  # ranks of folder/hierarchy levels; None: `ranks`
    root:               str | None,     # taxon at tree_ranks[0]; None: top folder / shared EcoTaxa taxon
    min_size:           int,            # pixels; both sides must be >= it; 0 keeps all
    exclude:            str | None,     # file listing ids/paths/URLs to leave out; None: none
    near_dup_threshold: int,            # max dHash Hamming distance of a near duplicate; -1: no check
    max_per_taxon:      int | None,     # images kept per taxon at its deepest rank; None: all
    square:             str,            # 'pad', 'crop' or 'stretch'
    channels:           str,            # '1', '3' or 'auto'
    workers:            int | None,     # processes; None: all cores
    download_threads:   int,            # concurrent downloads
    cache:              str | None,     # download cache folder; None: DEST/.download-cache
    timeout:            float,          # seconds per HTTP connect/read
    retries:            int,            # HTTP retries after the first try
    compress_level:     int,            # PNG zlib level 0-9
    dry_run:            bool,           # print the plan, touch nothing
    log                 = print,        # where to print the summary
) -> taxonomy.Manifest | None:
    """Build DEST/<Taxon>.zip for every taxon at `ranks` and DEST/manifest.json; returns the manifest."""
    source_path, dest_path = Path(source), Path(dest)
    ranks = _parse_list(ranks)
    if not ranks:
        raise CollectionError('--ranks is empty: name the ranks to build datasets for, e.g. class,order')
    rank_cols = _parse_list(rank_cols) or list(DEFAULT_RANK_COLS)
    tree_ranks = _parse_list(tree_ranks) or list(ranks)
    if resolution < 4 or resolution & (resolution - 1):
        raise CollectionError(f'--resolution {resolution}: must be a power of two (4 or more)')
    if square not in SQUARE_MODES:
        raise CollectionError(f'--square {square}: must be one of {", ".join(SQUARE_MODES)}')
    if str(channels) not in ('1', '3', 'auto'):
        raise CollectionError(f'--channels {channels}: must be 1, 3 or auto')
    workers = workers or default_workers()
    cache_path = Path(cache) if cache else dest_path / '.download-cache'
    config = dict(source=str(source), dest=str(dest), ranks=ranks, resolution=resolution, format=fmt,
                  rank_cols=rank_cols, path_col=path_col, id_col=id_col, tree_ranks=tree_ranks, root=root,
                  min_size=min_size, exclude=exclude, near_dup_threshold=near_dup_threshold,
                  max_per_taxon=max_per_taxon, square=square, channels=str(channels), workers=workers,
                  download_threads=download_threads, cache=str(cache_path), timeout=timeout, retries=retries,
                  compress_level=compress_level)

    # Records, in a fixed order: everything downstream (file names, which duplicate is kept) follows it.
    records, available, fmt = read_source(source_path, fmt, rank_cols, path_col, id_col, tree_ranks, root,
                                          skip=[dest_path, cache_path])
    config['format'] = fmt
    if fmt == 'ecotaxa' and root is None:
        top = next((record.lineage[0] for record in records if record.lineage), None)
        if top is not None:
            log(f'EcoTaxa root: {top[1]} taken as the {top[0]} (the deepest taxon every annotated row shares); '
                f'--root NAME to choose another')
    if fmt != 'bold':
        # Folder and hierarchy levels have no rank names of their own: catch typos against the standard ranks.
        _check_ranks(tree_ranks, list(taxonomy.STANDARD_RANKS), source_path, '--tree-ranks', what='--tree-ranks')
    _check_ranks(ranks, available, source_path, '--rank-cols' if fmt == 'bold' else '--tree-ranks')
    if not records:
        raise CollectionError(f'{source_path}: no images found')
    records = [record for _key, record in sorted(((r.source, i), r) for i, r in enumerate(records))]
    named = {rank for record in records for rank, _name in record.lineage}
    missing = [rank for rank in ranks if rank not in named]
    if missing:
        # Deeper than the source goes (a tree two folders deep asked for family): no dataset could have that rank.
        raise CollectionError(f'{source_path}: no image is identified to rank {missing[0]!r} '
                              f'(ranks with names here: {", ".join(r for r in available if r in named) or "none"})')
    exclusions = read_exclusions(Path(exclude)) if exclude else []

    dropped = []
    candidates = []
    excluded_keys = set(exclusions)
    matched = set()
    for record in records:
        lineage = dict(record.lineage)
        path = []
        for rank in ranks:
            if rank not in lineage:
                break
            path.append(lineage[rank])
        record.path = tuple(path)
        hits = _exclusion_keys(record) & excluded_keys
        if hits:
            matched |= hits
            _drop(dropped, record, 'excluded', f'listed in {exclude}')
        elif record.problem or not record.path:
            _drop(dropped, record, 'no_taxon', record.problem or f'not identified to {ranks[0]}')
        else:
            candidates.append(record)
    unmatched = [entry for entry in exclusions if entry not in matched]
    if unmatched:
        log(f'warning: {len(unmatched)} of {len(exclusions)} exclusion entries match no image: {_preview(unmatched, 5)}')
    try:
        taxonomy.build_tree([(r.path, r.source) for r in candidates], ranks)    # fail early on homonyms
    except ValueError as e:
        raise CollectionError(f'{source_path}: {e}') from None

    if dry_run:
        return _print_plan(candidates, dropped, ranks, source_path, dest_path, fmt, len(records), log)
    _check_dest(dest_path)

    # Downloads.
    urls = sorted({r.location for r in candidates if _is_url(r.location)})
    fetched = download_all(urls, cache_path, timeout, retries, download_threads) if urls else {}
    readable = []
    for record in candidates:
        if _is_url(record.location):
            local, why = fetched[record.location]
            if local is None:
                _drop(dropped, record, 'download_failed', why)
                continue
            record.local = local
        else:
            record.local = record.location
        readable.append(record)

    stage_dir = Path(tempfile.mkdtemp(dir=dest_path, prefix='.build-'))
    tmp_zips = []
    try:
        tasks = [dict(index=i, local=r.local, min_size=min_size, resolution=resolution, square=square,
                      compress_level=compress_level, stage=str(stage_dir / f'{i:08d}.png'))
                 for i, r in enumerate(readable)]
        results = _parallel_map(process_image, tasks, workers, 'images')

        # Duplicates: the first image in source order is kept, later copies are dropped.
        kept = []
        first_by_content = {}
        kept_hashes = np.zeros(len(results), dtype=np.uint64)
        kept_sources = []
        for record, result in zip(readable, results):
            if result['status'] != 'ok':
                _drop(dropped, record, result['status'], result['detail'])
                continue
            original = first_by_content.get(result['content'])
            if original is not None:
                _drop(dropped, record, 'duplicate', f'same pixels as {original}')
                continue
            if near_dup_threshold >= 0 and kept_sources:
                distances = popcount64(kept_hashes[:len(kept_sources)] ^ np.uint64(result['dhash']))
                nearest = int(np.argmin(distances))
                if distances[nearest] <= near_dup_threshold:
                    _drop(dropped, record, 'near_duplicate',
                          f'dHash distance {int(distances[nearest])} to {kept_sources[nearest]}')
                    continue
            first_by_content[result['content']] = record.source
            kept_hashes[len(kept_sources)] = result['dhash']
            kept_sources.append(record.source)
            kept.append((record, result))

        # --max-per-taxon: keep the images with the smallest content hashes, a fixed pseudo-random choice
        # that does not favour any file names.
        if max_per_taxon is not None:
            groups = {}
            for item in kept:
                groups.setdefault(item[0].path[-1], []).append(item)
            over = set()
            for taxon, items in groups.items():
                if len(items) > max_per_taxon:
                    for record, result in sorted(items, key=lambda item: item[1]['content'])[max_per_taxon:]:
                        over.add(id(record))
                        _drop(dropped, record, 'max_per_taxon', f'{taxon} has {len(items)} images, {max_per_taxon} kept')
            kept = [item for item in kept if id(item[0]) not in over]
        dropped.sort(key=lambda item: item['source'])   # stable: same-source entries keep their stage order
        if not kept:
            reasons = format_dropped(_make_manifest({}, {}, config, 0, dropped, {})['dropped_counts']).split(': ', 1)[-1]
            raise CollectionError(f'{source_path}: all {len(records)} images were dropped ({reasons}); nothing to build')

        # Channels, then the final file names in source order.
        out_channels = int(channels) if channels != 'auto' else (1 if all(r['gray'] for _rec, r in kept) else 3)
        convert = [dict(stage=tasks[r['index']]['stage'], channels=out_channels, compress_level=compress_level)
                   for _rec, r in kept if r['gray'] != (out_channels == 1)]
        if convert:
            _parallel_map(convert_staged, convert, workers, 'channels')
        files = [(f'img{k:08d}.png', record, tasks[result['index']]['stage'], result)
                 for k, (record, result) in enumerate(kept)]

        # One zip per taxon, all written under temporary names before any is renamed.
        taxa = _taxa_entries(taxonomy.build_tree([(record.path, record.source) for _f, record, _s, _r in files], ranks))
        hashes = _write_zips(dest_path, taxa, [(file, record.path, staged) for file, record, staged, _r in files],
                             ranks, tmp_zips)
        images = [dict(file=file, source=record.source, taxon=record.path[-1], sha256=result['content'])
                  for file, record, _staged, result in files]
        data = _make_manifest(taxa, hashes, config, out_channels, dropped, dict(images=images))
        taxonomy.write_json_atomic(dest_path / taxonomy.MANIFEST_NAME, data)
    finally:
        for tmp in tmp_zips:
            if os.path.exists(tmp):
                os.remove(tmp)
        shutil.rmtree(stage_dir, ignore_errors=True)

    manifest = taxonomy.manifest_from_dict(data, dest_path)
    log(manifest.format_tree())
    log(format_dropped(manifest.dropped_counts))
    log(f'wrote {len(taxa)} datasets ({resolution}x{resolution}, {out_channels} channel{"s" if out_channels > 1 else ""}) '
        f'and {taxonomy.MANIFEST_NAME} to {dest_path}')
    return manifest

def _print_plan(candidates, dropped, ranks, source_path, dest_path, fmt, num_records, log) -> None:
    taxa = _taxa_entries(taxonomy.build_tree([(r.path, r.source) for r in candidates], ranks))
    plan = taxonomy.manifest_from_dict(_make_manifest(taxa, {}, dict(ranks=ranks, resolution=0), 0,
                                                      dropped, {}), dest_path)
    log(f'dry run: {num_records} images listed in {source_path} ({fmt}); {len(candidates)} candidates '
        f'(counts before the image checks: size, readability, duplicates, --max-per-taxon)')
    if candidates:
        log(plan.format_tree())
    log(format_dropped(plan.dropped_counts))
    log(f'would write to {dest_path}: ' + ', '.join([e['dataset'] for e in taxa.values()] + [taxonomy.MANIFEST_NAME]))
    return None

#----------------------------------------------------------------------------
