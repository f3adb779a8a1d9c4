//! NetCDF3 classic and NetCDF4/HDF5 through libnetcdf (the `netcdf` crate): the CDS layouts
//! since 2024 (`valid_time`, `pressure_level`, float32 with zlib/shuffle, sometimes packed) and
//! before (`time`, `level`, int16 with `scale_factor`/`add_offset`). Values are unpacked as
//! xarray does: the stored value compared with `_FillValue`/`missing_value` (→ NaN), then
//! `value * scale_factor + add_offset` in f64, then cast to f32.

use std::collections::BTreeMap;
use std::path::Path;

use netcdf::{AttributeValue, Variable};

use super::ConvertError;
use super::input::{Field, Format, InputFile, VarInfo};
use crate::store::cf_time::CfTimeUnits;

const TIME: &[&str] = &["valid_time", "time"];
const LEVEL: &[&str] = &["pressure_level", "level", "isobaricInhPa", "plev"];
const LAT: &[&str] = &["latitude", "lat"];
const LON: &[&str] = &["longitude", "lon"];
const MEMBER: &[&str] = &["number", "member", "realization"];

fn open(path: &Path) -> Result<netcdf::File, ConvertError> {
    netcdf::open(path).map_err(|e| ConvertError::Open {
        file: path.to_path_buf(),
        detail: format!("libnetcdf: {e}"),
    })
}

fn bad(path: &Path, detail: impl Into<String>) -> ConvertError {
    ConvertError::Unsupported {
        file: path.to_path_buf(),
        detail: detail.into(),
    }
}

fn number(value: AttributeValue) -> Option<f64> {
    Some(match value {
        AttributeValue::Double(x) => x,
        AttributeValue::Float(x) => f64::from(x),
        AttributeValue::Short(x) => f64::from(x),
        AttributeValue::Int(x) => f64::from(x),
        AttributeValue::Schar(x) => f64::from(x),
        AttributeValue::Uchar(x) => f64::from(x),
        AttributeValue::Ushort(x) => f64::from(x),
        AttributeValue::Longlong(x) => x as f64,
        AttributeValue::Doubles(x) => *x.first()?,
        AttributeValue::Floats(x) => f64::from(*x.first()?),
        AttributeValue::Shorts(x) => f64::from(*x.first()?),
        AttributeValue::Ints(x) => f64::from(*x.first()?),
        _ => return None,
    })
}

fn num_attr(var: &Variable, name: &str) -> Option<f64> {
    var.attribute_value(name)?.ok().and_then(number)
}

fn str_attr(var: &Variable, name: &str) -> Option<String> {
    match var.attribute_value(name)?.ok()? {
        AttributeValue::Str(s) => Some(s),
        _ => None,
    }
}

fn coord(file: &netcdf::File, path: &Path, name: &str) -> Result<Vec<f64>, ConvertError> {
    let var = file.variable(name).ok_or_else(|| {
        bad(
            path,
            format!("dimension `{name}` has no coordinate variable"),
        )
    })?;
    var.get_values::<f64, _>(..)
        .map_err(|e| bad(path, format!("coordinate `{name}`: {e}")))
}

/// The role of each dimension of a data variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Time,
    Level,
    Lat,
    Lon,
    Member,
}

fn role(dim: &str) -> Option<Role> {
    [
        (TIME, Role::Time),
        (LEVEL, Role::Level),
        (LAT, Role::Lat),
        (LON, Role::Lon),
        (MEMBER, Role::Member),
    ]
    .into_iter()
    .find(|(names, _)| names.contains(&dim))
    .map(|(_, r)| r)
}

fn roles(var: &Variable) -> Option<Vec<(Role, String, usize)>> {
    var.dimensions()
        .iter()
        .map(|d| role(&d.name()).map(|r| (r, d.name(), d.len())))
        .collect()
}

pub(super) fn describe(path: &Path, member: Option<i64>) -> Result<InputFile, ConvertError> {
    let file = open(path)?;
    let mut variables = BTreeMap::new();
    let (mut time_dim, mut level_dim, mut lat_dim, mut lon_dim, mut member_dim) =
        (None, None, None, None, None);
    for var in file.variables() {
        let name = var.name();
        let Some(roles) = roles(&var) else { continue };
        let has = |r: Role| roles.iter().any(|(x, _, _)| *x == r);
        if name == roles.first().map(|x| x.1.as_str()).unwrap_or_default()
            || !(has(Role::Time) && has(Role::Lat) && has(Role::Lon))
        {
            continue;
        }
        for (r, dim, _) in &roles {
            let slot = match r {
                Role::Time => &mut time_dim,
                Role::Level => &mut level_dim,
                Role::Lat => &mut lat_dim,
                Role::Lon => &mut lon_dim,
                Role::Member => &mut member_dim,
            };
            match slot {
                Some(d) if d != dim => {
                    return Err(bad(
                        path,
                        format!("`{name}` uses dimension `{dim}` where others use `{d}`"),
                    ));
                }
                _ => *slot = Some(dim.clone()),
            }
        }
        variables.insert(
            name.clone(),
            VarInfo {
                units: str_attr(&var, "units").unwrap_or_default(),
                long_name: str_attr(&var, "long_name").unwrap_or_default(),
                has_level: has(Role::Level),
            },
        );
    }
    let (Some(time_dim), Some(lat_dim), Some(lon_dim)) = (time_dim, lat_dim, lon_dim) else {
        return Err(bad(
            path,
            "no variable on (time or valid_time) × latitude × longitude",
        ));
    };
    let time_var = file
        .variable(&time_dim)
        .ok_or_else(|| bad(path, format!("`{time_dim}` has no coordinate variable")))?;
    let units = str_attr(&time_var, "units")
        .ok_or_else(|| bad(path, format!("`{time_dim}` has no `units`")))?;
    let calendar = str_attr(&time_var, "calendar");
    let cf = CfTimeUnits::parse(&units, calendar.as_deref())
        .map_err(|e| bad(path, format!("`{time_dim}`: {e}")))?;
    let times = coord(&file, path, &time_dim)?
        .into_iter()
        .map(|v| cf.decode(v))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(path, format!("`{time_dim}`: {e}")))?;
    if times.windows(2).any(|w| w[1] <= w[0]) {
        return Err(bad(
            path,
            format!("`{time_dim}` is not strictly increasing"),
        ));
    }
    let levels = match &level_dim {
        Some(dim) => {
            let var = file.variable(dim);
            let units = var
                .as_ref()
                .and_then(|v| str_attr(v, "units"))
                .unwrap_or_default();
            coord(&file, path, dim)?
                .into_iter()
                .map(|l| super::input::to_hpa(l, &units))
                .collect()
        }
        None => Vec::new(),
    };
    let chosen = match (&member_dim, member) {
        (Some(dim), m) => {
            let members: Vec<i64> = coord(&file, path, dim)?
                .into_iter()
                .map(|x| x as i64)
                .collect();
            let list = members
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            match m {
                Some(m) if members.contains(&m) => Some(m),
                Some(m) => {
                    return Err(ConvertError::Ensemble {
                        file: path.to_path_buf(),
                        detail: format!("it has no member {m} (`{dim}`: {list})"),
                    });
                }
                None if members.len() == 1 => Some(members[0]),
                None => {
                    return Err(ConvertError::Ensemble {
                        file: path.to_path_buf(),
                        detail: format!(
                            "it holds {} ensemble members (`{dim}`: {list}); pick one with \
                             --member N",
                            members.len()
                        ),
                    });
                }
            }
        }
        (None, _) => None,
    };
    Ok(InputFile {
        path: path.to_path_buf(),
        format: Format::NetCdf,
        lats: coord(&file, path, &lat_dim)?,
        lons: coord(&file, path, &lon_dim)?,
        levels,
        times,
        variables,
        member: chosen,
        bytes: 0,
    })
}

pub(super) fn read(
    input: &InputFile,
    sink: &mut dyn FnMut(Field) -> Result<(), ConvertError>,
) -> Result<(), ConvertError> {
    let path = input.path.as_path();
    let file = open(path)?;
    for name in input.variables.keys() {
        let var = file
            .variable(name)
            .ok_or_else(|| bad(path, format!("`{name}` vanished")))?;
        let roles = roles(&var).ok_or_else(|| bad(path, format!("`{name}`: unknown dims")))?;
        let member_index = match (roles.iter().find(|r| r.0 == Role::Member), input.member) {
            (Some((_, dim, _)), Some(m)) => coord(&file, path, dim)?
                .iter()
                .position(|x| *x as i64 == m)
                .ok_or_else(|| bad(path, format!("no member {m}")))?,
            _ => 0,
        };
        let scale = num_attr(&var, "scale_factor").unwrap_or(1.0);
        let offset = num_attr(&var, "add_offset").unwrap_or(0.0);
        let missing: Vec<f64> = ["_FillValue", "missing_value"]
            .iter()
            .filter_map(|a| num_attr(&var, a))
            .collect();
        // Time steps are read in blocks of the file's time chunks: HDF5 decompresses a chunk
        // per read, so reading a chunk of four steps one step at a time decompresses it four
        // times over (a 0.25° NetCDF4 file converted 4× slower so).
        let time_axis = roles.iter().position(|r| r.0 == Role::Time).unwrap_or(0);
        let step_values = input.step_len(&input.variables[name]);
        let chunk_t = var
            .chunking()
            .ok()
            .flatten()
            .map_or(1, |c| c[time_axis].max(1));
        let block = chunk_t.min((256 << 20) / (8 * step_values).max(1)).max(1);
        let count_of = |n_t: usize| -> Vec<usize> {
            roles
                .iter()
                .map(|(r, _, n)| match r {
                    Role::Time => n_t,
                    Role::Member => 1,
                    _ => *n,
                })
                .collect()
        };
        // Strides of the slab in the variable's own dimension order, for reordering each time
        // step into (level, lat, lon).
        let count = count_of(block);
        let mut strides = vec![0usize; roles.len()];
        let mut s = 1;
        for i in (0..roles.len()).rev() {
            strides[i] = s;
            s *= count[i];
        }
        let stride_of = |role: Role| {
            roles
                .iter()
                .position(|r| r.0 == role)
                .map_or(0, |i| strides[i])
        };
        let (st, sl, sy, sx) = (
            stride_of(Role::Time),
            stride_of(Role::Level),
            stride_of(Role::Lat),
            stride_of(Role::Lon),
        );
        let nlev = if roles.iter().any(|r| r.0 == Role::Level) {
            input.levels.len()
        } else {
            1
        };
        let (ny, nx) = (input.lats.len(), input.lons.len());
        for t0 in (0..input.times.len()).step_by(block) {
            let n_t = block.min(input.times.len() - t0);
            let start: Vec<usize> = roles
                .iter()
                .map(|(r, _, _)| match r {
                    Role::Time => t0,
                    Role::Member => member_index,
                    _ => 0,
                })
                .collect();
            let count = count_of(n_t);
            let got: Vec<f64> = var
                .get_values::<f64, _>((start.as_slice(), count.as_slice()))
                .map_err(|e| bad(path, format!("reading `{name}` at time index {t0}: {e}")))?;
            // A short last block goes into a buffer of the full block's shape, where the
            // strides above hold whatever the dimension order.
            let raw = if n_t == block {
                got
            } else {
                let mut raw = vec![f64::NAN; s];
                scatter(&got, &count, &count_of(block), &mut raw);
                raw
            };
            let unpack = |v: f64| {
                if v.is_nan() || missing.contains(&v) {
                    f32::NAN
                } else {
                    (v * scale + offset) as f32
                }
            };
            for dt in 0..n_t {
                let mut values = Vec::with_capacity(nlev * ny * nx);
                for l in 0..nlev {
                    for y in 0..ny {
                        let row = dt * st + l * sl + y * sy;
                        if sx == 1 {
                            values.extend(raw[row..row + nx].iter().map(|&v| unpack(v)));
                        } else {
                            values.extend((0..nx).map(|x| unpack(raw[row + x * sx])));
                        }
                    }
                }
                sink(Field {
                    variable: name.clone(),
                    time: input.times[t0 + dt],
                    level: None,
                    values,
                })?;
            }
        }
    }
    Ok(())
}

/// Copies a row-major array of shape `small` into the same corner of one of shape `big`.
fn scatter(src: &[f64], small: &[usize], big: &[usize], dst: &mut [f64]) {
    let nd = small.len();
    let mut index = vec![0usize; nd];
    for &v in src {
        let mut offset = 0;
        for d in 0..nd {
            offset = offset * big[d] + index[d];
        }
        dst[offset] = v;
        for d in (0..nd).rev() {
            index[d] += 1;
            if index[d] < small[d] {
                break;
            }
            index[d] = 0;
        }
    }
}
