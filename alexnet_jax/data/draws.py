"""The first bounded draws of grain's per-element generators, for a whole batch in a few numpy operations.

`ds.random_map(f, seed=seed)` hands element j of a grain MapDataset a `np.random.Generator` over Philox4x64-10
whose key comes from `seed` and whose counter starts at (0, 0, 0, j). The alexnet crop draws two offsets from
it, `rng.integers(n_top)` then `rng.integers(n_left)`; `crop_offsets` computes those two numbers for many j at
once, so a batched reader places every crop exactly where the per-element transform placed it (the same pixels
for the same seed and stream position) without one Generator per example.

What numpy does for `integers(n)` with n <= 2**32 (numpy/random/src/distributions, Lemire's method): n == 1
draws nothing and gives 0; otherwise one 32-bit draw u gives (u * n) >> 32, unless the low 32 bits of the
product fall below (2**32 - n) % n, when it draws again (probability below n / 2**32). 32-bit draws are the low
then the high half of one 64-bit output; the first 64-bit output is word 0 of Philox(counter + 1). Elements
that would draw again are flagged, and the caller gives those few a real Generator (`element_generator`).
"""

import numpy as np

_M0, _M1 = np.uint64(0xD2E7470EE14C6C93), np.uint64(0xCA5A826395121157)
_W0, _W1 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBB67AE8584CAA73B)
_LOW = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)


def philox_key(seed: int) -> np.ndarray:
    """The Philox key grain's generators use for `seed` (numpy derives it through SeedSequence)."""
    return np.asarray(np.random.Philox(seed).state["state"]["key"], np.uint64)


def element_generator(key: np.ndarray, position: int) -> np.random.Generator:
    """The Generator grain's random_map gives stream position `position` (its counter reset to (0, 0, 0, j))."""
    return np.random.Generator(np.random.Philox(key=key, counter=[0, 0, 0, int(position)]))


def _mulhilo(a: np.ndarray, b: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) 64-bit halves of the 128-bit products a * b, from 32-bit pieces."""
    a_lo, a_hi = a & _LOW, a >> _32
    b_lo, b_hi = b & _LOW, b >> _32
    lo_lo, hi_lo, lo_hi = a_lo * b_lo, a_hi * b_lo, a_lo * b_hi
    middle = (lo_lo >> _32) + (hi_lo & _LOW) + (lo_hi & _LOW)
    high = a_hi * b_hi + (hi_lo >> _32) + (lo_hi >> _32) + (middle >> _32)
    return high, a * b


def first_word(key: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Word 0 of Philox4x64-10(counter (1, 0, 0, j), key) for each j in `positions`: the first 64-bit output of
    element j's generator."""
    j = np.asarray(positions, np.uint64)
    c0, c1, c2, c3 = np.ones_like(j), np.zeros_like(j), np.zeros_like(j), j
    k0, k1 = key[0], key[1]
    with np.errstate(over="ignore"):
        for round_ in range(10):
            if round_:
                k0, k1 = k0 + _W0, k1 + _W1
            hi0, lo0 = _mulhilo(c0, _M0)
            hi1, lo1 = _mulhilo(c2, _M1)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0


def _bounded(u32: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((u32 * n) >> 32, whether numpy would have rejected u32 and drawn again) for n >= 2."""
    n = n.astype(np.uint64)
    product = u32 * n
    leftover = product & _LOW
    threshold = (np.uint64(1 << 32) - n) % n
    return (product >> _32).astype(np.int64), leftover < threshold


def crop_offsets(key: np.ndarray, positions: np.ndarray, n_top: np.ndarray,
                 n_left: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top, left, exact) per element: what `rng.integers(n_top)` then `rng.integers(n_left)` give element j's
    generator; exact is False where numpy would have drawn again (the caller redoes those with
    element_generator). n_top, n_left >= 1 and below 2**32."""
    word = first_word(key, positions)
    halves = (word & _LOW, word >> _32)
    n_top, n_left = np.asarray(n_top, np.int64), np.asarray(n_left, np.int64)
    top, top_redraw = _bounded(halves[0], np.maximum(n_top, 2))
    top_draws = n_top > 1
    top = np.where(top_draws, top, 0)
    # `left` takes the first 32-bit half when the top offset drew nothing, else the second.
    left_source = np.where(top_draws, halves[1], halves[0])
    left, left_redraw = _bounded(left_source, np.maximum(n_left, 2))
    left_draws = n_left > 1
    left = np.where(left_draws, left, 0)
    exact = ~((top_draws & top_redraw) | (left_draws & left_redraw))
    return top, left, exact
