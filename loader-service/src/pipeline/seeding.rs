//! The seeding scheme every random choice hangs off.
//!
//! # Seeding: counter-based, one generator per (seed, epoch, sample, field, purpose)
//!
//! No random state is carried from one sample to the next. Every random decision downstream
//! (the sample's centre, its mask, its noise, the epoch's order) draws from a fresh
//! [`ChaCha8Rng`] built by [`sample_rng`] from the tuple
//! `(seed, epoch, sample id, field, purpose)`. The same request therefore yields the same bytes on
//! any machine, in any process, in any order, whatever was served before — which is what makes a
//! stream resumable from a bare [`EpochCursor`](super::epoch::EpochCursor) and lets many
//! loader processes serve one epoch.
//!
//! The 32-byte ChaCha key is derived with SplitMix64 (Steele, Lea & Flood 2014; the generator
//! behind `java.util.SplittableRandom`):
//!
//! ```text
//! mix(z)  = z += 0x9E3779B97F4A7C15;
//!           z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
//!           z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
//!           z ^ (z >> 31)                         (wrapping u64 arithmetic)
//! h       = mix(seed ^ DOMAIN)
//! h       = mix(h ^ epoch); h = mix(h ^ sample); h = mix(h ^ field); h = mix(h ^ purpose.tag())
//! key[i]  = mix(h + (i + 1) * 0x9E3779B97F4A7C15)  for i = 0..4, each written little-endian
//! ```
//!
//! Each absorption step is a bijection of the running state for a fixed input word, so changing
//! any single component of the tuple always changes the state; distinct tuples collide with
//! probability about 2⁻⁶⁴. The key expansion is the ordinary SplitMix64 output sequence started at
//! `h`. [`Purpose::tag`] values are part of the format and never change.
//!
//! Integer draws made here ([`uniform_below`], [`shuffle`]) use Lemire's multiply-and-reject on
//! `next_u64`, so orders depend only on the ChaCha8 stream and this file, not on the `rand`
//! version's sampling algorithms.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::epoch::SampleId;

/// What a random generator is used for; keeps the streams for different decisions independent.
///
/// The numeric [`tag`](Purpose::tag) of each variant is part of the seeding format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// The global permutation of an epoch.
    Shuffle,
    /// The block-local order of an epoch ([`BlockShuffle`]).
    BlockShuffle,
    /// A sample's centre (time, latitude, longitude).
    Centre,
    /// Which tokens of a field are masked.
    Mask,
    /// Noise values written into masked tokens.
    Noise,
    /// Anything else; tags do not collide with the named purposes.
    Custom(u32),
}

impl Purpose {
    /// The stable number absorbed into the seed.
    pub fn tag(self) -> u64 {
        match self {
            Purpose::Shuffle => 1,
            Purpose::BlockShuffle => 2,
            Purpose::Centre => 3,
            Purpose::Mask => 4,
            Purpose::Noise => 5,
            Purpose::Custom(x) => (1 << 32) | u64::from(x),
        }
    }
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
/// Domain separator so that `sample_rng` keys differ from a plain SplitMix64 stream of `seed`.
const DOMAIN: u64 = 0x6174_6d6f_7265_7031; // "atmorep1"

/// The SplitMix64 output function applied to `z + GOLDEN_GAMMA`.
fn splitmix64(z: u64) -> u64 {
    let mut z = z.wrapping_add(GOLDEN_GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The 32-byte ChaCha key for `(seed, epoch, sample, field, purpose)` (see the module doc).
pub fn sample_key(
    seed: u64,
    epoch: u64,
    sample: SampleId,
    field: u32,
    purpose: Purpose,
) -> [u8; 32] {
    let mut h = splitmix64(seed ^ DOMAIN);
    for word in [epoch, sample, u64::from(field), purpose.tag()] {
        h = splitmix64(h ^ word);
    }
    let mut key = [0u8; 32];
    for (i, chunk) in key.chunks_exact_mut(8).enumerate() {
        let step = GOLDEN_GAMMA.wrapping_mul(i as u64 + 1);
        chunk.copy_from_slice(&splitmix64(h.wrapping_add(step)).to_le_bytes());
    }
    key
}

/// A fresh generator for one random decision: a pure function of its arguments.
///
/// `field` is the field's index in the request (0 where a decision is shared by all fields, such
/// as the centre or the epoch order).
pub fn sample_rng(
    seed: u64,
    epoch: u64,
    sample: SampleId,
    field: u32,
    purpose: Purpose,
) -> ChaCha8Rng {
    ChaCha8Rng::from_seed(sample_key(seed, epoch, sample, field, purpose))
}

/// A uniform integer in `0..n` (Lemire's nearly divisionless method), independent of `rand`'s
/// own range sampling so orders stay fixed across `rand` versions.
///
/// # Panics
/// If `n == 0`.
pub fn uniform_below(rng: &mut impl RngCore, n: u64) -> u64 {
    assert!(n > 0, "uniform_below: empty range");
    let mut m = u128::from(rng.next_u64()) * u128::from(n);
    if (m as u64) < n {
        let threshold = n.wrapping_neg() % n;
        while (m as u64) < threshold {
            m = u128::from(rng.next_u64()) * u128::from(n);
        }
    }
    (m >> 64) as u64
}

/// Fisher–Yates (Durstenfeld) shuffle in place, drawing with [`uniform_below`].
pub fn shuffle<T>(items: &mut [T], rng: &mut impl RngCore) {
    for i in (1..items.len()).rev() {
        let j = uniform_below(rng, i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use std::collections::HashSet;

    #[test]
    fn sample_rng_is_pure_and_separates_components() {
        let draw = |s, e, id, f, p| sample_rng(s, e, id, f, p).random::<u64>();
        let base = draw(1, 2, 3, 4, Purpose::Mask);
        assert_eq!(base, draw(1, 2, 3, 4, Purpose::Mask));
        let variants = [
            draw(0, 2, 3, 4, Purpose::Mask),
            draw(1, 3, 3, 4, Purpose::Mask),
            draw(1, 2, 4, 4, Purpose::Mask),
            draw(1, 2, 3, 5, Purpose::Mask),
            draw(1, 2, 3, 4, Purpose::Noise),
            draw(1, 2, 3, 4, Purpose::Custom(4)),
            // Swapped components must not collide either.
            draw(1, 3, 2, 4, Purpose::Mask),
        ];
        let mut all: HashSet<u64> = variants.into_iter().collect();
        all.insert(base);
        assert_eq!(all.len(), 8);
    }

    #[test]
    fn sample_key_is_pinned() {
        // Golden value: changing the seeding scheme changes every dataset order and mask.
        let key = sample_key(1, 2, 3, 4, Purpose::Mask);
        let first = u64::from_le_bytes(key[..8].try_into().unwrap());
        let v = sample_rng(1, 2, 3, 4, Purpose::Mask).next_u64();
        assert_eq!((first, v), PINNED);
    }
    const PINNED: (u64, u64) = (519_053_520_346_198_960, 6_308_661_602_266_306_220);

    #[test]
    fn uniform_below_is_uniform_and_in_range() {
        let mut rng = sample_rng(9, 0, 0, 0, Purpose::Custom(0));
        let mut counts = [0u32; 7];
        for _ in 0..70_000 {
            counts[uniform_below(&mut rng, 7) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
        assert_eq!(uniform_below(&mut rng, 1), 0);
    }
}
