"""Seeds derived from integers: every random draw in walt that must not depend on batch, rank or
resume is seeded from (run seed, the example's key, a stream number) through `mix_seed`."""

_MASK64 = (1 << 64) - 1


def mix_seed(*parts):
    """A well-spread 63-bit seed from integers (splitmix64 finalizer over each part)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)
