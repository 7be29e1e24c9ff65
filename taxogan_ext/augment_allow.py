"""Augmentation whitelist: narrow an --augpipe preset to chosen transforms (--aug-allow / --aug-deny).

The thesis trains with only the transforms that cannot leak into generated images; `leakfree-color`
and `leakfree-geom` name those sets. Names are the 15 transforms of the ADA pipe plus the named sets;
the result is the multiplier kwargs for `stylegan2ada.augment.AugmentPipe`.
"""

from stylegan2ada.augment import PRESETS, TRANSFORMS
from stylegan2ada.util import UserError

# Named sets usable inside --aug-allow / --aug-deny.
NAMED_SETS = {
    'leakfree-color': ('xflip', 'rotate90', 'brightness', 'contrast', 'lumaflip', 'hue', 'saturation',
                       'imgfilter', 'noise', 'cutout'),
    'leakfree-geom':  ('xflip', 'rotate90', 'rotate'),
}


class AugmentChoiceError(UserError):
    """An --augpipe / --aug-allow / --aug-deny choice that names no known transform or leaves none; one line."""


def valid_names():
    """One line listing the accepted transform names and named sets."""
    return f'transforms: {", ".join(TRANSFORMS)}; sets: {", ".join(NAMED_SETS)}'


def parse_names(
    spec,                   # comma-separated transform names and named sets, e.g. 'xflip,leakfree-geom'
    option  = 'aug-allow',  # option name used in error messages
):
    """Expand a comma-separated list into a set of transform names; unknown names raise AugmentChoiceError."""
    names = set()
    for item in (s.strip().lower() for s in spec.split(',')):
        if not item:
            continue
        if item in NAMED_SETS:
            names.update(NAMED_SETS[item])
        elif item in TRANSFORMS:
            names.add(item)
        else:
            raise AugmentChoiceError(f'--{option}: unknown augmentation {item!r}; valid {valid_names()}')
    return names


def resolve_augment_kwargs(
    augpipe,                # preset name ('bgc', ...); None = start from all 15 transforms
    allow,                  # comma-separated names to keep; None = keep all of the start set
    deny,                   # comma-separated names to remove; None = remove nothing
):
    """Return AugmentPipe multiplier kwargs: the preset's entries, filtered by allow and deny."""
    if augpipe is None and allow is None and deny is None:
        raise AugmentChoiceError('no augmentations chosen: give --augpipe, --aug-allow or --aug-deny')
    if augpipe is not None:
        if augpipe not in PRESETS:
            raise AugmentChoiceError(f'--augpipe: unknown preset {augpipe!r}; valid presets: {", ".join(PRESETS)}')
        start = dict(PRESETS[augpipe])
    else:
        start = {t: 1 for t in TRANSFORMS}
    keep = parse_names(allow, 'aug-allow') if allow is not None else set(start)
    drop = parse_names(deny, 'aug-deny') if deny is not None else set()
    # Transforms keep the pipeline's order so logs and options files read the same every run.
    result = {t: start[t] for t in TRANSFORMS if t in start and t in keep and t not in drop}
    if not result:
        base = f'--augpipe {augpipe}' if augpipe is not None else 'all transforms'
        raise AugmentChoiceError(f'no augmentation left: {base}, --aug-allow {allow}, --aug-deny {deny}')
    return result


def describe(
    kwargs,                 # AugmentPipe kwargs; non-transform keys (strengths) are ignored
):
    """Return the enabled transforms for the log, e.g. 'xflip, rotate90, rotate'."""
    parts = []
    for t in TRANSFORMS:
        m = kwargs.get(t, 0)
        if m:
            parts.append(t if m == 1 else f'{t}={m:g}')
    return ', '.join(parts) if parts else 'none'
