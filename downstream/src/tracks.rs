//! Linking per-step detections into tracks ([`stitch_tracks`]), and tracks as IBTrACS-like CSV.
//!
//! Stitching is greedy nearest-neighbour in time order, as TempestExtremes' StitchNodes: at each
//! time step every open track may take the closest unclaimed detection within the distance a
//! storm can travel since the track's last point (the per-step limit scaled by the time gap), a
//! track missing for longer than the gap limit is closed, and tracks shorter than the minimum
//! lifetime are dropped — short-lived vorticity maxima are mostly not tropical cyclones.
//!
//! The CSV has IBTrACS' key columns plus our intensity proxies:
//!
//! ```text
//! SID,ISO_TIME,LAT,LON,VORT850,Z850,WARM_CORE
//! 2020245N14188,2020-09-01 00:00:00,14.0021,-171.9987,2.714512e-4,14321.55,98.12
//! ```
//!
//! `LON` is written in [−180, 180) like IBTrACS; `VORT850` is signed (negative in the south);
//! `WARM_CORE` is empty where no warm-core check ran. The reader ([`parse_tracks_csv`]) takes this
//! file, the synthetic truth the loader's `synth` writes and real IBTrACS files alike.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use atmorep_proto::calendar::{TimeFormat, UtcDateTime, format_time, parse_iso};

use crate::config::StitchConfig;
use crate::csv::{quote, split_line};
use crate::detect::Detection;
use crate::error::{Result, TrackError};
use crate::geo::{distance_deg, wrap_180, wrap_360};

/// One position of a track.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrackPoint {
    /// Unix seconds (UTC).
    pub time_unix: i64,
    /// Degrees north.
    pub lat: f64,
    /// Degrees east, [0, 360).
    pub lon: f64,
    /// 850 hPa relative vorticity at the centre (s⁻¹, signed).
    pub vorticity: Option<f64>,
    /// 850 hPa geopotential at the centre (m² s⁻²).
    pub z_centre: Option<f64>,
    /// Warm-core strength: the thickness fall around the centre (m² s⁻²).
    pub warm_core: Option<f64>,
}

impl From<&Detection> for TrackPoint {
    fn from(d: &Detection) -> Self {
        Self {
            time_unix: d.time_unix,
            lat: d.lat,
            lon: d.lon,
            vorticity: Some(d.vorticity),
            z_centre: Some(d.z_centre),
            warm_core: d.warm_core,
        }
    }
}

/// A storm: its id and its positions in time order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Track {
    /// IBTrACS-style storm id: genesis year, day of year, hemisphere, latitude, longitude
    /// (`2020245N14188`).
    pub sid: String,
    pub points: Vec<TrackPoint>,
}

impl Track {
    /// Time of the first point (unix seconds).
    pub fn start(&self) -> i64 {
        self.points.first().map_or(0, |p| p.time_unix)
    }

    /// Time of the last point (unix seconds).
    pub fn end(&self) -> i64 {
        self.points.last().map_or(0, |p| p.time_unix)
    }

    /// Hours from the first to the last point.
    pub fn lifetime_hours(&self) -> f64 {
        (self.end() - self.start()) as f64 / 3600.0
    }

    /// The point at exactly `time_unix`, if the track has one.
    pub fn point_at(&self, time_unix: i64) -> Option<&TrackPoint> {
        self.points
            .binary_search_by_key(&time_unix, |p| p.time_unix)
            .ok()
            .map(|k| &self.points[k])
    }
}

struct Open {
    points: Vec<TrackPoint>,
}

impl Open {
    fn last(&self) -> &TrackPoint {
        self.points.last().expect("an open track has a point")
    }
}

/// Links detections (of any number of time steps, e.g. what [`crate::detect()`] returns) into
/// tracks, drops those shorter than the minimum lifetime, and names them; tracks come sorted by
/// start time.
pub fn stitch_tracks(steps: &[Vec<Detection>], cfg: &StitchConfig) -> Result<Vec<Track>> {
    cfg.validate()?;
    let mut by_time: BTreeMap<i64, Vec<&Detection>> = BTreeMap::new();
    for d in steps.iter().flatten() {
        by_time.entry(d.time_unix).or_default().push(d);
    }
    let max_gap_s = cfg.max_gap_hours * 3600.0;
    let mut open: Vec<Open> = Vec::new();
    let mut done: Vec<Vec<TrackPoint>> = Vec::new();
    for (&t, dets) in &by_time {
        let (still, gone): (Vec<Open>, Vec<Open>) = open
            .into_iter()
            .partition(|o| (t - o.last().time_unix) as f64 <= max_gap_s);
        done.extend(gone.into_iter().map(|o| o.points));
        open = still;

        let mut pairs = Vec::new();
        for (k, o) in open.iter().enumerate() {
            let last = o.last();
            let limit = cfg.max_distance_for((t - last.time_unix) as f64 / 3600.0);
            for (n, d) in dets.iter().enumerate() {
                let dist = distance_deg(last.lat, last.lon, d.lat, d.lon);
                if dist <= limit {
                    pairs.push((dist, k, n));
                }
            }
        }
        // Closest pairs first; indices break ties so the result never depends on hashing or
        // thread timing.
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then((a.1, a.2).cmp(&(b.1, b.2))));
        let mut track_taken = vec![false; open.len()];
        let mut det_taken = vec![false; dets.len()];
        for (_, k, n) in pairs {
            if !track_taken[k] && !det_taken[n] {
                track_taken[k] = true;
                det_taken[n] = true;
                open[k].points.push(TrackPoint::from(dets[n]));
            }
        }
        for (n, d) in dets.iter().enumerate() {
            if !det_taken[n] {
                open.push(Open {
                    points: vec![TrackPoint::from(*d)],
                });
            }
        }
    }
    done.extend(open.into_iter().map(|o| o.points));

    let min_life_s = cfg.min_lifetime_hours * 3600.0;
    let mut kept: Vec<Vec<TrackPoint>> = done
        .into_iter()
        .filter(|p| (p[p.len() - 1].time_unix - p[0].time_unix) as f64 >= min_life_s)
        .collect();
    kept.sort_by(|a, b| {
        (a[0].time_unix, a[0].lat, a[0].lon)
            .partial_cmp(&(b[0].time_unix, b[0].lat, b[0].lon))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut sids: Vec<String> = Vec::with_capacity(kept.len());
    Ok(kept
        .into_iter()
        .map(|points| {
            let sid = unique(genesis_sid(&points[0]), &sids);
            sids.push(sid.clone());
            Track { sid, points }
        })
        .collect())
}

/// IBTrACS' SID scheme: year, 1-based day of year, hemisphere, |lat| and lon (0…360) at genesis,
/// rounded to whole degrees.
pub fn genesis_sid(p: &TrackPoint) -> String {
    let t = UtcDateTime::from_unix_seconds(p.time_unix);
    format!(
        "{:04}{:03}{}{:02}{:03}",
        t.year,
        t.day_of_year + 1,
        if p.lat < 0.0 { 'S' } else { 'N' },
        p.lat.abs().round() as u32,
        wrap_360(p.lon).round() as u32 % 360
    )
}

fn unique(sid: String, taken: &[String]) -> String {
    if !taken.contains(&sid) {
        return sid;
    }
    (b'a'..=b'z')
        .map(|c| format!("{sid}{}", c as char))
        .chain((1..).map(|n| format!("{sid}-{n}")))
        .find(|s| !taken.contains(s))
        .expect("an unbounded sequence has a free name")
}

/// The header of our track CSV.
pub const CSV_HEADER: &str = "SID,ISO_TIME,LAT,LON,VORT850,Z850,WARM_CORE";

/// Tracks as CSV text (header, then one line per point, track by track).
pub fn tracks_to_csv(tracks: &[Track]) -> String {
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map(f).unwrap_or_default();
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for t in tracks {
        for p in &t.points {
            out.push_str(&format!(
                "{},{},{:.4},{:.4},{},{},{}\n",
                quote(&t.sid),
                format_time(p.time_unix, TimeFormat::Spaced),
                p.lat,
                wrap_180(p.lon),
                opt(p.vorticity, &|v| format!("{v:.6e}")),
                opt(p.z_centre, &|v| format!("{v:.2}")),
                opt(p.warm_core, &|v| format!("{v:.2}")),
            ));
        }
    }
    out
}

/// Writes [`tracks_to_csv`] to `path`.
pub fn write_tracks_csv(path: &Path, tracks: &[Track]) -> Result<()> {
    std::fs::write(path, tracks_to_csv(tracks)).map_err(|e| TrackError::io(path, e))
}

/// Reads a track CSV: ours, the synthetic truth, or IBTrACS ([`parse_tracks_csv`]).
pub fn read_tracks_csv(path: &Path) -> Result<Vec<Track>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrackError::io(path, e))?;
    parse_tracks_csv(&text, &path.display().to_string())
}

/// Parses a track CSV with at least the columns `SID`, `ISO_TIME`, `LAT`, `LON` (any order, any
/// other columns ignored) — ours, the synthetic truth (`SID,ISO_TIME,LAT,LON,VORT850,Z850_ANOM`)
/// and IBTrACS (whose second line gives units and is skipped, and whose blank fields are
/// allowed outside the four key columns). `VORT850`, `Z850` and `WARM_CORE` are read when present.
/// Points are grouped by SID (in order of first appearance) and sorted by time. Any malformed
/// line is an error naming `source_name` and its 1-based line number.
pub fn parse_tracks_csv(text: &str, source_name: &str) -> Result<Vec<Track>> {
    let err = |line: usize, detail: String| TrackError::Csv {
        source_name: source_name.to_string(),
        line,
        detail,
    };
    let mut lines = text.lines().enumerate().map(|(k, l)| (k + 1, l));
    let (_, header) = lines
        .next()
        .ok_or_else(|| err(1, "empty file: no header".into()))?;
    let header = split_line(header).map_err(|e| err(1, e))?;
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h.trim_start_matches('\u{feff}') == name)
    };
    let [sid_c, time_c, lat_c, lon_c] = ["SID", "ISO_TIME", "LAT", "LON"].map(col);
    let (Some(sid_c), Some(time_c), Some(lat_c), Some(lon_c)) = (sid_c, time_c, lat_c, lon_c)
    else {
        return Err(err(
            1,
            format!("the header must name SID, ISO_TIME, LAT and LON, got {header:?}"),
        ));
    };
    let [vort_c, z_c, warm_c] = ["VORT850", "Z850", "WARM_CORE"].map(col);

    let mut order: Vec<String> = Vec::new();
    let mut points: BTreeMap<String, Vec<(TrackPoint, usize)>> = BTreeMap::new();
    for (n, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f = split_line(line).map_err(|e| err(n, e))?;
        if f.len() != header.len() {
            return Err(err(
                n,
                format!("{} fields, the header has {}", f.len(), header.len()),
            ));
        }
        // IBTrACS' second line holds units (`degrees_north`, …) under an empty SID.
        if n == 2 && f[sid_c].is_empty() {
            continue;
        }
        let sid = f[sid_c].clone();
        if sid.is_empty() {
            return Err(err(n, "SID is empty".into()));
        }
        let time_unix = parse_iso(&f[time_c]).map_err(|_| {
            err(
                n,
                format!("ISO_TIME `{}` is not a UTC date and time", f[time_c]),
            )
        })?;
        let number = |c: usize, what: &str| -> Result<f64> {
            f[c].parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| err(n, format!("{what} `{}` is not a number", f[c])))
        };
        let lat = number(lat_c, "LAT")?;
        if lat.abs() > 90.0 {
            return Err(err(n, format!("LAT {lat} is outside ±90")));
        }
        let lon = wrap_360(number(lon_c, "LON")?);
        let optional = |c: Option<usize>, what: &str| -> Result<Option<f64>> {
            match c {
                Some(c) if !f[c].is_empty() => number(c, what).map(Some),
                _ => Ok(None),
            }
        };
        let point = TrackPoint {
            time_unix,
            lat,
            lon,
            vorticity: optional(vort_c, "VORT850")?,
            z_centre: optional(z_c, "Z850")?,
            warm_core: optional(warm_c, "WARM_CORE")?,
        };
        if !points.contains_key(&sid) {
            order.push(sid.clone());
        }
        points.entry(sid).or_default().push((point, n));
    }
    order
        .into_iter()
        .map(|sid| {
            let mut pts = points.remove(&sid).expect("every listed SID has points");
            pts.sort_by_key(|(p, _)| p.time_unix);
            if let Some(w) = pts
                .windows(2)
                .find(|w| w[0].0.time_unix == w[1].0.time_unix)
            {
                return Err(err(
                    w[1].1,
                    format!(
                        "storm {sid} has a second point at {}",
                        format_time(w[1].0.time_unix, TimeFormat::Spaced)
                    ),
                ));
            }
            Ok(Track {
                sid,
                points: pts.into_iter().map(|(p, _)| p).collect(),
            })
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const T0: i64 = 1_598_918_400; // 2020-09-01 00:00 UTC

    fn det(hours: i64, lat: f64, lon: f64) -> Detection {
        Detection {
            time_unix: T0 + hours * 3600,
            lat,
            lon: wrap_360(lon),
            vorticity: lat.signum() * 1e-4,
            z_centre: 14_000.0,
            closed_contour: 300.0,
            warm_core: Some(80.0),
        }
    }

    /// Detections of one storm every 6 h for `steps` steps from `start_h`, moving by
    /// (`dlat`, `dlon`) per step.
    fn storm(start_h: i64, steps: i64, lat: f64, lon: f64, dlat: f64, dlon: f64) -> Vec<Detection> {
        (0..steps)
            .map(|k| {
                det(
                    start_h + 6 * k,
                    lat + dlat * k as f64,
                    lon + dlon * k as f64,
                )
            })
            .collect()
    }

    /// Groups detections by time, as `detect` returns them.
    fn by_step(dets: Vec<Detection>) -> Vec<Vec<Detection>> {
        let mut m: BTreeMap<i64, Vec<Detection>> = BTreeMap::new();
        for d in dets {
            m.entry(d.time_unix).or_default().push(d);
        }
        m.into_values().collect()
    }

    #[test]
    fn links_storms_and_drops_short_lived_ones() {
        let mut dets = storm(0, 13, 14.0, 140.0, 0.5, -1.0);
        dets.extend(storm(0, 13, 19.0, 145.0, 0.4, -1.0));
        // 36 h only: shorter than 54 h.
        dets.extend(storm(12, 7, -15.0, 60.0, -0.3, -0.8));
        let tracks = stitch_tracks(&by_step(dets), &StitchConfig::default()).unwrap();
        assert_eq!(tracks.len(), 2, "{tracks:#?}");
        for t in &tracks {
            assert_eq!(t.points.len(), 13);
            assert_eq!(t.lifetime_hours(), 72.0);
            // Each track stays with its own storm.
            let first = t.points[0].lat;
            assert!(t.points.iter().all(|p| (p.lat - first).abs() < 6.5));
        }
        assert_eq!(tracks[0].sid, "2020245N14140");
        assert_eq!(tracks[1].sid, "2020245N19145");
    }

    #[test]
    fn tracks_crossing_the_dateline_and_0_degrees_stay_whole() {
        let mut dets = storm(0, 12, 15.0, 176.0, 0.3, 1.2);
        dets.extend(storm(0, 12, -16.0, 4.0, -0.3, -1.1));
        let tracks = stitch_tracks(&by_step(dets), &StitchConfig::default()).unwrap();
        assert_eq!(tracks.len(), 2, "{tracks:#?}");
        let north = tracks.iter().find(|t| t.points[0].lat > 0.0).unwrap();
        let south = tracks.iter().find(|t| t.points[0].lat < 0.0).unwrap();
        assert_eq!((north.points.len(), south.points.len()), (12, 12));
        assert!(north.points[0].lon < 180.0 && north.points[11].lon > 180.0);
        assert!(south.points[0].lon < 10.0 && south.points[11].lon > 350.0);
        assert!(south.sid.contains('S'));
    }

    #[test]
    fn gaps_up_to_the_limit_keep_a_track() {
        let full = storm(0, 16, 12.0, 130.0, 0.3, -0.8);
        // Missing at 3 steps: 24 h between two points.
        let gap24: Vec<Detection> = full
            .iter()
            .enumerate()
            .filter(|(k, _)| !(5..8).contains(k))
            .map(|(_, d)| d.clone())
            .collect();
        let tracks = stitch_tracks(&by_step(gap24), &StitchConfig::default()).unwrap();
        assert_eq!(tracks.len(), 1);
        assert_eq!(tracks[0].points.len(), 13);
        // Missing at 4 steps: 30 h, the track breaks, and both halves are too short.
        let gap30: Vec<Detection> = full
            .iter()
            .enumerate()
            .filter(|(k, _)| !(5..9).contains(k))
            .map(|(_, d)| d.clone())
            .collect();
        let cfg = StitchConfig {
            min_lifetime_hours: 0.0,
            ..StitchConfig::default()
        };
        assert_eq!(
            stitch_tracks(&by_step(gap30.clone()), &cfg).unwrap().len(),
            2
        );
        assert!(
            stitch_tracks(&by_step(gap30), &StitchConfig::default())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn the_distance_limit_scales_with_the_time_between_points() {
        let cfg = StitchConfig {
            min_lifetime_hours: 0.0,
            ..StitchConfig::default()
        };
        // 10° in 6 h is too fast (8° allowed) …
        let fast = vec![vec![det(0, 15.0, 100.0)], vec![det(6, 15.0, 110.36)]];
        assert_eq!(stitch_tracks(&fast, &cfg).unwrap().len(), 2);
        // … 10° in 12 h is not (16° allowed).
        let slow = vec![vec![det(0, 15.0, 100.0)], vec![det(12, 15.0, 110.36)]];
        assert_eq!(stitch_tracks(&slow, &cfg).unwrap().len(), 1);
    }

    #[test]
    fn csv_round_trip() {
        let mut dets = storm(0, 10, 14.0, 178.0, 0.5, 1.0);
        dets.push(Detection {
            warm_core: None,
            ..det(60, 40.0, 10.0)
        });
        let cfg = StitchConfig {
            min_lifetime_hours: 0.0,
            ..StitchConfig::default()
        };
        let tracks = stitch_tracks(&by_step(dets), &cfg).unwrap();
        let text = tracks_to_csv(&tracks);
        assert!(text.starts_with(CSV_HEADER));
        // IBTrACS' longitude convention on disk.
        assert!(text.contains(",-179.0000,"), "{text}");
        assert!(text.contains("2020-09-01 06:00:00"));
        let back = parse_tracks_csv(&text, "ours").unwrap();
        assert_eq!(back.len(), tracks.len());
        for (a, b) in back.iter().zip(&tracks) {
            assert_eq!(a.sid, b.sid);
            assert_eq!(a.points.len(), b.points.len());
            for (p, q) in a.points.iter().zip(&b.points) {
                assert_eq!(p.time_unix, q.time_unix);
                assert!((p.lat - q.lat).abs() < 1e-4 && (p.lon - q.lon).abs() < 1e-4);
                assert_eq!(p.warm_core.is_some(), q.warm_core.is_some());
                assert!((p.vorticity.unwrap() - q.vorticity.unwrap()).abs() < 1e-9);
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tracks.csv");
        write_tracks_csv(&path, &tracks).unwrap();
        assert_eq!(read_tracks_csv(&path).unwrap(), back);
    }

    /// What `atmorep loader synth` writes beside a store (loader-service/src/tools/synth/mod.rs).
    pub(crate) const SYNTH_TRUTH: &str = "\
SID,ISO_TIME,LAT,LON,VORT850,Z850_ANOM
SYN0001N,2020-09-01 00:00:00,14.0000,-172.0000,2.979150e-4,-245.36
SYN0001N,2020-09-01 03:00:00,14.1250,-172.3333,3.066815e-4,-254.88
SYN0001N,2020-09-01 06:00:00,14.2500,-172.6667,3.152870e-4,-264.32
SYN0002S,2020-09-01 00:00:00,-16.0000,8.0000,-2.979150e-4,-277.41
SYN0002S,2020-09-01 03:00:00,-16.1042,7.6667,-3.066815e-4,-287.02
";

    /// The head of an IBTrACS v04 CSV: the units line, blank fields, 3-hourly interpolated
    /// points, longitudes in −180 … 180.
    pub(crate) const IBTRACS: &str = "\
SID,SEASON,NUMBER,BASIN,SUBBASIN,NAME,ISO_TIME,NATURE,LAT,LON,WMO_WIND,WMO_PRES,WMO_AGENCY,TRACK_TYPE,DIST2LAND,LANDFALL,IFLAG
 ,Year, , , , , , ,degrees_north,degrees_east,kts,mb, , ,km,km, 
2020233N14313,2020,77,NA,MM,LAURA,2020-08-20 12:00:00,TS,14.5000,-46.1000,25,1008,hurdat_atl,main,1675,1675,O____________
2020233N14313,2020,77,NA,MM,LAURA,2020-08-20 15:00:00,TS,14.6350,-47.0126, , , ,main,1608,1608,P____________
2020233N14313,2020,77,NA,MM,LAURA,2020-08-20 18:00:00,TS,14.8000,-47.9000,30,1007,hurdat_atl,main,1534,1534,O____________
2020238N16152,2020,80,WP,MM,BAVI,2020-08-21 00:00:00,DS,16.3000,152.5000, , , ,main,1823,1823,______________
2020238N16152,2020,80,WP,MM,\"BAVI\",2020-08-21 06:00:00,DS,16.6000,151.8000, , , ,main,1780,1780,______________
";

    #[test]
    fn synthetic_truth_parses() {
        let tracks = parse_tracks_csv(SYNTH_TRUTH, "truth").unwrap();
        assert_eq!(tracks.len(), 2);
        assert_eq!(tracks[0].sid, "SYN0001N");
        assert_eq!(tracks[0].points.len(), 3);
        assert_eq!(tracks[0].points[0].lon, 188.0);
        assert_eq!(tracks[0].points[2].time_unix, T0 + 6 * 3600);
        assert_eq!(tracks[1].points[1].vorticity, Some(-3.066815e-4));
        // Z850_ANOM is an anomaly, not the centre value: not read as Z850.
        assert_eq!(tracks[1].points[0].z_centre, None);
    }

    #[test]
    fn ibtracs_sample_parses() {
        let tracks = parse_tracks_csv(IBTRACS, "ibtracs.csv").unwrap();
        assert_eq!(tracks.len(), 2);
        let laura = &tracks[0];
        assert_eq!(laura.sid, "2020233N14313");
        assert_eq!(laura.points.len(), 3);
        assert!((laura.points[1].lon - (360.0 - 47.0126)).abs() < 1e-9);
        assert_eq!(laura.points[0].vorticity, None);
        let bavi = &tracks[1];
        assert_eq!(bavi.points[1].lat, 16.6);
        assert_eq!(
            bavi.points[1].time_unix - bavi.points[0].time_unix,
            6 * 3600
        );
    }

    #[test]
    fn malformed_lines_are_named() {
        let cases = [
            (SYNTH_TRUTH.replace("14.1250", "north"), 3, "LAT `north`"),
            (
                SYNTH_TRUTH.replace("2020-09-01 06:00:00", "2020-09-31 06:00"),
                4,
                "ISO_TIME",
            ),
            (SYNTH_TRUTH.replace(",-16.1042", ""), 6, "5 fields"),
            (
                SYNTH_TRUTH.replace("SYN0002S,2020-09-01 00", ",2020-09-01 00"),
                5,
                "SID",
            ),
            (SYNTH_TRUTH.replace("14.2500", "95.0"), 4, "outside"),
            (SYNTH_TRUTH.replace("LON,", "LONGITUDE,"), 1, "LON"),
            (
                SYNTH_TRUTH.replace("03:00:00,14.1250", "00:00:00,14.1250"),
                3,
                "second point",
            ),
            (IBTRACS.replace("14.8000", "\"14.8"), 5, "quoted"),
            (IBTRACS.replace(",-47.9000,", ",,"), 5, "LON ``"),
            (String::new(), 1, "empty"),
        ];
        for (text, line, what) in cases {
            let e = parse_tracks_csv(&text, "f.csv").unwrap_err();
            assert!(
                matches!(&e, TrackError::Csv { line: l, .. } if *l == line),
                "expected line {line}: {e}"
            );
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("f.csv:{line}:")) && msg.contains(what),
                "{msg}"
            );
        }
    }
}
