//! ERA5's parameter names: the one table of short names (the CDS's `t`, `z`, `vo` …), long
//! names (ARCO-ERA5's and WeatherBench2's `temperature`, `geopotential`, `vorticity` …), ECMWF
//! paramIds and units, and the resolution of a requested name against the variables a store has.
//!
//! A request, a training configuration or the tracker may name a variable by any of its names;
//! [`resolve`] finds the one the store uses. An exact match always wins, so a store that has
//! both `t` and `temperature` serves each under its own name.

/// One ERA5 parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Era5Param {
    /// ECMWF short name, as CDS GRIB and NetCDF files have it (`t`, `2t`).
    pub short: &'static str,
    /// The CDS request name, which ARCO-ERA5 and WeatherBench2 use as variable names.
    pub long: &'static str,
    /// ECMWF parameter id (GRIB `paramId`).
    pub param_id: u32,
    /// Units as ECMWF writes them.
    pub units: &'static str,
    /// Other names the parameter goes by: the NetCDF names of CDS downloads, which cannot
    /// start with a digit (`t2m` for `2t`).
    pub also: &'static [&'static str],
}

impl Era5Param {
    /// Every name of the parameter: short, long, then the others.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        [self.short, self.long]
            .into_iter()
            .chain(self.also.iter().copied())
    }
}

const fn p(
    short: &'static str,
    long: &'static str,
    param_id: u32,
    units: &'static str,
    also: &'static [&'static str],
) -> Era5Param {
    Era5Param {
        short,
        long,
        param_id,
        units,
        also,
    }
}

/// The pressure-level and common single-level parameters of ERA5.
pub const PARAMS: &[Era5Param] = &[
    // Pressure levels.
    p("z", "geopotential", 129, "m**2 s**-2", &[]),
    p("t", "temperature", 130, "K", &[]),
    p("u", "u_component_of_wind", 131, "m s**-1", &[]),
    p("v", "v_component_of_wind", 132, "m s**-1", &[]),
    p("q", "specific_humidity", 133, "kg kg**-1", &[]),
    p("w", "vertical_velocity", 135, "Pa s**-1", &[]),
    p("vo", "vorticity", 138, "s**-1", &[]),
    p("d", "divergence", 155, "s**-1", &[]),
    p("r", "relative_humidity", 157, "%", &[]),
    p("pv", "potential_vorticity", 60, "K m**2 kg**-1 s**-1", &[]),
    p("o3", "ozone_mass_mixing_ratio", 203, "kg kg**-1", &[]),
    p("cc", "fraction_of_cloud_cover", 248, "(0 - 1)", &[]),
    p(
        "clwc",
        "specific_cloud_liquid_water_content",
        246,
        "kg kg**-1",
        &[],
    ),
    p(
        "ciwc",
        "specific_cloud_ice_water_content",
        247,
        "kg kg**-1",
        &[],
    ),
    // Single levels.
    p("2t", "2m_temperature", 167, "K", &["t2m"]),
    p("2d", "2m_dewpoint_temperature", 168, "K", &["d2m"]),
    p("10u", "10m_u_component_of_wind", 165, "m s**-1", &["u10"]),
    p("10v", "10m_v_component_of_wind", 166, "m s**-1", &["v10"]),
    p(
        "100u",
        "100m_u_component_of_wind",
        228246,
        "m s**-1",
        &["u100"],
    ),
    p(
        "100v",
        "100m_v_component_of_wind",
        228247,
        "m s**-1",
        &["v100"],
    ),
    p("msl", "mean_sea_level_pressure", 151, "Pa", &[]),
    p("sp", "surface_pressure", 134, "Pa", &[]),
    p("tp", "total_precipitation", 228, "m", &[]),
    p("skt", "skin_temperature", 235, "K", &[]),
    p("sst", "sea_surface_temperature", 34, "K", &[]),
    p("ci", "sea_ice_cover", 31, "(0 - 1)", &["siconc"]),
    p("tcc", "total_cloud_cover", 164, "(0 - 1)", &[]),
    p("tcwv", "total_column_water_vapour", 137, "kg m**-2", &[]),
    p("lsm", "land_sea_mask", 172, "(0 - 1)", &[]),
    p("blh", "boundary_layer_height", 159, "m", &[]),
];

/// The parameter `name` is one of the names of, if any.
pub fn param(name: &str) -> Option<&'static Era5Param> {
    PARAMS.iter().find(|p| p.names().any(|n| n == name))
}

/// The parameter with ECMWF paramId `id`, if the table has it.
pub fn by_param_id(id: u32) -> Option<&'static Era5Param> {
    PARAMS.iter().find(|p| p.param_id == id)
}

/// Why a requested name does not pick one variable of a store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Neither the name nor any of its aliases is a variable of the store.
    #[error("no variable `{name}`{aliases} (it has {available})", aliases = aka(.name), available = .available.join(", "))]
    Absent {
        name: String,
        available: Vec<String>,
    },
    /// Several variables of the store are aliases of the name, and none is the name itself.
    #[error("`{name}` is ambiguous: the store has {} under ERA5 names of the same parameter; name one", .candidates.join(" and "))]
    Ambiguous {
        name: String,
        candidates: Vec<String>,
    },
}

fn aka(name: &str) -> String {
    match param(name) {
        Some(p) => {
            let others: Vec<String> = p
                .names()
                .filter(|n| *n != name)
                .map(|n| format!("`{n}`"))
                .collect();
            format!(" nor its ERA5 aliases {}", others.join(", "))
        }
        None => String::new(),
    }
}

/// The variable among `available` that `requested` names: itself if the store has it, else the
/// one variable that is another ERA5 name of the same parameter.
pub fn resolve<'a, I>(requested: &str, available: I) -> Result<&'a str, NameError>
where
    I: IntoIterator<Item = &'a str>,
    I::IntoIter: Clone,
{
    let available = available.into_iter();
    if let Some(exact) = available.clone().find(|v| *v == requested) {
        return Ok(exact);
    }
    let candidates: Vec<&'a str> = match param(requested) {
        Some(p) => available
            .clone()
            .filter(|v| p.names().any(|n| n == *v))
            .collect(),
        None => Vec::new(),
    };
    match candidates.as_slice() {
        [one] => Ok(one),
        [] => Err(NameError::Absent {
            name: requested.to_string(),
            available: available.map(str::to_string).collect(),
        }),
        _ => Err(NameError::Ambiguous {
            name: requested.to_string(),
            candidates: candidates.iter().map(|c| format!("`{c}`")).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_and_param_id_is_unique() {
        let mut names = std::collections::HashSet::new();
        let mut ids = std::collections::HashSet::new();
        for p in PARAMS {
            assert!(ids.insert(p.param_id), "paramId {} twice", p.param_id);
            for n in p.names() {
                assert!(names.insert(n), "name `{n}` twice");
            }
        }
    }

    #[test]
    fn the_names_of_the_issue_are_in_the_table() {
        for (short, long, id, units) in [
            ("t", "temperature", 130, "K"),
            ("z", "geopotential", 129, "m**2 s**-2"),
            ("vo", "vorticity", 138, "s**-1"),
            ("d", "divergence", 155, "s**-1"),
            ("u", "u_component_of_wind", 131, "m s**-1"),
            ("q", "specific_humidity", 133, "kg kg**-1"),
            ("w", "vertical_velocity", 135, "Pa s**-1"),
            ("2t", "2m_temperature", 167, "K"),
            ("msl", "mean_sea_level_pressure", 151, "Pa"),
            ("tp", "total_precipitation", 228, "m"),
        ] {
            let p = param(short).unwrap();
            assert_eq!((p.long, p.param_id, p.units), (long, id, units));
            assert_eq!(param(long), Some(p));
            assert_eq!(by_param_id(id), Some(p));
        }
        assert_eq!(param("t2m").unwrap().short, "2t");
        assert!(param("no_such_thing").is_none());
    }

    #[test]
    fn either_name_resolves_to_the_one_the_store_has() {
        let long = ["geopotential", "temperature", "vorticity"];
        assert_eq!(resolve("t", long).unwrap(), "temperature");
        assert_eq!(resolve("vo", long).unwrap(), "vorticity");
        assert_eq!(resolve("temperature", long).unwrap(), "temperature");
        let short = ["t", "z", "t2m"];
        assert_eq!(resolve("temperature", short).unwrap(), "t");
        assert_eq!(resolve("2t", short).unwrap(), "t2m");
        assert_eq!(resolve("2m_temperature", short).unwrap(), "t2m");
    }

    #[test]
    fn an_exact_name_wins_over_its_aliases() {
        let both = ["t", "temperature"];
        assert_eq!(resolve("t", both).unwrap(), "t");
        assert_eq!(resolve("temperature", both).unwrap(), "temperature");
    }

    #[test]
    fn absent_and_ambiguous_names_are_errors_naming_the_field() {
        let err = resolve("vo", ["t", "z"]).unwrap_err().to_string();
        assert!(err.contains("`vo`"), "{err}");
        assert!(err.contains("`vorticity`"), "{err}");
        assert!(err.contains("t, z"), "{err}");
        let err = resolve("wind", ["t"]).unwrap_err().to_string();
        assert_eq!(err, "no variable `wind` (it has t)");
        let err = resolve("2m_temperature", ["2t", "t2m"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("ambiguous"), "{err}");
        assert!(err.contains("`2t` and `t2m`"), "{err}");
    }
}
