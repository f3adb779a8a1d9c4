//! The synthetic store's cyclone CSV must describe the fields: at every listed time and place
//! there is a cyclonic 850 hPa vorticity maximum, a geopotential low and a warm core — on a
//! coarse grid and on ERA5's 0.25° grid.

use std::path::Path;

use atmorep_loader::progress::NoProgress;
use atmorep_loader::tools::synth::{SynthConfig, tracks_path, write_store};
use atmorep_loader::{Dataset, Hyperslab};
use atmorep_proto::calendar::{TimeFormat, format_time};

#[derive(Debug)]
struct TrackPoint {
    sid: String,
    time: String,
    lat: f64,
    lon: f64,
}

fn read_tracks(path: &Path) -> Vec<TrackPoint> {
    let text = std::fs::read_to_string(path).expect("tracks csv");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("SID,ISO_TIME,LAT,LON,VORT850,Z850_ANOM"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            TrackPoint {
                sid: f[0].into(),
                time: f[1].into(),
                lat: f[2].parse().unwrap(),
                lon: f[3].parse::<f64>().unwrap().rem_euclid(360.0),
            }
        })
        .collect()
}

/// Canonical (y, x) of the largest cyclonic vorticity within `radius` grid points of (lat, lon).
fn vortex_centre(
    field: &[f32],
    ds: &Dataset,
    lat: f64,
    lon: f64,
    radius: isize,
    sign: f32,
) -> (usize, usize) {
    let (ny, nx) = (ds.lats.len(), ds.lons.len());
    let dg = ds.lats[0] - ds.lats[1];
    let y0 = ((ds.lats[0] - lat) / dg).round() as isize;
    let x0 = (lon / dg).round() as isize;
    let mut best = (f32::NEG_INFINITY, 0, 0);
    for dy in -radius..=radius {
        for dx in -radius..=radius {
            let y = (y0 + dy).clamp(0, ny as isize - 1) as usize;
            let x = (x0 + dx).rem_euclid(nx as isize) as usize;
            let v = sign * field[y * nx + x];
            if v > best.0 {
                best = (v, y, x);
            }
        }
    }
    (best.1, best.2)
}

fn lon_distance(a: f64, b: f64) -> f64 {
    let d = (a - b).rem_euclid(360.0);
    d.min(360.0 - d)
}

async fn check_store(path: &Path, tolerance_deg: f64) {
    let ds = Dataset::open(path.to_str().unwrap()).await.unwrap();
    let tracks = read_tracks(&tracks_path(path));
    assert!(!tracks.is_empty());
    let level = |name: &str, p: f64| {
        ds.variable(name)
            .unwrap()
            .levels
            .iter()
            .position(|l| *l == p)
            .unwrap()
    };
    let (ny, nx) = (ds.lats.len(), ds.lons.len());
    for point in &tracks {
        let t = ds
            .times
            .iter()
            .position(|&t| format_time(t, TimeFormat::Spaced) == point.time)
            .expect("track time is a store time");
        let slab = |name: &str, p: f64| Hyperslab {
            time: t..t + 1,
            levels: vec![level(name, p)],
            ..Hyperslab::full(&ds, ds.variable(name).unwrap())
        };
        let read = |name: &str, p: f64| {
            let slab = slab(name, p);
            let ds = &ds;
            async move { ds.read(&slab).await }
        };
        let vo = read("vo", 850.0).await.unwrap();
        let sign = if point.lat >= 0.0 { 1.0 } else { -1.0 };
        let (y, x) = vortex_centre(&vo, &ds, point.lat, point.lon, 4, sign);
        let (clat, clon) = (ds.lats[y], ds.lons[x]);
        assert!(
            (clat - point.lat).abs() <= tolerance_deg
                && lon_distance(clon, point.lon) <= tolerance_deg,
            "{}: vorticity maximum at ({clat}, {clon}), track says ({}, {})",
            point.sid,
            point.lat,
            point.lon
        );
        assert!(
            sign * vo[y * nx + x] > 3.5e-5,
            "{} is cyclonic and strong",
            point.sid
        );
        // Geopotential low: the centre is lower than 6° away in all four directions.
        let z = read("z", 850.0).await.unwrap();
        let dg = ds.lats[0] - ds.lats[1];
        let off = (6.0 / dg).round() as usize;
        for (yy, xx) in [
            (y.saturating_sub(off), x),
            ((y + off).min(ny - 1), x),
            (y, (x + off) % nx),
            (y, (x + nx - off) % nx),
        ] {
            assert!(
                z[y * nx + x] + 100.0 < z[yy * nx + xx],
                "{}: no closed low",
                point.sid
            );
        }
        // Warm core: 300–500 hPa thickness is larger at the centre than 6° away.
        let (z3, z5) = (
            read("z", 300.0).await.unwrap(),
            read("z", 500.0).await.unwrap(),
        );
        let thick = |k: usize| z3[k] - z5[k];
        assert!(
            thick(y * nx + x) > thick(y * nx + (x + off) % nx) + 30.0,
            "{}: no warm core",
            point.sid
        );
    }
    // One storm per hemisphere; the northern one crosses 180°, the southern one 0°.
    let north: Vec<&TrackPoint> = tracks.iter().filter(|p| p.sid == "SYN0001N").collect();
    let south: Vec<&TrackPoint> = tracks.iter().filter(|p| p.sid == "SYN0002S").collect();
    assert!(north.iter().all(|p| p.lat > 0.0) && south.iter().all(|p| p.lat < 0.0));
    assert!(north.first().unwrap().lon > 180.0 && north.last().unwrap().lon < 180.0);
    assert!(south.first().unwrap().lon < 90.0 && south.last().unwrap().lon > 270.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coarse_store_tracks_match_the_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coarse.zarr");
    let cfg = SynthConfig {
        steps: 9,
        step_hours: 6,
        variables: vec!["z".into(), "vo".into()],
        ..SynthConfig::default()
    };
    let summary = write_store(&cfg, &path, &NoProgress).unwrap();
    assert_eq!(summary.shape, [9, 3, 181, 360]);
    check_store(&path, 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn era5_resolution_store_tracks_match_the_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("era5.zarr");
    let cfg = SynthConfig {
        grid_deg: 0.25,
        steps: 3,
        step_hours: 24,
        variables: vec!["z".into(), "vo".into()],
        ..SynthConfig::default()
    };
    let summary = write_store(&cfg, &path, &NoProgress).unwrap();
    assert_eq!(summary.shape, [3, 3, 721, 1440]);
    check_store(&path, 0.5).await;
}
