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

use atmorep_proto::calendar::UtcDateTime;

use crate::config::StitchConfig;
use crate::csv::{quote, split_line};
use crate::detect::Detection;
use crate::error::{Result, TrackError};
use crate::geo::{distance_deg, wrap_180, wrap_360};
use crate::time::{format_iso, parse_iso};

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
                format_iso(p.time_unix),
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
        let time_unix = parse_iso(&f[time_c]).ok_or_else(|| {
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
                        format_iso(w[1].0.time_unix)
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
