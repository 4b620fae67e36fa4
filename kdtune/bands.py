"""Size bands: a study's students grouped by parameter count, so that the study maps accuracy against size.

With one objective, validation accuracy, a wider student is simply better and the sampler walks to the widest
width; a median pruner then stops narrow students for being narrow. People distil to get a small model, so a
study covers the size range by design instead: the width range is cut into bands at parameter counts, every
band gets an equal share of the trials, and within a band the sampler searches temperature, lambda and width
and the pruner judges a trial against the trials of that band only (`kdtune.per_band`).

The default cuts (`[search] bands = "auto"`) follow a 1-3-10 ladder (10 k, 30 k, 100 k, 300 k, ... parameters)
from the narrowest student to the widest one that is no larger than the teacher; a student larger than its
teacher is not what anyone distils for. `bands = [50000, 200000]` cuts at those counts; `bands = "none"` is one
band over the whole width range, as studies made before bands existed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

from kdtune.spec import SearchSpec, SpecError
from kdtune.student import Architecture

# study user attribute: the bands a study was set up with, as `Band.as_record` writes them
RECORD_KEY = "bands"
# trial user attribute: the index of the trial's band
TRIAL_KEY = "band"
# An automatic cut is kept only where the bands on both sides span at least this ratio of parameter counts:
# no sliver of a band a few widths wide at either end.
MIN_AUTO_SPAN = 1.5


@dataclass(frozen=True)
class Band:
    index: int
    min_width: int
    max_width: int
    min_params: int  # the parameter counts of the narrowest and the widest student in the band
    max_params: int

    @property
    def label(self) -> str:
        return f"{compact(self.min_params)}-{compact(self.max_params)} parameters"

    def holds(self, width: int) -> bool:
        return self.min_width <= width <= self.max_width

    def middle_width(self) -> int:
        """The geometric middle: widths are searched on a log scale."""
        return round(math.sqrt(self.min_width * self.max_width))

    def as_record(self) -> dict:
        return asdict(self)


def compact(count: int) -> str:
    """12,730 -> '12.7k', 1,630,000 -> '1.63M': the band labels of notes and tables."""
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(count)


def size_bands(search: SearchSpec, architecture: Architecture, teacher_parameters: int | None) -> list[Band]:
    """The bands of a study of `architecture`'s students; see the module docstring. A teacher of unknown size
    (one given as logits) leaves the whole width range in."""
    params = architecture.n_parameters
    low, high = int(search.width.low), int(search.width.high)
    if search.bands == "none" or low == high:
        return [Band(0, low, high, params(low), params(high))]
    if teacher_parameters is not None:
        high = max(low, _last_width(params, low, high, lambda count: count <= teacher_parameters))
    span = (params(low), params(high))
    if search.bands == "auto":
        cuts = [cut for cut in _ladder(span[1]) if span[0] * MIN_AUTO_SPAN <= cut <= span[1] / MIN_AUTO_SPAN]
    else:
        cuts = sorted(search.bands)
        outside = [cut for cut in cuts if not span[0] < cut <= span[1]]
        if outside:
            raise SpecError(f"search.bands cuts at {outside[0]:,} parameters, outside the students this study can "
                            f"train ({span[0]:,} to {span[1]:,} parameters: [search] width up to the teacher's "
                            "size); cut inside that range, or widen [search] width.")
    bands, first = [], low
    for cut in [*cuts, None]:
        last = high if cut is None else _last_width(params, first, high, lambda count: count < cut)
        if last < first:
            raise SpecError(f"search.bands: no width gives a student with {compact(params(first))} to {cut:,} "
                            "parameters; put the cuts further apart.")
        bands.append(Band(len(bands), first, last, params(first), params(last)))
        first = last + 1
    return bands


def _ladder(up_to: int) -> list[int]:
    """1 k, 3 k, 10 k, 30 k, 100 k, ... up to `up_to`."""
    return [cut for cut in (m * 10**k for k in range(3, 13) for m in (1, 3)) if cut <= up_to]


def _last_width(params: Callable[[int], int], low: int, high: int, fits: Callable[[int], bool]) -> int:
    """The widest width in [low, high] whose parameter count fits (counts grow with width), or low - 1."""
    while low <= high:
        middle = (low + high) // 2
        if fits(params(middle)):
            low = middle + 1
        else:
            high = middle - 1
    return high


def band_of_width(bands: list[Band], width: int) -> Band | None:
    return next((band for band in bands if band.holds(width)), None)


def record(study, size_bands: list[Band]) -> None:
    """Write the study's bands, for `recorded` to read."""
    study.set_user_attr(RECORD_KEY, [band.as_record() for band in size_bands])


def recorded(study) -> list[Band] | None:
    """The bands a study recorded at its set-up; None for a study not set up yet, or made before bands."""
    records = study.user_attrs.get(RECORD_KEY)
    return None if records is None else [Band(**record) for record in records]


def of_trial(trial) -> int:
    """A trial's band index; trials of studies made before bands are all in band 0."""
    return trial.user_attrs.get(TRIAL_KEY, 0)
