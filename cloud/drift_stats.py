"""The statistics of a drift review, from window summaries alone, deterministic and mergeable.

A device's distribution of one feature over many windows is the mixture of its windows'
distributions, so its CDF at a point is the count-weighted mean of each window's CDF there.
``Profile`` accumulates exactly that on a fixed grid taken from the baseline (its quantiles, both
sides of every point, so point masses and ties keep their own bins), plus counts and moments.
Devices from summary version 4 on count their values on that grid themselves: those windows add
exact integers (``add_columns``); older ones add their sketch's weights at each point.
Profiles add up (device + device = cohort or fleet) and never hold a summary, so a review streams;
no KLL sketch is merged, so the same store always gives the same numbers.

From a profile and the baseline's:

* ``ks``: the Kolmogorov-Smirnov distance on the grid, and ``ks_adjusted``: less both sketches'
  rank errors, so sketch noise alone never reads as drift however large the sample;
* ``ks_pvalue``: the two-sample test on the adjusted distance, with the effective sample size
  ``n m / (n + m)``; ``robust_linf``: SageMaker Model Monitor's robust L-infinity distance, the
  distance less its critical value at the test's level;
* ``psi`` and ``js``: on bins that give every baseline point mass its own bin (tied or discrete
  data) and keep the tails apart, so new values outside the baseline's range or between its
  codes show; ``wasserstein``: the earth mover's distance over the baseline's spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.contracts import NumericSummary
from edge_runtime.summary import SketchLayout, decode_sketch, grid_masses, kll_layout

PSI_BINS = 10
PENDING_MAX = 512  # sketches a profile holds before reading them: a few MB at most
EPS = 1e-4


_RANK_ERRORS: dict[int, float] = {}


def rank_error(k: int) -> float:
    """A KLL sketch's single-rank error bound (99% confidence) for its k, counted even while the
    sketch is still exact: otherwise a window that grows past exact mode would make the adjusted
    distance, and the verdict, milder."""
    if k not in _RANK_ERRORS:
        from datasketches import kll_floats_sketch

        _RANK_ERRORS[k] = float(kll_floats_sketch.get_normalized_rank_error(k, False))
    return _RANK_ERRORS[k]


@dataclass
class Profile:
    """One feature's distribution over any number of windows, on a fixed grid."""

    grid: np.ndarray
    count: int = 0  # finite values
    missing: int = 0
    nonfinite: int = 0
    cdf_mass: np.ndarray = field(default=None)  # sum over windows of count * CDF(grid)
    error_mass: float = 0.0  # sum over windows of count * the sketch's rank error
    total: float = 0.0  # sum of values (mean = total / count)
    m2: float = 0.0  # sum of squared deviations, merged by Chan's formula
    min: float = math.inf
    max: float = -math.inf
    bins: list[int] | None = field(default=None, repr=False)  # a baseline's PSI bin edges, once computed
    points: list[float] | None = field(default=None, repr=False)  # the grid as a list, once made
    shares: np.ndarray | None = field(default=None, repr=False)  # a baseline's shares of its own bins
    grid32: np.ndarray | None = field(default=None, repr=False)  # the grid as float32, as a float sketch sees it
    # float sketches whose masses are yet to be added: read together, in one pass (``settle``)
    pending: list[bytes] = field(default_factory=list, repr=False)
    layouts: list[SketchLayout] = field(default_factory=list, repr=False)  # the pending sketches', as read

    def __post_init__(self) -> None:
        if self.cdf_mass is None:
            self.cdf_mass = np.zeros(len(self.grid))

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def std(self) -> float | None:
        return math.sqrt(self.m2 / self.count) if self.count else None

    @property
    def cdf(self) -> np.ndarray:
        self.settle()
        return self.cdf_mass / self.count if self.count else self.cdf_mass

    def settle(self) -> None:
        """Add the masses of the sketches still pending. Every mass is an integer sum of weights, so
        when they are added does not change a digit of the result."""
        if self.pending:
            if self.grid32 is None:
                self.grid32 = self.grid.astype(np.float32)
            self.cdf_mass = self.cdf_mass + grid_masses(self.grid32, self.pending, self.layouts)
            self.pending, self.layouts = [], []

    @property
    def rank_error(self) -> float:
        return self.error_mass / self.count if self.count else 0.0

    def add_summary(self, s: NumericSummary, layout: SketchLayout | None = None, on_grid: bool = False) -> None:
        """Add one window's series. ``layout``: its float sketch's, if the caller has read (and so
        checked) it already; otherwise it is read here, and ValueError says the sketch is damaged.
        ``on_grid``: the summary was counted on this profile's grid (its ``grid`` names the
        baseline's grids): its grid counts are added as they are, exact, and the sketch is not read;
        a short window's, left out, come from its sketch, which holds every value."""
        self.missing += s.missing
        self.nonfinite += s.nonfinite
        if not s.count:
            return
        if on_grid and s.grid_counts is not None:
            if not fits_grid(s, self.grid):
                raise ValueError("grid counts that do not fit the grid or the series")
            mass = np.cumsum(np.asarray(s.grid_counts, dtype=np.int64))
            self._add(s.count, s.mean or 0.0, (s.variance or 0.0) * s.count, mass, 0.0, s.min, s.max)
            return
        if s.kll and s.kll_type == "f32" and layout is None:
            layout = kll_layout(s.kll)
        if layout is not None and layout.n == s.count:  # the usual case: read later, with other windows'
            k, mass = layout.k, None
            self.pending.append(s.kll)
            self.layouts.append(layout)
            if len(self.pending) >= PENDING_MAX:
                self.settle()
        else:
            mass, k = self._sketch_mass(s)
        # a sketch that holds every value is exact; its error is charged anyway, unless the window
        # comes from a device that counts larger windows on the grid (``on_grid``): then every
        # window is exact, however large, and more data never makes the adjusted distance smaller
        exact = on_grid and layout is not None and layout.n == sum(layout.sizes)
        error = 0.0 if exact else rank_error(k) * s.count
        self._add(s.count, s.mean or 0.0, (s.variance or 0.0) * s.count, mass, error, s.min, s.max)

    def _sketch_mass(self, s: NumericSummary) -> tuple[np.ndarray, int]:
        """count x the window's CDF at every grid point, and its sketch's k. count x CDF is a sum of
        the sketch's integer weights: rounded, every sum of masses is exact, so the fleet's numbers
        do not depend on the order windows and devices were added in."""
        sketch = decode_sketch(s)
        if self.points is None:  # the library takes a list 4x faster than an array
            self.points = self.grid.tolist()
        cdf = np.array(sketch.get_cdf(self.points, inclusive=True)[:-1], dtype=np.float64)
        return np.rint(cdf * s.count), sketch.k

    def add(self, other: Profile) -> None:
        self.missing += other.missing
        self.nonfinite += other.nonfinite
        if other.count:
            other.settle()
            self._add(other.count, other.mean, other.m2, other.cdf_mass, other.error_mass, other.min, other.max)

    def _add(self, n: int, mean: float, m2: float, cdf_mass, error_mass: float, lo, hi) -> None:
        if self.count:
            delta = mean - self.total / self.count
            self.m2 += m2 + delta * delta * self.count * n / (self.count + n)
        else:
            self.m2 = m2
        self.count += n
        self.total += mean * n
        if cdf_mass is not None:  # None: the window's sketch is pending
            self.cdf_mass = self.cdf_mass + cdf_mass
        self.error_mass += error_mass
        self.min = min(self.min, lo if lo is not None else math.inf)
        self.max = max(self.max, hi if hi is not None else -math.inf)

    def present_rate(self) -> float:
        seen = self.count + self.missing + self.nonfinite
        return self.count / seen if seen else 1.0


def fits_grid(s: NumericSummary, grid: np.ndarray) -> bool:
    """The series' grid counts (if any) can be counts on ``grid``: one per point, none negative, no
    more than the series counted."""
    if s.grid_counts is None:
        return True
    counts = np.asarray(s.grid_counts, dtype=np.int64)
    return len(counts) == len(grid) and not (counts < 0).any() and int(counts.sum()) <= s.count


def add_columns(profiles: list[Profile], offsets: np.ndarray, tallies: np.ndarray, moments: np.ndarray,
                grid_counts: np.ndarray) -> None:
    """Add windows counted on the profiles' grids, all at once: per window and series, the tallies
    (count, missing, nan, inf) and moments (min, max, mean, m2), ``windows x series x 4``; and the
    grid counts, ``windows x`` every series' grid end to end (series i's at ``offsets[i]:offsets[i+1]``).
    The masses are exact integer sums; the moments merge as Chan's formula does for many parts."""
    count = tallies[:, :, 0]
    has = count > 0
    n = count.sum(axis=0)
    missing = tallies[:, :, 1].sum(axis=0)
    nonfinite = (tallies[:, :, 2] + tallies[:, :, 3]).sum(axis=0)
    mean = np.where(has, moments[:, :, 2], 0.0)
    mu = (count * mean).sum(axis=0) / np.maximum(n, 1)
    m2 = np.where(has, moments[:, :, 3], 0.0).sum(axis=0) + (count * (mean - mu) ** 2).sum(axis=0)
    lo = np.where(has, moments[:, :, 0], np.inf).min(axis=0)
    hi = np.where(has, moments[:, :, 1], -np.inf).max(axis=0)
    running = np.cumsum(grid_counts.sum(axis=0))
    before = np.concatenate([[0], running])[offsets[:-1]]
    for i, p in enumerate(profiles):
        p.missing += int(missing[i])
        p.nonfinite += int(nonfinite[i])
        if n[i]:
            mass = running[offsets[i]:offsets[i + 1]] - before[i]
            p._add(int(n[i]), float(mu[i]), float(m2[i]), mass, 0.0, float(lo[i]), float(hi[i]))


def ks(base: Profile, cur: Profile) -> float:
    return float(np.max(np.abs(cur.cdf - base.cdf))) if base.count and cur.count else 0.0


def ks_adjusted(base: Profile, cur: Profile) -> float:
    """The KS distance less what the two sketches' rank errors could account for (independent
    errors: their root sum of squares). The grid only ever understates the distance."""
    return max(0.0, ks(base, cur) - math.hypot(base.rank_error, cur.rank_error))


def kolmogorov_sf(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution."""
    if lam < 0.2:
        return 1.0
    total = 0.0
    for k in range(1, 101):
        term = math.exp(-2 * k * k * lam * lam)
        total += term if k % 2 else -term
        if term < 1e-17:
            break
    return float(min(1.0, max(0.0, 2 * total)))


def effective_n(n: int, m: int) -> float:
    return n * m / (n + m) if n and m else 0.0


def ks_pvalue(d: float, n: int, m: int) -> float:
    ne = effective_n(n, m)
    if ne <= 0:
        return 1.0
    root = math.sqrt(ne)
    return kolmogorov_sf((root + 0.12 + 0.11 / root) * d)  # Stephens' small-sample correction


def ks_critical(n: int, m: int, alpha: float) -> float:
    """The distance a two-sample KS test at level ``alpha`` needs with these sample sizes."""
    ne = effective_n(n, m)
    return math.sqrt(-math.log(alpha / 2) / 2) / math.sqrt(ne) if ne else math.inf


def robust_linf(d: float, n: int, m: int, alpha: float) -> float:
    return max(0.0, d - ks_critical(n, m, alpha))


def bin_edges(base: Profile, bins: int = PSI_BINS) -> list[int]:
    """Bins from the baseline (indices into the grid of right-closed edges): its deciles, a bin of
    its own for every point mass (a value holding more than half a bin), the gaps between, and
    both tails. Computed once per baseline."""
    if base.bins is None:
        grid, bcdf = base.grid, base.cdf
        edges = [int(np.searchsorted(bcdf, t, side="left")) for t in np.linspace(0, 1, bins + 1)[1:-1]]
        masses = np.nonzero(np.diff(np.concatenate([[0.0], bcdf])) > 0.5 / bins)[0]
        edges += [int(i) for i in masses] + [int(i) - 1 for i in masses if i > 0]  # the point, and just below it
        base.bins = sorted({min(max(e, 0), len(grid) - 1) for e in edges} | {0, len(grid) - 1})
    return base.bins


def bin_masses(profile: Profile, base: Profile, bins: int = PSI_BINS) -> np.ndarray:
    """The profile's mass in each of the baseline's bins (``bin_edges``), tails included."""
    at = np.concatenate([[0.0], profile.cdf[bin_edges(base, bins)], [1.0]])
    return np.clip(np.diff(at), 0.0, None)


def binned(base: Profile, cur: Profile) -> tuple[np.ndarray, np.ndarray]:
    """Both distributions' shares of the baseline's bins (the baseline's computed once)."""
    if base.shares is None:
        p = bin_masses(base, base)
        base.shares = p / max(p.sum(), EPS)
    q = bin_masses(cur, base)
    return base.shares, q / max(q.sum(), EPS)


def psi(base: Profile, cur: Profile) -> float:
    p, q = binned(base, cur)
    p, q = np.clip(p, EPS, None), np.clip(q, EPS, None)
    return float(np.sum((q - p) * np.log(q / p)))


def js(base: Profile, cur: Profile) -> float:
    """Jensen-Shannon distance (base 2: 0 same, 1 disjoint) on the same bins as PSI."""
    p, q = binned(base, cur)
    m = (p + q) / 2

    def kl(a, b):
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return math.sqrt(max(0.0, (kl(p, m) + kl(q, m)) / 2))


def wasserstein(base: Profile, cur: Profile) -> float:
    """Earth mover's distance between the two distributions over the baseline's standard
    deviation (0: the same; 1: as far as one spread)."""
    if not base.count or not cur.count:
        return 0.0
    grid = base.grid
    diff = np.abs(cur.cdf - base.cdf)
    inside = float(np.sum(diff[:-1] * np.diff(grid)))
    below = max(0.0, grid[0] - cur.min) * float(cur.cdf[0]) if math.isfinite(cur.min) else 0.0
    above = max(0.0, cur.max - grid[-1]) * float(1 - cur.cdf[-1]) if math.isfinite(cur.max) else 0.0
    return (inside + below + above) / _spread(base)


def out_of_range(base: Profile, cur: Profile) -> float:
    """The share of current values outside the baseline's [min, max]."""
    if not cur.count or not base.count:
        return 0.0
    return float(cur.cdf[0] + (1 - cur.cdf[-1])) if len(cur.grid) else 0.0


class Reference:
    """The baseline's profiles (every series of one review, in order) as padded arrays, with their
    PSI bins and shares: computed once per review, so a device's series are compared all at once
    (``Comparison``). Each grid is padded by repeating its last point, and each CDF its last value,
    so the padding adds nothing to any distance."""

    def __init__(self, profiles: list[Profile]) -> None:
        self.profiles = profiles
        self.lengths = np.array([len(p.grid) for p in profiles], dtype=np.int64)
        width = int(self.lengths.max(initial=1))
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        column = np.minimum(np.arange(width)[None, :], np.maximum(self.lengths - 1, 0)[:, None])
        self.take = self.offsets[:-1, None] + column  # where each padded cell reads from, in the series end to end
        self.grid = self.pad(np.concatenate([p.grid for p in profiles]))
        self.step = np.diff(self.grid, axis=1)  # zero in the padding
        self.cdf = self.pad(np.concatenate([p.cdf for p in profiles]))
        self.count = np.array([p.count for p in profiles], dtype=np.int64)
        self.error = np.array([p.rank_error for p in profiles])
        self.spread = np.array([_spread(p) for p in profiles])
        edges = [bin_edges(p) for p in profiles]
        bins = max(len(e) for e in edges)
        self.bins = np.array([e + [e[-1]] * (bins - len(e)) for e in edges], dtype=np.int64)  # empty bins pad
        # the padding's empty bins lie before the upper tail's, as in ``Comparison``'s masses
        self.shares = np.array([[*sh[:-1], *[0.0] * (bins - len(e)), sh[-1]]
                                for sh, e in ((binned(p, p)[0], e) for p, e in zip(profiles, edges))])

    def pad(self, flat: np.ndarray) -> np.ndarray:
        """Series end to end (``flat``) as a padded matrix, one row per series."""
        return flat[self.take] if len(flat) else np.zeros(self.take.shape)


def _spread(base: Profile) -> float:
    spread = base.std or 0.0
    return spread if spread > 0 else max(abs(base.mean or 0.0), 1.0)


@dataclass
class Comparison:
    """Every series of one device (or cohort, or the fleet) against the baseline, all at once:
    the same numbers as ``ks``, ``ks_adjusted``, ``psi``, ``js``, ``wasserstein`` and
    ``out_of_range`` give one series at a time (tests/test_drift.py holds them to it)."""

    ks: np.ndarray
    ks_adjusted: np.ndarray
    psi: np.ndarray
    js: np.ndarray
    wasserstein: np.ndarray
    out_of_range: np.ndarray

    @classmethod
    def of(cls, ref: Reference, profiles: list[Profile]) -> Comparison:
        count = np.array([p.count for p in profiles], dtype=np.int64)
        cdf = ref.pad(np.concatenate([p.cdf for p in profiles]))
        both = (count > 0) & (ref.count > 0)
        gap = np.abs(cdf - ref.cdf)
        ks = np.where(both, gap.max(axis=1, initial=0.0), 0.0)
        error = np.array([p.rank_error for p in profiles])
        adjusted = np.maximum(0.0, ks - np.hypot(ref.error, error))
        # PSI and JS on the baseline's bins
        rows = np.arange(len(profiles))[:, None]
        at = cdf[rows, ref.bins]
        mass = np.clip(np.diff(np.concatenate([np.zeros((len(profiles), 1)), at, np.ones((len(profiles), 1))],
                                              axis=1), axis=1), 0.0, None)
        q = mass / np.maximum(mass.sum(axis=1, keepdims=True), EPS)
        p = ref.shares
        pc, qc = np.clip(p, EPS, None), np.clip(q, EPS, None)
        psi = np.sum((qc - pc) * np.log(qc / pc), axis=1)
        m = (p + q) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum(axis=1)
            kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum(axis=1)
        js = np.sqrt(np.maximum(0.0, (kl_p + kl_q) / 2))
        # Wasserstein over the baseline's spread, with the mass beyond the grid's ends
        last = np.maximum(ref.lengths - 1, 0)
        first_cdf, last_cdf = cdf[:, 0], cdf[np.arange(len(profiles)), last]
        grid_lo, grid_hi = ref.grid[:, 0], ref.grid[np.arange(len(profiles)), last]
        lo = np.array([p.min for p in profiles])
        hi = np.array([p.max for p in profiles])
        inside = np.sum(gap[:, :-1] * ref.step, axis=1)
        with np.errstate(invalid="ignore"):
            below = np.where(np.isfinite(lo), np.maximum(0.0, grid_lo - lo) * first_cdf, 0.0)
            above = np.where(np.isfinite(hi), np.maximum(0.0, hi - grid_hi) * (1 - last_cdf), 0.0)
        wasserstein = np.where(both, (inside + below + above) / ref.spread, 0.0)
        outside = np.where(both & (ref.lengths > 0), first_cdf + (1 - last_cdf), 0.0)
        return cls(ks, adjusted, psi, js, wasserstein, outside)


def rate_pvalue(k: int, n: int, p0: float) -> float:
    """One-sided P(X >= k) for X ~ Binomial(n, p0), by the normal approximation with continuity
    correction (exact enough for the rates a review judges), or Poisson when p0 n is small."""
    if n <= 0 or k <= 0:
        return 1.0
    p0 = min(max(p0, 1e-6), 1 - 1e-9)
    mu = n * p0
    if mu < 20:  # Poisson tail
        if k > mu + 40 * math.sqrt(mu) + 60:
            return 0.0  # beyond double precision
        term = math.exp(-mu)
        cdf = 0.0
        for i in range(k):
            cdf += term
            term *= mu / (i + 1)
        return max(0.0, 1.0 - cdf)
    sd = math.sqrt(n * p0 * (1 - p0))
    z = (k - 0.5 - mu) / sd
    return 0.5 * math.erfc(z / math.sqrt(2))


def benjamini_hochberg(pvalues: list[float]) -> list[float]:
    """q-values: the false discovery rate at which each test would be declared."""
    n = len(pvalues)
    if not n:
        return []
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p, kind="stable")  # ties in input order
    ranked = p[order] * n / np.arange(1, n + 1)
    q = np.empty(n)
    q[order] = np.minimum.accumulate(np.minimum(ranked, 1.0)[::-1])[::-1]
    return q.tolist()
