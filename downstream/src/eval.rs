//! Tracks against reference tracks: the synthetic truth `atmorep loader synth` writes beside a
//! store, or IBTrACS.
//!
//! A tracked storm and a reference storm *match* when they share at least
//! [`EvalConfig::min_overlap_points`] instants and their mean great-circle distance over those
//! instants is at most [`EvalConfig::match_distance_km`]; pairs are taken closest first, each
//! storm at most once. Then a matched reference storm is a hit, an unmatched one a miss, an
//! unmatched tracked storm a false alarm. Position errors are the great-circle distances of the
//! matched pairs at their shared instants, overall and by *lead time*: hours since the pair's
//! first shared instant (how the error grows over a storm's tracked life).

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrackError};
use crate::geo::distance_km;
use crate::tracks::{Track, read_tracks_csv};

/// How tracks are matched and errors binned.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Largest mean distance of a matched pair (km).
    pub match_distance_km: f64,
    /// Fewest shared instants of a matched pair.
    pub min_overlap_points: usize,
    /// Width of the lead-time bins (hours).
    pub lead_bin_hours: f64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            // About 4.5° of arc: well beyond a detector's position error, well below the
            // distance between two storms of one basin.
            match_distance_km: 500.0,
            min_overlap_points: 1,
            lead_bin_hours: 6.0,
        }
    }
}

/// Reads reference tracks (synthetic truth or IBTrACS CSV), keeping only the points within
/// `period` (unix seconds, both ends inclusive) when given — IBTrACS spans 1842 to now.
pub fn read_reference(path: &Path, period: Option<(i64, i64)>) -> Result<Vec<Track>> {
    Ok(restrict(read_tracks_csv(path)?, period))
}

/// Keeps the points within `period` (inclusive) and the tracks that still have points.
pub fn restrict(tracks: Vec<Track>, period: Option<(i64, i64)>) -> Vec<Track> {
    let Some((start, end)) = period else {
        return tracks;
    };
    tracks
        .into_iter()
        .filter_map(|mut t| {
            t.points.retain(|p| (start..=end).contains(&p.time_unix));
            (!t.points.is_empty()).then_some(t)
        })
        .collect()
}

/// One matched pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrackMatch {
    pub track: String,
    pub reference: String,
    /// Shared instants.
    pub points: usize,
    /// Mean great-circle distance over them (km).
    pub mean_km: f64,
}

/// Position errors of one lead-time bin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeadError {
    /// Start of the bin (hours since the pair's first shared instant).
    pub lead_hours: f64,
    pub points: usize,
    pub mean_km: f64,
    pub max_km: f64,
}

/// The scores of a set of tracks against reference tracks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub hits: usize,
    pub misses: usize,
    pub false_alarms: usize,
    /// hits / (hits + misses); `None` without reference storms.
    pub probability_of_detection: Option<f64>,
    /// false alarms / (hits + false alarms); `None` without tracked storms.
    pub false_alarm_ratio: Option<f64>,
    /// Mean position error over every shared instant of every matched pair (km).
    pub mean_error_km: Option<f64>,
    pub by_lead: Vec<LeadError>,
    pub matches: Vec<TrackMatch>,
    /// SIDs of the reference storms no track matched.
    pub missed: Vec<String>,
    /// SIDs of the tracks no reference storm matched.
    pub unmatched_tracks: Vec<String>,
}

/// Scores `tracks` against `reference`; see the [module documentation](self).
pub fn evaluate(tracks: &[Track], reference: &[Track], cfg: &EvalConfig) -> Result<EvalReport> {
    if !(cfg.match_distance_km > 0.0 && cfg.lead_bin_hours > 0.0) || cfg.min_overlap_points == 0 {
        return Err(TrackError::Config(format!(
            "evaluation needs a positive match distance, lead bin and overlap, got {cfg:?}"
        )));
    }
    let mut pairs = Vec::new();
    for (a, t) in tracks.iter().enumerate() {
        for (b, r) in reference.iter().enumerate() {
            let d = shared_distances(t, r);
            if d.len() >= cfg.min_overlap_points {
                let mean = d.iter().map(|x| x.1).sum::<f64>() / d.len() as f64;
                if mean <= cfg.match_distance_km {
                    pairs.push((mean, a, b));
                }
            }
        }
    }
    pairs.sort_by(|x, y| x.0.total_cmp(&y.0).then((x.1, x.2).cmp(&(y.1, y.2))));
    let (mut track_used, mut ref_used) = (vec![false; tracks.len()], vec![false; reference.len()]);
    let mut matches = Vec::new();
    let mut errors: Vec<(f64, f64)> = Vec::new();
    for (mean, a, b) in pairs {
        if track_used[a] || ref_used[b] {
            continue;
        }
        track_used[a] = true;
        ref_used[b] = true;
        let d = shared_distances(&tracks[a], &reference[b]);
        let first = d[0].0;
        errors.extend(d.iter().map(|&(t, km)| ((t - first) as f64 / 3600.0, km)));
        matches.push(TrackMatch {
            track: tracks[a].sid.clone(),
            reference: reference[b].sid.clone(),
            points: d.len(),
            mean_km: mean,
        });
    }
    let hits = matches.len();
    let misses = reference.len() - hits;
    let false_alarms = tracks.len() - hits;
    let ratio = |num: usize, den: usize| (den > 0).then(|| num as f64 / den as f64);

    let mut by_lead: Vec<LeadError> = Vec::new();
    let mut binned: Vec<(i64, f64)> = errors
        .iter()
        .map(|&(lead, km)| ((lead / cfg.lead_bin_hours).floor() as i64, km))
        .collect();
    binned.sort_by(|x, y| x.0.cmp(&y.0).then(x.1.total_cmp(&y.1)));
    for chunk in binned.chunk_by(|x, y| x.0 == y.0) {
        let n = chunk.len();
        by_lead.push(LeadError {
            lead_hours: chunk[0].0 as f64 * cfg.lead_bin_hours,
            points: n,
            mean_km: chunk.iter().map(|c| c.1).sum::<f64>() / n as f64,
            max_km: chunk.iter().map(|c| c.1).fold(0.0, f64::max),
        });
    }
    Ok(EvalReport {
        hits,
        misses,
        false_alarms,
        probability_of_detection: ratio(hits, hits + misses),
        false_alarm_ratio: ratio(false_alarms, hits + false_alarms),
        mean_error_km: (!errors.is_empty())
            .then(|| errors.iter().map(|e| e.1).sum::<f64>() / errors.len() as f64),
        by_lead,
        matches,
        missed: reference
            .iter()
            .zip(&ref_used)
            .filter(|(_, used)| !**used)
            .map(|(r, _)| r.sid.clone())
            .collect(),
        unmatched_tracks: tracks
            .iter()
            .zip(&track_used)
            .filter(|(_, used)| !**used)
            .map(|(t, _)| t.sid.clone())
            .collect(),
    })
}

/// (instant, km) at every instant both tracks have, in time order.
fn shared_distances(a: &Track, b: &Track) -> Vec<(i64, f64)> {
    a.points
        .iter()
        .filter_map(|p| {
            let q = b.point_at(p.time_unix)?;
            Some((p.time_unix, distance_km(p.lat, p.lon, q.lat, q.lon)))
        })
        .collect()
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{:.0}%", 100.0 * v));
        writeln!(
            f,
            "hits {}  misses {}  false alarms {}  (detection {}, false-alarm ratio {})",
            self.hits,
            self.misses,
            self.false_alarms,
            pct(self.probability_of_detection),
            pct(self.false_alarm_ratio)
        )?;
        match self.mean_error_km {
            Some(e) => writeln!(f, "mean position error {e:.1} km")?,
            None => writeln!(f, "mean position error –")?,
        }
        if !self.by_lead.is_empty() {
            writeln!(
                f,
                "{:>8} {:>6} {:>9} {:>9}",
                "lead h", "points", "mean km", "max km"
            )?;
            for l in &self.by_lead {
                writeln!(
                    f,
                    "{:>8.0} {:>6} {:>9.1} {:>9.1}",
                    l.lead_hours, l.points, l.mean_km, l.max_km
                )?;
            }
        }
        for m in &self.matches {
            writeln!(
                f,
                "{} ↔ {}: {} points, mean {:.1} km",
                m.track, m.reference, m.points, m.mean_km
            )?;
        }
        if !self.missed.is_empty() {
            writeln!(f, "missed: {}", self.missed.join(", "))?;
        }
        if !self.unmatched_tracks.is_empty() {
            writeln!(f, "false alarms: {}", self.unmatched_tracks.join(", "))?;
        }
        Ok(())
    }
}

/// The time span of `tracks` (first and last instant), e.g. to restrict a reference to it.
pub fn period_of(tracks: &[Track]) -> Option<(i64, i64)> {
    let start = tracks.iter().map(Track::start).min()?;
    let end = tracks.iter().map(Track::end).max()?;
    Some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geo::KM_PER_DEG;
    use crate::tracks::{TrackPoint, parse_tracks_csv, tracks_to_csv};

    const T0: i64 = 1_598_918_400;

    /// A track every `step_h` hours moving `dlon_per_h` degrees east per hour.
    fn track_every(
        step_h: i64,
        sid: &str,
        start_h: i64,
        steps: i64,
        lat: f64,
        lon: f64,
        dlon_per_h: f64,
    ) -> Track {
        Track {
            sid: sid.into(),
            points: (0..steps)
                .map(|k| TrackPoint {
                    time_unix: T0 + (start_h + step_h * k) * 3600,
                    lat,
                    lon: crate::geo::wrap_360(lon + dlon_per_h * (step_h * k) as f64),
                    vorticity: None,
                    z_centre: None,
                    warm_core: None,
                })
                .collect(),
        }
    }

    fn track(sid: &str, start_h: i64, steps: i64, lat: f64, lon: f64, dlon_per_h: f64) -> Track {
        track_every(3, sid, start_h, steps, lat, lon, dlon_per_h)
    }

    #[test]
    fn hits_misses_false_alarms_and_errors() {
        // Truth every 3 h; tracks every 6 h, 0.5° north of the truth (55.6 km), the second one
        // drifting further off with time.
        let truth = vec![
            track("SYN0001N", 0, 25, 14.0, 188.0, -0.1),
            track("SYN0002S", 0, 25, -16.0, 8.0, -0.1),
            track("SYN0003N", 0, 25, 20.0, 60.0, -0.1),
        ];
        let mut ours = vec![
            track_every(6, "A", 0, 13, 14.5, 188.0, -0.1),
            track_every(6, "B", 0, 13, -15.5, 8.0, -0.1),
            // Nowhere near a storm of the truth.
            track_every(6, "C", 0, 13, 25.0, 300.0, -0.1),
        ];
        for (k, p) in ours[1].points.iter_mut().enumerate() {
            p.lat += 0.1 * k as f64;
        }
        let report = evaluate(&ours, &truth, &EvalConfig::default()).unwrap();
        assert_eq!(
            (report.hits, report.misses, report.false_alarms),
            (2, 1, 1),
            "{report}"
        );
        assert_eq!(report.missed, vec!["SYN0003N"]);
        assert_eq!(report.unmatched_tracks, vec!["C"]);
        assert_eq!(report.probability_of_detection, Some(2.0 / 3.0));
        assert_eq!(report.false_alarm_ratio, Some(1.0 / 3.0));
        let a = report.matches.iter().find(|m| m.track == "A").unwrap();
        assert_eq!((a.reference.as_str(), a.points), ("SYN0001N", 13));
        assert!((a.mean_km - 0.5 * KM_PER_DEG).abs() < 0.1, "{a:?}");
        // By lead: 13 bins of 6 h with 2 points each; the error grows with B's drift.
        assert_eq!(report.by_lead.len(), 13);
        assert!(report.by_lead.iter().all(|l| l.points == 2));
        assert!((report.by_lead[0].mean_km - 0.5 * KM_PER_DEG).abs() < 0.1);
        assert!(report.by_lead[12].max_km > 1.6 * KM_PER_DEG);
        assert_eq!(report.by_lead[12].lead_hours, 72.0);
        let mean = report.mean_error_km.unwrap();
        assert!(mean > 0.5 * KM_PER_DEG && mean < 1.2 * KM_PER_DEG, "{mean}");
        let text = report.to_string();
        assert!(text.contains("hits 2  misses 1  false alarms 1"), "{text}");
        let json = serde_json::to_string(&report).unwrap();
        assert!(
            json.contains(r#""hits":2,"misses":1,"false_alarms":1"#),
            "{json}"
        );
    }

    #[test]
    fn a_far_track_does_not_match_and_each_storm_matches_once() {
        let truth = vec![track("T", 0, 9, 15.0, 140.0, -0.5)];
        let ours = vec![
            track("near", 0, 9, 15.2, 140.0, -0.5),
            track("twin", 0, 9, 15.6, 140.0, -0.5),
            track("far", 0, 9, 22.0, 140.0, -0.5),
        ];
        let r = evaluate(&ours, &truth, &EvalConfig::default()).unwrap();
        assert_eq!((r.hits, r.misses, r.false_alarms), (1, 0, 2));
        assert_eq!(r.matches[0].track, "near");
        // No shared instant: no match.
        let late = vec![track("late", 1, 9, 15.0, 140.0, -0.5)];
        let r = evaluate(&late, &truth, &EvalConfig::default()).unwrap();
        assert_eq!((r.hits, r.misses, r.false_alarms), (0, 1, 1));
        assert_eq!(r.mean_error_km, None);
        assert!(
            evaluate(
                &ours,
                &truth,
                &EvalConfig {
                    min_overlap_points: 0,
                    ..EvalConfig::default()
                }
            )
            .is_err()
        );
    }

    #[test]
    fn reference_files_are_restricted_to_the_period() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ibtracs.csv");
        std::fs::write(&path, crate::tracks::tests::IBTRACS).unwrap();
        let all = read_reference(&path, None).unwrap();
        assert_eq!(all.len(), 2);
        let laura_only = atmorep_proto::calendar::parse_iso("2020-08-20 00:00").unwrap();
        let end = atmorep_proto::calendar::parse_iso("2020-08-20 15:00").unwrap();
        let some = read_reference(&path, Some((laura_only, end))).unwrap();
        assert_eq!(some.len(), 1);
        assert_eq!(some[0].points.len(), 2);
        let truth = parse_tracks_csv(crate::tracks::tests::SYNTH_TRUTH, "t").unwrap();
        assert_eq!(period_of(&truth), Some((T0, T0 + 6 * 3600)));
        // Our own files are references too.
        let ours = parse_tracks_csv(&tracks_to_csv(&truth), "ours").unwrap();
        let r = evaluate(&ours, &truth, &EvalConfig::default()).unwrap();
        assert_eq!((r.hits, r.misses, r.false_alarms), (2, 0, 0));
        assert!(r.mean_error_km.unwrap() < 0.1);
        let e = read_reference(&dir.path().join("absent.csv"), None).unwrap_err();
        assert!(e.to_string().contains("absent.csv"));
    }
}
