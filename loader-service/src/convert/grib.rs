//! GRIB editions 1 and 2 through ecCodes (the `eccodes` crate over the system's libeccodes):
//! one pass over the message headers describes a file, a second one yields its fields. Only
//! regular latitude/longitude grids scanned west→east are read; Gaussian, reduced and
//! projected grids are refused naming the message. Times are validity times (as cfgrib's
//! `valid_time`), members are the `number` key, variables are named as cfgrib names them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use eccodes::{CodesHandle, FallibleStreamingIterator, KeyRead, KeyedMessage, ProductKind};

use super::ConvertError;
use super::input::{Field, Format, InputFile, VarInfo, iso, round_coord, to_hpa};

/// The header keys of one message that matter here.
#[derive(Debug, Clone, PartialEq)]
struct Header {
    variable: String,
    member: Option<i64>,
    time: i64,
    /// hPa for pressure levels, `None` for a single-level field.
    level: Option<f64>,
}

/// A message's grid: latitudes and longitudes of its rows and columns.
#[derive(Debug, Clone, PartialEq)]
struct Grid {
    lats: Vec<f64>,
    lons: Vec<f64>,
}

fn get<T>(msg: &KeyedMessage, key: &str) -> Result<T, String>
where
    KeyedMessage: KeyRead<T>,
{
    msg.read_key(key).map_err(|e| format!("key `{key}`: {e}"))
}

fn header(msg: &KeyedMessage) -> Result<Header, String> {
    let date: i64 = get(msg, "validityDate")?;
    let hhmm: i64 = get(msg, "validityTime")?;
    let day = chrono::NaiveDate::from_ymd_opt(
        (date / 10000) as i32,
        (date / 100 % 100) as u32,
        (date % 100) as u32,
    )
    .ok_or_else(|| format!("validityDate {date} is no date"))?;
    let time = day
        .and_hms_opt((hhmm / 100) as u32, (hhmm % 100) as u32, 0)
        .ok_or_else(|| format!("validityTime {hhmm} is no time of day"))?
        .and_utc()
        .timestamp();
    let level_type: String = get(msg, "typeOfLevel")?;
    let level = match level_type.as_str() {
        "isobaricInhPa" => Some(get::<i64>(msg, "level")? as f64),
        "isobaricInPa" => Some(to_hpa(get::<i64>(msg, "level")? as f64, "Pa")),
        "hybrid" | "isobaricLayer" | "theta" | "potentialVorticity" => {
            return Err(format!(
                "level type `{level_type}`: only pressure levels and single levels are supported"
            ));
        }
        _ => None,
    };
    // cfgrib's and the CDS NetCDF's names (`t2m`, `u10`, `t`, `z`), not ecCodes' `shortName`
    // (`2t`, `10u`), so that a store is named alike from GRIB and from NetCDF.
    let cf_name: Result<String, _> = msg.read_key("cfVarName");
    let variable = match cf_name {
        Ok(name) if !name.is_empty() && name != "unknown" => name,
        _ => get(msg, "shortName")?,
    };
    Ok(Header {
        variable,
        member: msg.read_key("number").ok(),
        time,
        level,
    })
}

fn grid(msg: &KeyedMessage) -> Result<Grid, String> {
    let grid_type: String = get(msg, "gridType")?;
    if grid_type != "regular_ll" {
        let what = match grid_type.as_str() {
            "reduced_gg" => "a reduced Gaussian grid",
            "regular_gg" => "a regular Gaussian grid",
            "reduced_ll" => "a reduced latitude/longitude grid",
            "sh" => "spherical harmonics",
            _ => "not a regular latitude/longitude grid",
        };
        return Err(format!(
            "gridType `{grid_type}` is {what}: only regular latitude/longitude grids are \
             supported (ask the CDS for a `grid` such as 0.25/0.25, or regrid first)"
        ));
    }
    let ni: i64 = get(msg, "Ni")?;
    let nj: i64 = get(msg, "Nj")?;
    let flags: [i64; 3] = [
        get(msg, "iScansNegatively")?,
        get(msg, "jScansPositively")?,
        get(msg, "jPointsAreConsecutive")?,
    ];
    if flags[0] != 0 || flags[2] != 0 {
        return Err(format!(
            "scanning mode iScansNegatively={} jPointsAreConsecutive={}: only rows west→east \
             are supported",
            flags[0], flags[2]
        ));
    }
    let lat0: f64 = get(msg, "latitudeOfFirstGridPointInDegrees")?;
    let lon0: f64 = get(msg, "longitudeOfFirstGridPointInDegrees")?;
    let di: f64 = get(msg, "iDirectionIncrementInDegrees")?;
    let dj: f64 = get(msg, "jDirectionIncrementInDegrees")?;
    let dj = if flags[1] == 1 { dj } else { -dj };
    Ok(Grid {
        lats: (0..nj).map(|j| round_coord(lat0 + j as f64 * dj)).collect(),
        lons: (0..ni).map(|i| round_coord(lon0 + i as f64 * di)).collect(),
    })
}

/// Runs `each` on every message of `path` with its 1-based number; a message ecCodes cannot
/// parse stops the pass with an error naming it.
fn for_each_message(
    path: &Path,
    mut each: impl FnMut(usize, &KeyedMessage) -> Result<(), ConvertError>,
) -> Result<usize, ConvertError> {
    let mut handle =
        CodesHandle::new_from_file(path, ProductKind::GRIB).map_err(|e| ConvertError::Open {
            file: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    let mut number = 0;
    loop {
        let next = handle.next().map_err(|e| ConvertError::Grib {
            file: path.to_path_buf(),
            message: number + 1,
            detail: format!("ecCodes cannot read it ({e}): the file is truncated or corrupt"),
        })?;
        let Some(msg) = next else {
            return Ok(number);
        };
        number += 1;
        each(number, msg)?;
    }
}

pub(super) fn describe(path: &Path, member: Option<i64>) -> Result<InputFile, ConvertError> {
    let bad = |message: usize, detail: String| ConvertError::Grib {
        file: path.to_path_buf(),
        message,
        detail,
    };
    let mut first_grid: Option<Grid> = None;
    let mut headers = Vec::new();
    let mut infos: BTreeMap<String, VarInfo> = BTreeMap::new();
    let count = for_each_message(path, |n, msg| {
        let h = header(msg).map_err(|e| bad(n, e))?;
        let g = grid(msg).map_err(|e| bad(n, e))?;
        match &first_grid {
            None => first_grid = Some(g),
            Some(first) if *first != g => {
                return Err(bad(
                    n,
                    format!(
                        "its grid ({} × {}) differs from the first message's ({} × {}); one \
                         grid per file",
                        g.lats.len(),
                        g.lons.len(),
                        first.lats.len(),
                        first.lons.len()
                    ),
                ));
            }
            Some(_) => {}
        }
        if !infos.contains_key(&h.variable) {
            let info = VarInfo {
                units: get(msg, "units").unwrap_or_default(),
                long_name: get(msg, "name").unwrap_or_default(),
                has_level: h.level.is_some(),
            };
            infos.insert(h.variable.clone(), info);
        }
        if infos[&h.variable].has_level != h.level.is_some() {
            return Err(bad(
                n,
                format!(
                    "`{}` is on pressure levels in some messages only",
                    h.variable
                ),
            ));
        }
        headers.push((n, h));
        Ok(())
    })?;
    let grid = first_grid.ok_or_else(|| ConvertError::Unsupported {
        file: path.to_path_buf(),
        detail: format!("no GRIB message in it ({count} read)"),
    })?;
    let members: BTreeSet<i64> = headers.iter().filter_map(|(_, h)| h.member).collect();
    let chosen = match member {
        Some(m) if !members.contains(&m) => {
            return Err(ConvertError::Ensemble {
                file: path.to_path_buf(),
                detail: format!("it has no member {m} (members: {})", list(&members)),
            });
        }
        Some(m) => Some(m),
        None if members.len() > 1 => {
            return Err(ConvertError::Ensemble {
                file: path.to_path_buf(),
                detail: format!(
                    "it holds {} ensemble members ({}); pick one with --member N",
                    members.len(),
                    list(&members)
                ),
            });
        }
        None => None,
    };
    headers.retain(|(_, h)| chosen.is_none() || h.member == chosen);
    let mut seen: BTreeMap<(String, i64, Option<u64>), usize> = BTreeMap::new();
    let mut levels_of: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    let mut times = BTreeSet::new();
    for (n, h) in &headers {
        let key = (h.variable.clone(), h.time, h.level.map(f64::to_bits));
        if let Some(first) = seen.insert(key, *n) {
            return Err(bad(
                *n,
                format!(
                    "`{}` at {}{} again (first in message {first})",
                    h.variable,
                    iso(h.time),
                    h.level.map(|l| format!(", {l} hPa")).unwrap_or_default()
                ),
            ));
        }
        times.insert(h.time);
        if let Some(l) = h.level {
            levels_of
                .entry(&h.variable)
                .or_default()
                .insert(l.to_bits());
        }
    }
    let mut level_sets = levels_of.iter();
    let levels: BTreeSet<u64> = level_sets
        .next()
        .map(|(_, s)| s.clone())
        .unwrap_or_default();
    for (name, set) in level_sets {
        if *set != levels {
            return Err(ConvertError::Unsupported {
                file: path.to_path_buf(),
                detail: format!(
                    "`{name}` is on levels {:?} and others on {:?}; one set of pressure levels \
                     per file",
                    hpa(set),
                    hpa(&levels)
                ),
            });
        }
    }
    let mut levels = hpa(&levels);
    levels.reverse();
    for (name, info) in &infos {
        let want = times.len() * if info.has_level { levels.len() } else { 1 };
        let have = seen.keys().filter(|(v, _, _)| v == name).count();
        if have != want {
            return Err(ConvertError::Unsupported {
                file: path.to_path_buf(),
                detail: format!(
                    "`{name}` has {have} fields where {} times × {} levels make {want}",
                    times.len(),
                    levels.len().max(1)
                ),
            });
        }
    }
    Ok(InputFile {
        path: path.to_path_buf(),
        format: Format::Grib,
        lats: grid.lats,
        lons: grid.lons,
        levels,
        times: times.into_iter().collect(),
        variables: infos,
        member: chosen,
        bytes: 0,
    })
}

fn hpa(bits: &BTreeSet<u64>) -> Vec<f64> {
    bits.iter().map(|b| f64::from_bits(*b)).collect()
}

fn list(members: &BTreeSet<i64>) -> String {
    members
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn read(
    file: &InputFile,
    sink: &mut dyn FnMut(Field) -> Result<(), ConvertError>,
) -> Result<(), ConvertError> {
    let npoints = file.lats.len() * file.lons.len();
    for_each_message(&file.path, |n, msg| {
        let bad = |detail: String| ConvertError::Grib {
            file: file.path.clone(),
            message: n,
            detail,
        };
        let h = header(msg).map_err(bad)?;
        if !file.variables.contains_key(&h.variable)
            || (file.member.is_some() && h.member != file.member)
        {
            return Ok(());
        }
        let values: Vec<f64> = get(msg, "values").map_err(bad)?;
        if values.len() != npoints {
            return Err(bad(format!(
                "{} values for a grid of {npoints} points",
                values.len()
            )));
        }
        // ecCodes puts `missingValue` where the bitmap says missing; cfgrib reads NaN there.
        let bitmap: i64 = msg.read_key("bitmapPresent").unwrap_or(0);
        let missing: f64 = msg.read_key("missingValue").unwrap_or(f64::NAN);
        let values = values
            .into_iter()
            .map(|v| {
                if bitmap != 0 && v == missing {
                    f32::NAN
                } else {
                    v as f32
                }
            })
            .collect();
        sink(Field {
            variable: h.variable,
            time: h.time,
            level: h.level,
            values,
        })
    })
    .map(drop)
}
