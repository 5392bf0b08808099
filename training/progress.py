"""Progress bars: shown when asked for and stderr is a terminal, so a run logged to a file keeps its lines."""

from __future__ import annotations

from tqdm import tqdm


def progress(iterable=None, *, show: bool = True, **kwargs) -> tqdm:
    """tqdm, off when `show` is False (--quiet) and, through tqdm's `disable=None`, whenever stderr is not a tty."""
    return tqdm(iterable, disable=None if show else True, dynamic_ncols=True, **kwargs)
