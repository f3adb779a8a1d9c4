//! Optional Gaussian blur of a field before tokenization — the seed's "blurred data to simplify the
//! problem" (docs/design.md §3). Sigma is in grid points, not degrees, so one setting means
//! "smooth away the finest few grid scales" on any grid.
//!
//! The filter is separable: a latitude pass then a longitude pass with the same 1-D kernel,
//! truncated at `radius = ceil(4·sigma)` (the tail beyond is below 0.01 % of the mass) and
//! normalised to sum exactly 1 in f64 before being stored as f32.
//!
//! Boundaries follow the geometry of a full globe in the canonical order (rows latitude
//! north→south, columns longitude 0→360 east):
//! - longitude is periodic, so the blur is continuous across the 0°/360° seam;
//! - latitude reflects at the poles, half-sample symmetric (row −1 is row 0, row −2 is row 1,
//!   row `nlat` is row `nlat − 1`, …, repeated for radii larger than the grid). With a symmetric
//!   kernel this conserves the sum of the field, so the blur does not change the global mean.
//!
//! [`GaussianBlur::apply_window`] is for a window cut out of the globe: it reflects at all four
//! edges, and a caller that adds a halo of [`GaussianBlur::radius`] points gets the exact globe
//! result in the interior.
//!
//! Missing values are not special: a NaN propagates to every point within `radius` of it. ERA5 has
//! no gaps, so a NaN-aware (normalised-convolution) blur would cost time for nothing; a field that
//! does carry NaNs must be filled first.

use rayon::prelude::*;
use thiserror::Error;

/// Largest accepted sigma in grid points. Its radius is far beyond any global grid, and the cap
/// keeps a mistyped sigma from allocating a giant kernel.
pub const MAX_SIGMA: f64 = 10_000.0;

/// Rows per rayon task for a single plane: enough work per task (≈ 16 k points on a 0.25° grid)
/// that scheduling overhead stays invisible.
const MIN_ROWS_PER_TASK: usize = 12;

/// What can go wrong when building or applying a blur.
#[derive(Debug, Error, PartialEq)]
pub enum BlurError {
    /// Sigma is NaN, infinite, negative or above [`MAX_SIGMA`].
    #[error("blur sigma must be finite and in [0, {MAX_SIGMA}] grid points, got {sigma}")]
    InvalidSigma { sigma: f64 },

    /// A single-plane buffer does not hold exactly `nlat × nlon` values.
    #[error("blur buffer holds {len} values, expected one {nlat}×{nlon} plane")]
    ShapeMismatch {
        len: usize,
        nlat: usize,
        nlon: usize,
    },

    /// A multi-plane buffer is not a whole, non-zero number of `nlat × nlon` planes.
    #[error("blur buffer holds {len} values, not a whole number of {nlat}×{nlon} planes")]
    PlanesMismatch {
        len: usize,
        nlat: usize,
        nlon: usize,
    },
}

/// How the longitude pass treats the left and right edges of a plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LonEdges {
    /// Full globe: column −1 is column `nlon − 1`.
    Periodic,
    /// Window with a halo: edges reflect like the poles do.
    Reflect,
}

/// A separable, truncated Gaussian blur with sigma in grid points.
#[derive(Debug, Clone, PartialEq)]
pub struct GaussianBlur {
    sigma: f64,
    /// One half of the symmetric kernel: `half[m]` weighs offsets `+m` and `−m`.
    half: Vec<f32>,
}

impl GaussianBlur {
    /// A blur of standard deviation `sigma` grid points; sigma 0 is the identity.
    pub fn new(sigma: f64) -> Result<Self, BlurError> {
        if !sigma.is_finite() || !(0.0..=MAX_SIGMA).contains(&sigma) {
            return Err(BlurError::InvalidSigma { sigma });
        }
        if sigma == 0.0 {
            return Ok(Self {
                sigma,
                half: vec![1.0],
            });
        }
        // The range check above bounds this to 40 000.
        let radius = (4.0 * sigma).ceil() as usize;
        let raw: Vec<f64> = (0..=radius)
            // Dividing by sigma before squaring keeps a subnormal sigma from turning 0/0 into NaN.
            .map(|m| (-0.5 * (m as f64 / sigma).powi(2)).exp())
            .collect();
        let total = raw[0] + 2.0 * raw[1..].iter().sum::<f64>();
        let half = raw.iter().map(|w| (w / total) as f32).collect();
        Ok(Self { sigma, half })
    }

    /// Standard deviation in grid points.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// Truncation radius in grid points, `ceil(4·sigma)`; also the halo a window needs.
    pub fn radius(&self) -> usize {
        self.half.len() - 1
    }

    /// The full kernel, offsets `−radius..=radius`.
    pub fn kernel(&self) -> Vec<f32> {
        let mut full: Vec<f32> = self.half[1..].iter().rev().copied().collect();
        full.extend_from_slice(&self.half);
        full
    }

    /// Blurs one full-globe plane in place: periodic in longitude, reflecting at the poles.
    pub fn apply_globe(
        &self,
        field: &mut [f32],
        nlat: usize,
        nlon: usize,
    ) -> Result<(), BlurError> {
        self.apply_globe_with_scratch(field, nlat, nlon, &mut Vec::new())
    }

    /// [`Self::apply_globe`] with a caller-owned scratch buffer, so a loop over planes allocates
    /// once. The buffer grows to `nlat × nlon` and its contents are overwritten.
    pub fn apply_globe_with_scratch(
        &self,
        field: &mut [f32],
        nlat: usize,
        nlon: usize,
        scratch: &mut Vec<f32>,
    ) -> Result<(), BlurError> {
        check_single(field.len(), nlat, nlon)?;
        self.blur_plane_parallel(field, nlat, nlon, LonEdges::Periodic, scratch);
        Ok(())
    }

    /// Blurs a window in place, reflecting at all four edges.
    ///
    /// To get the exact [`Self::apply_globe`] values in a window, read it with a halo of
    /// [`Self::radius`] points on each side — wrapping across 0°/360° in longitude — and keep only
    /// the interior afterwards. In latitude the halo may be clipped at a pole: the reflection at
    /// the window's edge is then the globe's own.
    pub fn apply_window(
        &self,
        field: &mut [f32],
        nlat: usize,
        nlon: usize,
    ) -> Result<(), BlurError> {
        check_single(field.len(), nlat, nlon)?;
        self.blur_plane_parallel(field, nlat, nlon, LonEdges::Reflect, &mut Vec::new());
        Ok(())
    }

    /// Blurs consecutive full-globe planes (e.g. time × level) in place, one plane per rayon task.
    pub fn apply_globe_planes(
        &self,
        planes: &mut [f32],
        nlat: usize,
        nlon: usize,
    ) -> Result<(), BlurError> {
        let plane = nlat.checked_mul(nlon).filter(|&p| p > 0);
        let Some(plane) = plane.filter(|&p| planes.len().is_multiple_of(p)) else {
            if planes.is_empty() {
                return Ok(());
            }
            return Err(BlurError::PlanesMismatch {
                len: planes.len(),
                nlat,
                nlon,
            });
        };
        if self.radius() == 0 {
            return Ok(());
        }
        // Parallel across planes, serial within one: each task streams through a plane with its
        // own scratch, which keeps the working set per core small.
        planes.par_chunks_mut(plane).for_each_init(
            || (Vec::new(), Vec::new()),
            |(scratch, pad), field| {
                scratch.resize(plane, 0.0);
                for (i, out) in scratch.chunks_exact_mut(nlon).enumerate() {
                    self.lat_row(field, i, nlat, nlon, out);
                }
                for (out, src) in field.chunks_exact_mut(nlon).zip(scratch.chunks_exact(nlon)) {
                    self.lon_row(src, out, LonEdges::Periodic, pad);
                }
            },
        );
        Ok(())
    }

    fn blur_plane_parallel(
        &self,
        field: &mut [f32],
        nlat: usize,
        nlon: usize,
        edges: LonEdges,
        scratch: &mut Vec<f32>,
    ) {
        if self.radius() == 0 || field.is_empty() {
            return;
        }
        scratch.clear();
        scratch.resize(field.len(), 0.0);
        let src: &[f32] = field;
        scratch
            .par_chunks_exact_mut(nlon)
            .with_min_len(MIN_ROWS_PER_TASK)
            .enumerate()
            .for_each(|(i, out)| self.lat_row(src, i, nlat, nlon, out));
        field
            .par_chunks_exact_mut(nlon)
            .zip(scratch.par_chunks_exact(nlon))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each_init(Vec::new, |pad, (out, src)| {
                self.lon_row(src, out, edges, pad)
            });
    }

    /// Latitude pass for output row `i`: a weighted sum of whole rows, so the inner loop runs
    /// along contiguous longitudes and vectorises.
    fn lat_row(&self, field: &[f32], i: usize, nlat: usize, nlon: usize, out: &mut [f32]) {
        let row = |r: usize| &field[r * nlon..(r + 1) * nlon];
        let w0 = self.half[0];
        for (o, &x) in out.iter_mut().zip(row(i)) {
            *o = w0 * x;
        }
        for (m, &w) in self.half.iter().enumerate().skip(1) {
            let north = row(reflect(i as isize - m as isize, nlat));
            let south = row(reflect(i as isize + m as isize, nlat));
            for ((o, &a), &b) in out.iter_mut().zip(north).zip(south) {
                *o += w * (a + b);
            }
        }
    }

    /// Longitude pass for one row: copy it into a buffer extended by `radius` on each side so the
    /// convolution itself has no boundary branches.
    fn lon_row(&self, src: &[f32], out: &mut [f32], edges: LonEdges, pad: &mut Vec<f32>) {
        let n = src.len();
        let r = self.radius();
        let index = |j: isize| match edges {
            LonEdges::Periodic => j.rem_euclid(n as isize) as usize,
            LonEdges::Reflect => reflect(j, n),
        };
        pad.clear();
        pad.extend((0..r).map(|q| src[index(q as isize - r as isize)]));
        pad.extend_from_slice(src);
        pad.extend((0..r).map(|q| src[index((n + q) as isize)]));

        let w0 = self.half[0];
        for (o, &x) in out.iter_mut().zip(&pad[r..r + n]) {
            *o = w0 * x;
        }
        for (m, &w) in self.half.iter().enumerate().skip(1) {
            let west = &pad[r - m..r - m + n];
            let east = &pad[r + m..r + m + n];
            for ((o, &a), &b) in out.iter_mut().zip(west).zip(east) {
                *o += w * (a + b);
            }
        }
    }
}

fn check_single(len: usize, nlat: usize, nlon: usize) -> Result<(), BlurError> {
    if nlat.checked_mul(nlon) == Some(len) {
        Ok(())
    } else {
        Err(BlurError::ShapeMismatch { len, nlat, nlon })
    }
}

/// Half-sample symmetric reflection into `0..n`. The reflected sequence is periodic with period
/// `2n`, which is what makes radii larger than `n` work by repeated reflection.
fn reflect(i: isize, n: usize) -> usize {
    let period = 2 * n as isize;
    let m = i.rem_euclid(period) as usize;
    if m < n { m } else { 2 * n - 1 - m }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth field plus a little hash noise, so the tests see both large and grid scales.
    fn field(nlat: usize, nlon: usize) -> Vec<f32> {
        (0..nlat * nlon)
            .map(|k| {
                let (i, j) = ((k / nlon) as f32, (k % nlon) as f32);
                let noise = ((k as u32).wrapping_mul(2_654_435_761) >> 16) as f32 / 65_536.0;
                280.0 + 10.0 * (0.3 * i).sin() * (0.5 * j).cos() + noise
            })
            .collect()
    }

    /// Reflection written as repeated mirroring, independent of `reflect`'s modular form.
    fn mirror(mut i: isize, n: usize) -> usize {
        let n = n as isize;
        loop {
            if i < 0 {
                i = -1 - i;
            } else if i >= n {
                i = 2 * n - 1 - i;
            } else {
                return i as usize;
            }
        }
    }

    /// Direct 2-D convolution with an f64 kernel and f64 accumulation.
    fn direct(x: &[f32], nlat: usize, nlon: usize, sigma: f64, periodic: bool) -> Vec<f64> {
        let r = (4.0 * sigma).ceil() as isize;
        let raw: Vec<f64> = (-r..=r)
            .map(|d| (-((d * d) as f64) / (2.0 * sigma * sigma)).exp())
            .collect();
        let total: f64 = raw.iter().sum();
        let w: Vec<f64> = raw.iter().map(|v| v / total).collect();
        let mut out = vec![0.0; nlat * nlon];
        for i in 0..nlat {
            for j in 0..nlon {
                let mut acc = 0.0;
                for di in -r..=r {
                    let ii = mirror(i as isize + di, nlat);
                    for dj in -r..=r {
                        let jj = j as isize + dj;
                        let jj = if periodic {
                            jj.rem_euclid(nlon as isize) as usize
                        } else {
                            mirror(jj, nlon)
                        };
                        acc +=
                            w[(di + r) as usize] * w[(dj + r) as usize] * x[ii * nlon + jj] as f64;
                    }
                }
                out[i * nlon + j] = acc;
            }
        }
        out
    }

    fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn kernel_is_normalised_symmetric_and_truncated_at_four_sigma() {
        let blur = GaussianBlur::new(1.3).unwrap();
        assert_eq!(blur.radius(), 6);
        let k = blur.kernel();
        assert_eq!(k.len(), 13);
        assert!(k.iter().zip(k.iter().rev()).all(|(a, b)| a == b));
        let sum: f64 = k.iter().map(|&w| w as f64).sum();
        assert!((sum - 1.0).abs() < 1e-6, "kernel sums to {sum}");
        assert_eq!(GaussianBlur::new(2.0).unwrap().radius(), 8);
        // A vanishing sigma degenerates to the identity kernel rather than to NaN.
        assert_eq!(
            GaussianBlur::new(1e-300).unwrap().kernel(),
            vec![0.0, 1.0, 0.0]
        );
    }

    #[test]
    fn matches_direct_2d_convolution() {
        // f32 keeps ~1e-7 relative, so compare anomalies (the 280 K offset removed) against the
        // absolute 1e-5 bound rather than raw temperatures.
        let cases = [
            (13, 24, 1.3, true),
            (13, 24, 1.3, false),
            // Radius 12 exceeds both sides: repeated reflection and repeated wrapping.
            (5, 7, 3.0, true),
            (5, 7, 3.0, false),
            (1, 1, 0.7, true),
        ];
        for (nlat, nlon, sigma, periodic) in cases {
            let x: Vec<f32> = field(nlat, nlon).iter().map(|v| v - 280.0).collect();
            let expected = direct(&x, nlat, nlon, sigma, periodic);
            let blur = GaussianBlur::new(sigma).unwrap();
            let mut got = x.clone();
            if periodic {
                blur.apply_globe(&mut got, nlat, nlon).unwrap();
            } else {
                blur.apply_window(&mut got, nlat, nlon).unwrap();
            }
            let err = max_abs_diff(&got, &expected);
            assert!(
                err < 1e-5,
                "{nlat}x{nlon} sigma {sigma} periodic {periodic}: {err}"
            );
        }
    }

    #[test]
    fn conserves_the_global_sum() {
        let (nlat, nlon) = (37, 72);
        let x = field(nlat, nlon);
        for sigma in [0.8, 2.0, 5.5, 30.0] {
            let mut y = x.clone();
            GaussianBlur::new(sigma)
                .unwrap()
                .apply_globe(&mut y, nlat, nlon)
                .unwrap();
            let before: f64 = x.iter().map(|&v| v as f64).sum();
            let after: f64 = y.iter().map(|&v| v as f64).sum();
            let rel = ((after - before) / before).abs();
            assert!(rel < 1e-5, "sigma {sigma}: relative change {rel}");
        }
    }

    #[test]
    fn is_continuous_across_the_seam() {
        let (nlat, nlon) = (19, 36);
        let x = field(nlat, nlon);
        let blur = GaussianBlur::new(2.0).unwrap();
        let mut blurred = x.clone();
        blur.apply_globe(&mut blurred, nlat, nlon).unwrap();
        let roll = |v: &[f32], k: usize| -> Vec<f32> {
            v.chunks(nlon)
                .flat_map(|row| (0..nlon).map(move |j| row[(j + nlon - k) % nlon]))
                .collect()
        };
        for k in [1, 5, 17, 35] {
            let mut rolled = roll(&x, k);
            blur.apply_globe(&mut rolled, nlat, nlon).unwrap();
            let expected = roll(&blurred, k);
            let err = rolled
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err <= 1e-6, "roll {k}: {err}");
        }
    }

    #[test]
    fn identity_and_validation() {
        let (nlat, nlon) = (6, 8);
        let x = field(nlat, nlon);
        let identity = GaussianBlur::new(0.0).unwrap();
        assert_eq!(identity.radius(), 0);
        let mut y = x.clone();
        identity.apply_globe(&mut y, nlat, nlon).unwrap();
        identity.apply_window(&mut y, nlat, nlon).unwrap();
        identity.apply_globe_planes(&mut y, nlat, nlon).unwrap();
        assert_eq!(x, y);

        for sigma in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.5,
            MAX_SIGMA * 2.0,
        ] {
            assert!(
                matches!(
                    GaussianBlur::new(sigma),
                    Err(BlurError::InvalidSigma { .. })
                ),
                "sigma {sigma} accepted"
            );
        }

        let blur = GaussianBlur::new(1.0).unwrap();
        let mut short = vec![0.0; nlat * nlon - 1];
        let err = blur.apply_globe(&mut short, nlat, nlon).unwrap_err();
        assert!(
            matches!(err, BlurError::ShapeMismatch { len: 47, .. }),
            "{err}"
        );
        assert!(blur.apply_window(&mut short, nlat, nlon).is_err());
        assert!(identity.apply_globe(&mut short, nlat, nlon).is_err());
        assert!(blur.apply_globe_planes(&mut short, nlat, nlon).is_err());
        let mut two = vec![0.0; 2 * nlat * nlon];
        assert!(blur.apply_globe(&mut two, nlat, nlon).is_err());
        assert!(blur.apply_globe_planes(&mut two, nlat, nlon).is_ok());
        assert!(blur.apply_globe_planes(&mut two, 0, nlon).is_err());
        assert!(blur.apply_globe_planes(&mut [], nlat, nlon).is_ok());
        assert!(blur.apply_globe(&mut [], 0, nlon).is_ok());
    }

    #[test]
    fn pole_delta_spreads_symmetrically_and_stays_on_the_grid() {
        let (nlat, nlon) = (20, 40);
        let blur = GaussianBlur::new(1.5).unwrap();
        let r = blur.radius();
        for (pole, j0) in [(0, 0), (nlat - 1, 13)] {
            let mut y = vec![0.0f32; nlat * nlon];
            y[pole * nlon + j0] = 1.0;
            blur.apply_globe(&mut y, nlat, nlon).unwrap();

            let total: f64 = y.iter().map(|&v| v as f64).sum();
            assert!(
                (total - 1.0).abs() < 1e-6,
                "mass {total} leaked at the pole"
            );
            for i in 0..nlat {
                for d in 0..=nlon / 2 {
                    let east = y[i * nlon + (j0 + d) % nlon];
                    let west = y[i * nlon + (j0 + nlon - d) % nlon];
                    assert!(
                        (east - west).abs() <= 1e-7,
                        "row {i} offset {d}: {east} vs {west}"
                    );
                    if i.abs_diff(pole) > r || d > r {
                        assert_eq!(east, 0.0, "row {i} offset {d} beyond the radius");
                    }
                }
            }
            // The reflected half of the kernel folds back, so the pole row itself holds the most.
            let peak = y[pole * nlon + j0];
            assert!(y.iter().all(|&v| v <= peak));
            let next = if pole == 0 { 1 } else { nlat - 2 };
            assert!(y[next * nlon + j0] < peak);
        }
    }

    #[test]
    fn padded_window_matches_the_globe_interior() {
        let (nlat, nlon) = (30, 48);
        let x = field(nlat, nlon);
        let blur = GaussianBlur::new(1.7).unwrap();
        let r = blur.radius();
        let mut globe = x.clone();
        blur.apply_globe(&mut globe, nlat, nlon).unwrap();

        // (first row, rows, first column, columns): mid-latitudes across the seam, and one window
        // whose halo is clipped at the north pole.
        for (lat0, wlat, lon0, wlon) in [(10, 8, 44, 12), (3, 6, 5, 10), (24, 6, 20, 7)] {
            let top = usize::saturating_sub(lat0, r);
            let bottom = (lat0 + wlat + r).min(nlat);
            let (plat, plon) = (bottom - top, wlon + 2 * r);
            let mut window: Vec<f32> = (top..bottom)
                .flat_map(|i| {
                    let x = &x;
                    (0..plon).map(move |q| x[i * nlon + (lon0 + nlon + q - r) % nlon])
                })
                .collect();
            blur.apply_window(&mut window, plat, plon).unwrap();
            for i in lat0..lat0 + wlat {
                for c in 0..wlon {
                    let got = window[(i - top) * plon + c + r];
                    let want = globe[i * nlon + (lon0 + c) % nlon];
                    assert!((got - want).abs() <= 1e-5, "({i}, {c}): {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn planes_match_one_plane_at_a_time() {
        let (nlat, nlon, n) = (9, 16, 5);
        let blur = GaussianBlur::new(1.1).unwrap();
        let mut planes: Vec<f32> = (0..n)
            .flat_map(|p| field(nlat, nlon).into_iter().map(move |v| v + p as f32))
            .collect();
        let mut expected = planes.clone();
        let mut scratch = Vec::new();
        for plane in expected.chunks_mut(nlat * nlon) {
            blur.apply_globe_with_scratch(plane, nlat, nlon, &mut scratch)
                .unwrap();
        }
        blur.apply_globe_planes(&mut planes, nlat, nlon).unwrap();
        assert_eq!(planes, expected);
    }

    #[test]
    fn nan_propagates_within_the_radius_only() {
        let (nlat, nlon) = (12, 24);
        let blur = GaussianBlur::new(1.0).unwrap();
        let r = blur.radius();
        let mut y = field(nlat, nlon);
        y[6 * nlon + 12] = f32::NAN;
        blur.apply_globe(&mut y, nlat, nlon).unwrap();
        for i in 0..nlat {
            for j in 0..nlon {
                let near = i.abs_diff(6) <= r && j.abs_diff(12) <= r;
                assert_eq!(y[i * nlon + j].is_nan(), near, "({i}, {j})");
            }
        }
    }
}
