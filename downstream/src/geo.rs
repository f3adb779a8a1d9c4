//! Spherical geometry on a mean-radius Earth: great-circle distances, destination points,
//! longitude wrapping.
//!
//! Everything the tracker measures is a great-circle distance, never a difference of lat/lon
//! degrees: a degree of longitude shrinks with latitude, and a track that crosses 0° or 180° must
//! not look like a jump across the globe.

/// Mean Earth radius (km), the one IBTrACS-based evaluations use.
pub const EARTH_RADIUS_KM: f64 = 6371.0;

/// Kilometres per degree of great-circle arc.
pub const KM_PER_DEG: f64 = EARTH_RADIUS_KM * std::f64::consts::PI / 180.0;

/// Great-circle distance in degrees of arc between two points (degrees; any longitude
/// convention). Haversine: well conditioned for the short distances tracking is about.
pub fn distance_deg(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dphi = p2 - p1;
    let dlam = (lon2 - lon1).to_radians();
    let h = (dphi / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dlam / 2.0).sin().powi(2);
    (2.0 * h.sqrt().min(1.0).asin()).to_degrees()
}

/// Great-circle distance in km.
pub fn distance_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    distance_deg(lat1, lon1, lat2, lon2) * KM_PER_DEG
}

/// The point `dist_deg` degrees of arc from (`lat`, `lon`) along the initial `bearing_deg`
/// (clockwise from north); longitude in [0, 360).
pub fn destination(lat: f64, lon: f64, bearing_deg: f64, dist_deg: f64) -> (f64, f64) {
    let (phi, lam) = (lat.to_radians(), lon.to_radians());
    let (theta, delta) = (bearing_deg.to_radians(), dist_deg.to_radians());
    let sin_phi2 = phi.sin() * delta.cos() + phi.cos() * delta.sin() * theta.cos();
    let phi2 = sin_phi2.clamp(-1.0, 1.0).asin();
    let lam2 =
        lam + (theta.sin() * delta.sin() * phi.cos()).atan2(delta.cos() - phi.sin() * sin_phi2);
    (phi2.to_degrees(), wrap_360(lam2.to_degrees()))
}

/// Longitude in [0, 360).
pub fn wrap_360(lon: f64) -> f64 {
    let w = lon.rem_euclid(360.0);
    // rem_euclid of a tiny negative number rounds to 360.0 itself.
    if w >= 360.0 { 0.0 } else { w }
}

/// Longitude in [−180, 180), the convention of IBTrACS.
pub fn wrap_180(lon: f64) -> f64 {
    let w = wrap_360(lon);
    if w >= 180.0 { w - 360.0 } else { w }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_are_periodic_in_longitude() {
        assert!((distance_deg(0.0, 0.0, 0.0, 1.0) - 1.0).abs() < 1e-9);
        assert!(
            (distance_deg(10.0, 359.5, 10.0, -179.5 + 180.0) - distance_deg(10.0, -0.5, 10.0, 0.5))
                .abs()
                < 1e-9
        );
        assert!(
            (distance_deg(20.0, 179.0, 20.0, -179.0) - distance_deg(20.0, 179.0, 20.0, 181.0))
                .abs()
                < 1e-9
        );
        // A degree of longitude at 60° is half a degree of arc (to first order).
        assert!((distance_deg(60.0, 0.0, 60.0, 1.0) - 0.5).abs() < 1e-3);
        assert!((distance_km(0.0, 0.0, 1.0, 0.0) - 111.19).abs() < 0.01);
    }

    #[test]
    fn destination_inverts_distance() {
        for (lat, lon, bearing, d) in [
            (15.0, 179.5, 90.0, 3.0),
            (-30.0, 0.5, 250.0, 6.5),
            (45.0, 10.0, 0.0, 2.0),
        ] {
            let (lat2, lon2) = destination(lat, lon, bearing, d);
            assert!((distance_deg(lat, lon, lat2, lon2) - d).abs() < 1e-9);
            assert!((0.0..360.0).contains(&lon2));
        }
        let (lat2, _) = destination(10.0, 20.0, 0.0, 5.0);
        assert!((lat2 - 15.0).abs() < 1e-9);
    }

    #[test]
    fn longitude_wrapping() {
        assert_eq!(wrap_360(-0.0), 0.0);
        assert_eq!(wrap_360(-1e-17), 0.0);
        assert_eq!(wrap_360(370.0), 10.0);
        assert_eq!(wrap_180(190.0), -170.0);
        assert_eq!(wrap_180(180.0), -180.0);
        assert_eq!(wrap_180(-10.0), -10.0);
    }
}
