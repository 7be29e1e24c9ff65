"""Image collections (folder tree, BOLD-style table, EcoTaxa export) -> per-taxon training sets.

`build_datasets(BuildOptions(...))` is a pipeline of stages, each over all images in a fixed order (sources
sorted by name), each passing on what it kept and saying what it dropped and why (`Sifted`):
checked_options -> read_records -> place_records (taxon path at the chosen ranks, exclusion list) ->
fetch_records (URLs into a download cache) -> decode_images (decode, check, square, resize in parallel, a staged
PNG each) -> drop_duplicates (exact and near) -> cap_per_taxon (--max-per-taxon) -> settle_channels ->
write_datasets (one zip per taxon with its labels and class names, then the manifest; every file under a temporary
name renamed into place at the end).
"""

import concurrent.futures
import contextlib
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
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from stylegan2ada.util import UserError, atomic_write, make_temp_file, parse_list, sha256_file, write_json_atomic
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
DRAFT_MARGIN = 3            # JPEG draft decoding keeps the side the resize starts from >= this x the resolution
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
    suffix = Path(urllib.parse.urlparse(url).path).suffix.lower()
    return hashlib.sha256(url.encode('utf-8')).hexdigest()[:40] + (suffix if suffix in IMAGE_SUFFIXES else '.img')

def make_session(
    retries:    int,                    # retries after the first try, for connection errors and 429/5xx
) -> 'requests.Session':
    """A requests session that retries failed GETs with exponential backoff."""
    # requests (and urllib3) imported here: a build of local files starts without them.
    import requests  # pylint: disable=import-outside-toplevel
    from requests.adapters import HTTPAdapter  # pylint: disable=import-outside-toplevel
    from urllib3.util.retry import Retry  # pylint: disable=import-outside-toplevel
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
    session:    'requests.Session',
    timeout:    float,                  # seconds, per connect and per read
) -> str:
    """Local path of `url`, downloading it into the cache unless it is there; raises OSError on failure."""
    import requests  # pylint: disable=import-outside-toplevel  (see make_session)
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
        try:
            with atomic_write(target, 'wb') as f:
                for chunk in response.iter_content(chunk_size=1 << 16):
                    f.write(chunk)
        except requests.RequestException as e:
            raise OSError(f'{type(e).__name__}: {_one_line(e)}') from None
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
    w, h = img.size
    # The four edges only: a copy of the whole image into NumPy cost 5 % of a build.
    edges = [img.crop(box) for box in ((0, 0, w, 1), (0, h - 1, w, h), (0, 0, 1, h), (w - 1, 0, w, h))]
    top, bottom, left, right = (np.asarray(e).reshape(-1, len(img.getbands())) for e in edges)     # [pixels, C]
    frame = np.concatenate([top, bottom, left[1:-1], right[1:-1]], axis=0)                       # [border pixels, C]
    colour = tuple(int(v) for v in np.round(np.median(frame, axis=0)))
    return colour[0] if len(colour) == 1 else colour

def to_square(
    img:        Image.Image,
    square:     str,                    # SQUARE_MODES
    colour      = None,                 # padding colour; None: border_colour(img)
) -> Image.Image:
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
        canvas = Image.new(img.mode, (s, s), border_colour(img) if colour is None else colour)
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
    # A colour image nearly always shows it in a sample of its pixels (nearest-neighbour picks stored pixels, so a
    # coloured one there is a coloured one in the image); only images that pass it need the full test.
    sample = img.resize((max(1, img.width // 8), max(1, img.height // 8)), Image.Resampling.NEAREST)
    if not _within_gray_tolerance(sample):
        return img, False
    if _within_gray_tolerance(img):
        return img.convert('L'), True
    return img, False

def _within_gray_tolerance(img: Image.Image) -> bool:
    """Whether no pixel of an RGB image has |R-G| or |G-B| above GRAY_TOLERANCE."""
    r, g, b = img.split()
    # Pillow's C loops: about 10x faster than the same test on NumPy int16 arrays.
    return max(ImageChops.difference(r, g).getextrema()[1], ImageChops.difference(g, b).getextrema()[1]) <= GRAY_TOLERANCE

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

def draft_scale(
    width:      int,                    # pixels, as stored
    height:     int,
    resolution: int,                    # output side
    square:     str,                    # SQUARE_MODES: which side the resize starts from
) -> int:
    """The largest JPEG DCT scaling (1, 2, 4 or 8) that keeps the side the resize starts from >= DRAFT_MARGIN x resolution."""
    side = max(width, height) if square == 'pad' else min(width, height)
    scale = 1
    while scale < 8 and -(-side // (2 * scale)) >= DRAFT_MARGIN * resolution:     # the decoder rounds sizes up
        scale *= 2
    return scale

def square_resized(
    img:        Image.Image,            # 'L' or 'RGB'
    square:     str,                    # SQUARE_MODES
    resolution: int,                    # output side
) -> Image.Image:
    """to_square, then the Lanczos resize to resolution x resolution: the same pixels, with less work for wide images."""
    w, h = img.size
    s = max(w, h)
    if square != 'pad' or w == h or s == resolution:
        staged = to_square(img, square)
        return staged if staged.size == (resolution, resolution) else staged.resize((resolution, resolution), Image.Resampling.LANCZOS)
    # Pillow resizes rows first, then columns, through an 8-bit image, and a row of one colour resizes to that colour.
    # Wide image: the padded rows above and below are one colour, so only the image's h rows need the row pass.
    if w > h:
        middle = Image.new(img.mode, (resolution, s), border_colour(img))
        middle.paste(img.resize((resolution, h), Image.Resampling.LANCZOS), (0, (s - h) // 2))
        return middle.resize((resolution, resolution), Image.Resampling.LANCZOS)
    # Tall image: the output columns whose filter window lies in the left or right padding are one colour; the row
    # pass computes the others only (resize's box: Pillow's coefficients for those columns, unchanged).
    colour = border_colour(img)
    canvas = to_square(img, 'pad', colour)
    j0, j1 = _image_columns(s, resolution, (s - w) // 2, w)
    scale = s / resolution
    middle = Image.new(img.mode, (resolution, s), colour)
    middle.paste(canvas.resize((j1 - j0, s), Image.Resampling.LANCZOS, box=(j0 * scale, 0, j1 * scale, s)), (j0, 0))
    return middle.resize((resolution, resolution), Image.Resampling.LANCZOS)

def _image_columns(
    size:       int,                    # input side (the padded square's)
    out_size:   int,                    # output side
    start:      int,                    # first input column of the image
    width:      int,                    # input columns of the image
) -> tuple[int, int]:
    """[j0, j1): the output columns of a Lanczos resize whose input window (as Pillow computes it) meets the image."""
    scale = size / out_size             # input pixels per output pixel
    support = 3.0 * max(scale, 1.0)     # Lanczos's support of 3, widened by the scale when downscaling (as Pillow)

    def meets(j):
        center = (j + 0.5) * scale
        # Pillow's window: int() truncates as its C casts do; the window is [xmin, xmax).
        xmin, xmax = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), size)
        return xmin < start + width and xmax > start

    first = next(j for j in range(out_size) if meets(j))
    last = next(j for j in reversed(range(out_size)) if meets(j))
    return max(first - 1, 0), min(last + 2, out_size)          # one spare column each side: computed, not assumed

def square_reduced(
    img:        Image.Image,            # decoded at 1/scale of `full` (sides rounded up), upright
    square:     str,                    # SQUARE_MODES
    resolution: int,                    # output side
    full:       tuple[int, int],        # (width, height) of the full-size image, upright
    scale:      int,                    # 2, 4 or 8
) -> Image.Image:
    """What to_square and the Lanczos resize make of the full-size image, made from the reduced one.

    Each reduced pixel stands for k x k full-size ones, so the square is taken in full-size coordinates divided by k
    (fractional) and handed to resize as its box: the output covers exactly what the full-size path's does, whatever
    the rounding of the reduced sides and of the pad offsets.
    """
    (w, h), k = full, scale
    if square == 'stretch':
        return img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=(0, 0, w / k, h / k))
    if square == 'crop':
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return img.resize((resolution, resolution), Image.Resampling.LANCZOS,
                          box=(left / k, top / k, (left + s) / k, (top + s) / k))
    # pad: the full-size canvas is s x s with the image at (ox, oy); the reduced canvas holds the image at whole
    # pixels (px, py) and the full canvas's box around it, the rest in the border colour as to_square fills it.
    s = max(w, h)
    ox, oy = (s - w) // 2, (s - h) // 2
    px, py = -(-ox // k), -(-oy // k)
    x0, y0 = px - ox / k, py - oy / k
    side = max(-(-(px * k - ox + s) // k), -(-(py * k - oy + s) // k), px + img.size[0], py + img.size[1])
    canvas = Image.new(img.mode, (side, side), border_colour(img))
    canvas.paste(img, (px, py))
    return canvas.resize((resolution, resolution), Image.Resampling.LANCZOS, box=(x0, y0, x0 + s / k, y0 + s / k))

def _write_png(path: str, img: Image.Image, compress_level: int) -> None:
    # Pillow's encoder, as every build before: the same pixels give the same zip bytes, so a rebuild leaves the
    # manifest's SHA-256s, and with them every trained stage of a plan, as they are. (A one-filter encoder of our own
    # was 10 % faster overall but changed every zip's bytes and made them 11 % larger.)
    img.save(path, format='PNG', compress_level=compress_level)

def process_image(task: dict) -> dict:
    """Decode, check and transform one image, writing the staged PNG; returns what the build needs to know.

    The task's optional keys: draft (JPEG decoded at a reduced size where draft_scale allows; default off) and
    channels ('1' or '3': the staged PNG's channels; 'auto': a grayscale image's pixels are staged raw, for
    settle_channels to encode once the channel count is known; absent: as decoded).
    """
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
    res = task['resolution']
    try:
        scale = draft_scale(w, h, res, task['square']) if task.get('draft', False) else 1
        if scale > 1:
            # The JPEG decoder's DCT scaling: 1/scale of the pixels for less than the full decode's cost, and the
            # resize below starts from a quarter (or less) of the pixels. Other formats ignore draft.
            img.draft(img.mode, (w // scale, h // scale))
        img.load()
        ImageOps.exif_transpose(img, in_place=True)    # camera photos store their rotation in EXIF
        img, gray = to_canonical(img)
    except Exception as e:  # truncated data, bad EXIF, decompression bombs
        return dict(out, status='unreadable', detail=_one_line(e))
    if img.size not in ((w, h), (h, w)):
        # Decoded at 1/scale (sides rounded up); EXIF may have turned it: the full size upright.
        upright = (w, h) if img.size == (-(-w // scale), -(-h // scale)) else (h, w)
        staged = square_reduced(img, task['square'], res, upright, scale)
    else:
        staged = square_resized(img, task['square'], res)
    facts = dict(out, status='ok', detail='', width=w, height=h, gray=gray, content=content_hash(img), dhash=dhash64(img),
                 raw=None)
    channels = task.get('channels')
    if channels == 'auto' and gray:
        # Encoded by settle_channels as 'L' or 'RGB' once every image is decoded: each image is encoded once.
        facts['raw'] = task['stage'] + '.raw'
        with open(facts['raw'], 'wb') as f:
            f.write(staged.tobytes())
    else:
        if channels in ('1', '3'):
            staged = staged.convert('L' if channels == '1' else 'RGB')
        _write_png(task['stage'], staged, task['compress_level'])
    return facts

def encode_staged(task: dict) -> None:
    """Encode a grayscale image staged raw by process_image as the staged PNG with the output channel count."""
    res = task['resolution']
    with open(task['raw'], 'rb') as f:
        img = Image.frombytes('L', (res, res), f.read())
    _write_png(task['stage'], img if task['channels'] == 1 else img.convert('RGB'), task['compress_level'])
    os.remove(task['raw'])

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

def zip_info(name: str, compress: int = zipfile.ZIP_STORED) -> zipfile.ZipInfo:
    """A zip entry with a fixed timestamp and mode (dataset zips, held-out splits)."""
    # A fixed timestamp and mode make the zip's bytes, and so its SHA-256, depend on the content only.
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = compress
    info.external_attr = 0o644 << 16
    return info

def write_zip(
    f,                                  # binary file open for writing (atomic_write's)
    members:        list[tuple[str, str]],  # (name in zip, staged file), sorted by name
    labels:         list | None,        # [[name, class index], ...] or None
    label_names:    list | None,        # class names, position = class index; with `labels` only
) -> None:
    """Write a dataset zip: the PNGs as stored, then dataset.json with the labels and their class names."""
    with zipfile.ZipFile(f, 'w') as zf:
        for name, staged in members:
            # PNGs are compressed already: storing them keeps reads fast and costs nothing.
            with open(staged, 'rb') as png:
                zf.writestr(zip_info(name, zipfile.ZIP_STORED), png.read())
        # The class names travel with the labels, so that a zip is readable without the manifest.
        meta = {'labels': labels} if labels is None else {'labels': labels, 'label_names': label_names}
        zf.writestr(zip_info('dataset.json', zipfile.ZIP_DEFLATED), json.dumps(meta, separators=(',', ':')))

def _zip_contents(
    taxa:       dict,                   # name -> entry with labels (tree order)
    files:      list[tuple],            # (name in zip, taxon path, staged PNG), sorted by name
) -> tuple[dict, dict]:
    """Each taxon's members [(name in zip, staged PNG)] and labels [[name, class index]] (None: unlabelled)."""
    members = {name: [] for name in taxa}
    labels = {name: [] if entry['labels'] is not None else None for name, entry in taxa.items()}
    class_index = {name: {label: i for i, label in enumerate(e['labels'] or [])} for name, e in taxa.items()}
    for file, path, staged in files:
        for depth, name in enumerate(path):
            members[name].append((file, staged))
            if labels[name] is not None:
                label = path[depth + 1] if depth + 1 < len(path) else taxonomy.unplaced_label(name)
                labels[name].append([file, class_index[name][label]])
    return members, labels

def write_zips(
    dest:       Path,
    taxa:       dict,                   # name -> entry with dataset and labels (tree order)
    files:      list[tuple],            # (name in zip, taxon path, staged PNG), sorted by name
) -> dict[str, str]:
    """Write every taxon's zip, all renamed into place only once all are written; returns name -> SHA-256."""
    members, labels = _zip_contents(taxa, files)
    # An interrupted build leaves the previous zips as they were: every atomic_write of the stack renames its file
    # when the stack closes without an error, and removes it otherwise.
    with contextlib.ExitStack() as stack, \
            tqdm(total=sum(len(m) for m in members.values()), desc='zips', unit='img', disable=None) as bar:
        for name, entry in taxa.items():
            f = stack.enter_context(atomic_write(dest / entry['dataset'], 'wb'))
            write_zip(f, members[name], labels[name], entry['labels'])
            bar.update(len(members[name]))
    return {name: sha256_file(dest / entry['dataset']) for name, entry in taxa.items()}

#----------------------------------------------------------------------------
# The build's options and what its stages pass on.

@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Everything a build depends on; the defaults are those of `dataset_tool_ext.py build`."""
    source:             str                             # folder tree, BOLD-style table or EcoTaxa export
    dest:               str                             # output folder for <Taxon>.zip and manifest.json
    ranks:              str | tuple = 'class,order'     # ranks to build a dataset for, top first ('a,b' or a sequence)
    resolution:         int = 256                       # output side in pixels, a power of two
    fmt:                str = 'auto'                    # 'auto', 'tree', 'bold' or 'ecotaxa'
    rank_cols:          str | tuple | None = DEFAULT_RANK_COLS  # BOLD taxonomy columns, top first; None: DEFAULT_RANK_COLS
    path_col:           str | None = None               # image path/URL column; None: detect
    id_col:             str | None = None               # id column matched by --exclude; None: detect
    tree_ranks:         str | tuple | None = None       # ranks of folder/hierarchy levels; None: `ranks`
    root:               str | None = None               # taxon at tree_ranks[0]; None: top folder / shared EcoTaxa taxon
    min_size:           int = 256                       # pixels; both sides must be >= it; 0 keeps all
    exclude:            str | None = None               # file listing ids/paths/URLs to leave out; None: none
    near_dup_threshold: int = 4                         # max dHash Hamming distance of a near duplicate; -1: no check
    max_per_taxon:      int | None = None               # images kept per taxon at its deepest rank; None: all
    square:             str = 'pad'                     # 'pad', 'crop' or 'stretch'
    channels:           str = 'auto'                    # '1', '3' or 'auto'
    workers:            int | None = None               # processes; None: all cores
    download_threads:   int = 8                         # concurrent downloads
    cache:              str | None = None               # download cache folder; None: DEST/.download-cache
    timeout:            float = 30.0                    # seconds per HTTP connect/read
    retries:            int = 3                         # HTTP retries after the first try
    compress_level:     int = 1                         # PNG zlib level 0-9
    jpeg_draft:         bool = True                     # JPEGs decoded at 1/2, 1/4 or 1/8 size where draft_scale allows
    dry_run:            bool = False                    # print the plan, touch nothing

    def manifest_options(self, fmt: str) -> dict:
        """The options as the manifest records them (checked_options' values, the format as read)."""
        return dict(source=str(self.source), dest=str(self.dest), ranks=list(self.ranks), resolution=self.resolution,
                    format=fmt, rank_cols=list(self.rank_cols), path_col=self.path_col, id_col=self.id_col,
                    tree_ranks=list(self.tree_ranks), root=self.root, min_size=self.min_size, exclude=self.exclude,
                    near_dup_threshold=self.near_dup_threshold, max_per_taxon=self.max_per_taxon, square=self.square,
                    channels=self.channels, workers=self.workers, download_threads=self.download_threads,
                    cache=self.cache, timeout=self.timeout, retries=self.retries, compress_level=self.compress_level,
                    jpeg_draft=self.jpeg_draft)

@dataclasses.dataclass(frozen=True)
class StagedImage:
    """An image that decoded and passed the checks: its record, its staged PNG and what process_image found."""
    record:     Record
    staged:     str                     # the staged PNG: square, at the output resolution
    facts:      dict                    # process_image's result: width, height, gray, content (SHA-256), dhash

@dataclasses.dataclass(frozen=True)
class Sifted:
    """What one stage of the build passes on, and what it dropped and why."""
    kept:       list                    # records or StagedImages, in source order
    dropped:    list[dict]              # [{source, reason, detail}, ...] in the order the stage met them

def _dropped(record: Record, reason: str, detail: str) -> dict:
    return dict(source=record.source, reason=reason, detail=detail)

def count_drops(dropped: list[dict]) -> dict[str, int]:
    """Drops per reason, every reason of taxonomy.DROP_REASONS listed (in its order)."""
    counts = {reason: 0 for reason in taxonomy.DROP_REASONS}
    for item in dropped:
        counts[item['reason']] += 1
    return counts

def format_reasons(counts: dict) -> str:
    """'too_small 3, unreadable 2' (reasons with a zero count left out)."""
    return ', '.join(f'{reason} {n}' for reason, n in counts.items() if n)

def format_dropped(counts: dict) -> str:
    """'dropped 5: too_small 3, unreadable 2' (reasons with a zero count left out)."""
    reasons = format_reasons(counts)
    return f'dropped {sum(counts.values())}' + (': ' + reasons if reasons else '')

#----------------------------------------------------------------------------
# The build's stages, in the order they run.

def checked_options(options: BuildOptions) -> BuildOptions:
    """The options with lists parsed and defaults filled in (workers, cache); CollectionError for a bad value."""
    ranks = parse_list(options.ranks)
    if not ranks:
        raise CollectionError('--ranks is empty: name the ranks to build datasets for, e.g. class,order')
    if options.resolution < 4 or options.resolution & (options.resolution - 1):
        raise CollectionError(f'--resolution {options.resolution}: must be a power of two (4 or more)')
    if options.square not in SQUARE_MODES:
        raise CollectionError(f'--square {options.square}: must be one of {", ".join(SQUARE_MODES)}')
    if str(options.channels) not in ('1', '3', 'auto'):
        raise CollectionError(f'--channels {options.channels}: must be 1, 3 or auto')
    cache = Path(options.cache) if options.cache else Path(options.dest) / '.download-cache'
    return dataclasses.replace(options, ranks=tuple(ranks),
                               rank_cols=tuple(parse_list(options.rank_cols) or DEFAULT_RANK_COLS),
                               tree_ranks=tuple(parse_list(options.tree_ranks) or ranks),
                               channels=str(options.channels), workers=options.workers or default_workers(),
                               cache=str(cache))

def read_records(
    options:    BuildOptions,           # checked_options'
    log,                                # where to print notes
) -> tuple[list[Record], str]:
    """The collection's records sorted by source, and the format it was read as; CollectionError for bad input."""
    source = Path(options.source)
    records, available, fmt = read_source(source, options.fmt, list(options.rank_cols), options.path_col,
                                          options.id_col, list(options.tree_ranks), options.root,
                                          skip=[Path(options.dest), Path(options.cache)])
    if fmt == 'ecotaxa' and options.root is None:
        top = next((record.lineage[0] for record in records if record.lineage), None)
        if top is not None:
            log(f'EcoTaxa root: {top[1]} taken as the {top[0]} (the deepest taxon every annotated row shares); '
                f'--root NAME to choose another')
    if fmt != 'bold':
        # Folder and hierarchy levels have no rank names of their own: catch typos against the standard ranks.
        _check_ranks(list(options.tree_ranks), list(taxonomy.STANDARD_RANKS), source, '--tree-ranks',
                     what='--tree-ranks')
    _check_ranks(list(options.ranks), available, source, '--rank-cols' if fmt == 'bold' else '--tree-ranks')
    if not records:
        raise CollectionError(f'{source}: no images found')
    # A fixed order (sort is stable: a source listed twice keeps its rows' order): everything downstream, file names
    # and which duplicate is kept, follows it.
    records = sorted(records, key=lambda record: record.source)
    named = {rank for record in records for rank, _name in record.lineage}
    missing = [rank for rank in options.ranks if rank not in named]
    if missing:
        # Deeper than the source goes (a tree two folders deep asked for family): no dataset could have that rank.
        raise CollectionError(f'{source}: no image is identified to rank {missing[0]!r} '
                              f'(ranks with names here: {", ".join(r for r in available if r in named) or "none"})')
    return records, fmt

def place_records(
    records:    list[Record],           # read_records'
    options:    BuildOptions,           # checked_options'
    log,                                # where to print the warning about unused exclusions
) -> Sifted:
    """Records with their taxon path at the chosen ranks; drops those on the exclusion list and those without a taxon."""
    exclusions = read_exclusions(Path(options.exclude)) if options.exclude else []
    excluded_keys = set(exclusions)
    matched = set()
    kept, dropped = [], []
    for record in records:
        lineage = dict(record.lineage)
        path = []
        for rank in options.ranks:
            if rank not in lineage:
                break
            path.append(lineage[rank])
        record = dataclasses.replace(record, path=tuple(path))
        hits = _exclusion_keys(record) & excluded_keys
        if hits:
            matched |= hits
            dropped.append(_dropped(record, 'excluded', f'listed in {options.exclude}'))
        elif record.problem or not record.path:
            dropped.append(_dropped(record, 'no_taxon', record.problem or f'not identified to {options.ranks[0]}'))
        else:
            kept.append(record)
    unmatched = [entry for entry in exclusions if entry not in matched]
    if unmatched:
        log(f'warning: {len(unmatched)} of {len(exclusions)} exclusion entries match no image: {_preview(unmatched, 5)}')
    try:
        taxonomy.build_tree([(r.path, r.source) for r in kept], list(options.ranks))    # fail early on homonyms
    except ValueError as e:
        raise CollectionError(f'{Path(options.source)}: {e}') from None
    return Sifted(kept, dropped)

def fetch_records(
    records:    list[Record],           # place_records' kept
    options:    BuildOptions,           # checked_options'
) -> Sifted:
    """Records with the local file to read (URLs downloaded into the cache); drops the failed downloads."""
    urls = sorted({r.location for r in records if _is_url(r.location)})
    fetched = download_all(urls, Path(options.cache), options.timeout, options.retries,
                           options.download_threads) if urls else {}
    kept, dropped = [], []
    for record in records:
        local, why = fetched[record.location] if _is_url(record.location) else (record.location, '')
        if local is None:
            dropped.append(_dropped(record, 'download_failed', why))
        else:
            kept.append(dataclasses.replace(record, local=local))
    return Sifted(kept, dropped)

def decode_images(
    records:    list[Record],           # fetch_records' kept
    options:    BuildOptions,           # checked_options'
    stage_dir:  Path,                   # where the staged PNGs go
) -> Sifted:
    """StagedImages of the images that decode and are large enough; drops the others (on `workers` processes)."""
    tasks = [dict(index=i, local=r.local, min_size=options.min_size, resolution=options.resolution,
                  square=options.square, compress_level=options.compress_level, stage=str(stage_dir / f'{i:08d}.png'),
                  draft=options.jpeg_draft, channels=options.channels)
             for i, r in enumerate(records)]
    results = _parallel_map(process_image, tasks, options.workers, 'images')
    kept, dropped = [], []
    for record, task, result in zip(records, tasks, results):
        if result['status'] != 'ok':
            dropped.append(_dropped(record, result['status'], result['detail']))
        else:
            kept.append(StagedImage(record, task['stage'], result))
    return Sifted(kept, dropped)

def drop_duplicates(
    images:     list[StagedImage],      # decode_images' kept
    threshold:  int,                    # max dHash Hamming distance of a near duplicate; -1: no near-duplicate check
) -> Sifted:
    """The first image of each content in source order; drops later exact copies and near duplicates of kept ones."""
    kept, dropped = [], []
    first_by_content = {}
    kept_hashes = np.zeros(len(images), dtype=np.uint64)   # dHashes of the kept images, [len(kept)] filled
    for image in images:
        facts, record = image.facts, image.record
        original = first_by_content.get(facts['content'])
        if original is not None:
            dropped.append(_dropped(record, 'duplicate', f'same pixels as {original}'))
            continue
        if threshold >= 0 and kept:
            distances = popcount64(kept_hashes[:len(kept)] ^ np.uint64(facts['dhash']))
            nearest = int(np.argmin(distances))
            if distances[nearest] <= threshold:
                dropped.append(_dropped(record, 'near_duplicate',
                                        f'dHash distance {int(distances[nearest])} to {kept[nearest].record.source}'))
                continue
        first_by_content[facts['content']] = record.source
        kept_hashes[len(kept)] = facts['dhash']
        kept.append(image)
    return Sifted(kept, dropped)

def cap_per_taxon(
    images:         list[StagedImage],  # drop_duplicates' kept
    max_per_taxon:  int | None,         # images kept per taxon at its deepest rank; None: all
) -> Sifted:
    """At most `max_per_taxon` images of each deepest taxon: those with the smallest content hashes."""
    if max_per_taxon is None:
        return Sifted(list(images), [])
    # The smallest content hashes: a fixed pseudo-random choice that does not favour any file names.
    groups = {}
    for i, image in enumerate(images):
        groups.setdefault(image.record.path[-1], []).append(i)
    over, dropped = set(), []
    for taxon, indices in groups.items():
        if len(indices) > max_per_taxon:
            for i in sorted(indices, key=lambda k: images[k].facts['content'])[max_per_taxon:]:
                over.add(i)
                dropped.append(_dropped(images[i].record, 'max_per_taxon',
                                        f'{taxon} has {len(indices)} images, {max_per_taxon} kept'))
    return Sifted([image for i, image in enumerate(images) if i not in over], dropped)

def settle_channels(
    images:     list[StagedImage],      # the images to write
    options:    BuildOptions,           # checked_options'
) -> int:
    """The output channel count (auto: 1 only if every image is grayscale); encodes the images staged raw."""
    channels = int(options.channels) if options.channels != 'auto' else (1 if all(i.facts['gray'] for i in images) else 3)
    pending = [dict(raw=image.facts['raw'], stage=image.staged, channels=channels, resolution=options.resolution,
                    compress_level=options.compress_level) for image in images if image.facts.get('raw')]
    if pending:
        _parallel_map(encode_staged, pending, options.workers, 'channels')
    return channels

def write_datasets(
    images:     list[StagedImage],      # the images to write, in source order
    dropped:    list[dict],             # every drop of the build, sorted by source
    channels:   int,                    # settle_channels'
    options:    BuildOptions,           # checked_options'
    fmt:        str,                    # the format the source was read as
) -> taxonomy.Manifest:
    """Write one zip per taxon (file names in source order), then DEST/manifest.json; returns the manifest."""
    dest = Path(options.dest)
    files = [(f'img{k:08d}.png', image) for k, image in enumerate(images)]
    taxa = taxa_entries(taxonomy.build_tree([(image.record.path, image.record.source) for image in images],
                                             list(options.ranks)))
    hashes = write_zips(dest, taxa, [(file, image.record.path, image.staged) for file, image in files])
    listing = [dict(file=file, source=image.record.source, taxon=image.record.path[-1], sha256=image.facts['content'])
               for file, image in files]
    data = manifest_data(taxa, hashes, options.manifest_options(fmt), channels, dropped, dict(images=listing))
    write_json_atomic(dest / taxonomy.MANIFEST_NAME, data)
    return taxonomy.manifest_from_dict(data, dest)

#----------------------------------------------------------------------------
# The build.

def build_datasets(
    options:    BuildOptions,           # what to build from, and how
    log         = print,                # where to print notes and the summary
) -> taxonomy.Manifest | None:
    """Build DEST/<Taxon>.zip for every taxon at the options' ranks and DEST/manifest.json; returns the manifest."""
    options = checked_options(options)
    records, fmt = read_records(options, log)
    placed = place_records(records, options, log)
    if options.dry_run:
        _print_plan(placed, len(records), options, fmt, log)
        return None
    dest = Path(options.dest)
    _check_dest(dest)
    fetched = fetch_records(placed.kept, options)
    stage_dir = Path(tempfile.mkdtemp(dir=dest, prefix='.build-'))
    try:
        decoded = decode_images(fetched.kept, options, stage_dir)
        unique = drop_duplicates(decoded.kept, options.near_dup_threshold)
        capped = cap_per_taxon(unique.kept, options.max_per_taxon)
        # By source; sort is stable, so the drops of one source keep the order of the stages that made them.
        dropped = sorted(placed.dropped + fetched.dropped + decoded.dropped + unique.dropped + capped.dropped,
                         key=lambda item: item['source'])
        if not capped.kept:
            raise CollectionError(f'{Path(options.source)}: all {len(records)} images were dropped '
                                  f'({format_reasons(count_drops(dropped))}); nothing to build')
        channels = settle_channels(capped.kept, options)
        manifest = write_datasets(capped.kept, dropped, channels, options, fmt)
    finally:
        shutil.rmtree(stage_dir, ignore_errors=True)
    log(manifest.format_tree())
    log(format_dropped(manifest.dropped_counts))
    log(f'wrote {len(manifest.taxa)} datasets ({options.resolution}x{options.resolution}, {channels} '
        f'channel{"s" if channels > 1 else ""}) and {taxonomy.MANIFEST_NAME} to {dest}')
    return manifest

def _print_plan(placed: Sifted, num_records: int, options: BuildOptions, fmt: str, log) -> None:
    """The dry run's report: the taxa and counts before the image checks, and the files a build would write."""
    source, dest = Path(options.source), Path(options.dest)
    taxa = taxa_entries(taxonomy.build_tree([(r.path, r.source) for r in placed.kept], list(options.ranks)))
    plan = taxonomy.manifest_from_dict(manifest_data(taxa, {}, dict(ranks=list(options.ranks), resolution=0), 0,
                                                     placed.dropped, {}), dest)
    log(f'dry run: {num_records} images listed in {source} ({fmt}); {len(placed.kept)} candidates '
        f'(counts before the image checks: size, readability, duplicates, --max-per-taxon)')
    if placed.kept:
        log(plan.format_tree())
    log(format_dropped(count_drops(placed.dropped)))
    log(f'would write to {dest}: ' + ', '.join([e['dataset'] for e in taxa.values()] + [taxonomy.MANIFEST_NAME]))

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
        fd, probe = make_temp_file(dest, prefix='.write-test-')
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CollectionError(f'{dest}: destination is not writable: {e.strerror or e}') from None

def taxa_entries(tree: dict) -> dict:
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

def manifest_data(
    taxa:       dict,                   # taxa_entries'
    hashes:     dict,                   # taxon -> SHA-256 of its zip ('' where missing)
    config:     dict,                   # the options as recorded (ranks and resolution at least)
    channels:   int,
    dropped:    list[dict],             # every drop, sorted by source
    extra:      dict,                   # further top-level keys (the image list)
) -> dict:
    """The manifest as JSON-ready data (format taxonomy.MANIFEST_FORMAT)."""
    return {
        'format': taxonomy.MANIFEST_FORMAT, 'ranks': list(config['ranks']), 'resolution': config['resolution'],
        'channels': channels, 'options': config,
        'taxa': {name: dict(rank=e['rank'], parent=e['parent'], children=e['children'], dataset=e['dataset'],
                            num_images=e['num_images'], num_images_direct=e['num_images_direct'], labels=e['labels'],
                            sha256=hashes.get(name, '')) for name, e in taxa.items()},
        'dropped': dropped, 'dropped_counts': count_drops(dropped), **extra,
    }

#----------------------------------------------------------------------------
