//! Global fields on a regular latitude/longitude grid, and the fields of one time step.
//!
//! The canonical grid is the loader's: rows run north → south (`lat_step` < 0 on ERA5), columns
//! run east from `lon_first` and wrap: column `nlon` is column 0 again. The tracker relies on the
//! wrap (cyclones cross 0° and 180°), so a [`Grid`] must span the whole circle of longitude.

use serde::{Deserialize, Serialize};

use atmorep_proto::calendar::{TimeFormat, format_time};
use atmorep_proto::pb;
use atmorep_proto::stitch::StitchedStep;

use crate::error::{Result, TrackError};
use crate::geo::wrap_360;

/// A regular global latitude/longitude grid (the loader's `DatasetInfo.grid`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Grid {
    pub nlat: usize,
    pub nlon: usize,
    /// Latitude of row 0 (degrees north).
    pub lat_first: f64,
    /// Degrees from one row to the next (negative: southwards, as ERA5).
    pub lat_step: f64,
    /// Longitude of column 0 (degrees east).
    pub lon_first: f64,
    /// Degrees from one column to the next (positive).
    pub lon_step: f64,
}

impl Grid {
    /// The ERA5-style global grid of `spacing` degrees: 90° … −90° (poles included) × 0° …
    /// 360° − `spacing`.
    pub fn global(spacing: f64) -> Self {
        Self {
            nlat: (180.0 / spacing).round() as usize + 1,
            nlon: (360.0 / spacing).round() as usize,
            lat_first: 90.0,
            lat_step: -spacing,
            lon_first: 0.0,
            lon_step: spacing,
        }
    }

    /// The grid the loader announces in `DatasetInfo`.
    pub fn from_proto(g: &pb::Grid) -> Result<Self> {
        let grid = Self {
            nlat: g.nlat as usize,
            nlon: g.nlon as usize,
            lat_first: g.lat_first,
            lat_step: g.lat_step,
            lon_first: g.lon_first,
            lon_step: g.lon_step,
        };
        grid.validate()?;
        Ok(grid)
    }

    /// Checks that the grid has rows and columns, finite steps, stays within ±90°, and that its
    /// columns close the circle of longitude.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(TrackError::Grid(what));
        if self.nlat < 3 || self.nlon < 3 {
            return bad(format!(
                "{} × {} points: need at least 3 × 3",
                self.nlat, self.nlon
            ));
        }
        let lat_ok = self.lat_step.is_finite() && self.lat_step != 0.0;
        let lon_ok = self.lon_step.is_finite() && self.lon_step > 0.0;
        if !(lat_ok && lon_ok) {
            return bad(format!(
                "steps {}° (lat) and {}° (lon): need a non-zero latitude step and a positive \
                 longitude step",
                self.lat_step, self.lon_step
            ));
        }
        let last = self.lat(self.nlat - 1);
        if self.lat_first.abs() > 90.0 + 1e-6 || last.abs() > 90.0 + 1e-6 {
            return bad(format!("latitudes {} … {last} leave ±90°", self.lat_first));
        }
        if (self.lon_step * self.nlon as f64 - 360.0).abs() > 1e-6 * 360.0 {
            return bad(format!(
                "{} columns of {}° do not span 360° (the tracker needs a global, periodic grid)",
                self.nlon, self.lon_step
            ));
        }
        Ok(())
    }

    /// Grid points.
    pub fn len(&self) -> usize {
        self.nlat * self.nlon
    }

    /// No grid points.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Latitude of row `j`.
    pub fn lat(&self, j: usize) -> f64 {
        self.lat_first + j as f64 * self.lat_step
    }

    /// Longitude of column `i`, in [0, 360).
    pub fn lon(&self, i: usize) -> f64 {
        wrap_360(self.lon_first + i as f64 * self.lon_step)
    }

    /// Grid spacing in degrees (the larger of the two steps).
    pub fn spacing(&self) -> f64 {
        self.lat_step.abs().max(self.lon_step)
    }

    /// Row-major index of (`j`, `i`).
    pub fn index(&self, j: usize, i: usize) -> usize {
        j * self.nlon + i
    }

    /// Column `i` taken modulo the circle (negative and past-the-end columns wrap).
    pub fn wrap_col(&self, i: isize) -> usize {
        i.rem_euclid(self.nlon as isize) as usize
    }

    /// Fractional row of latitude `lat` (may lie outside `0 .. nlat`).
    pub fn row_of(&self, lat: f64) -> f64 {
        (lat - self.lat_first) / self.lat_step
    }

    /// Fractional column of longitude `lon`, in [0, nlon).
    pub fn col_of(&self, lon: f64) -> f64 {
        wrap_360(lon - self.lon_first) / self.lon_step
    }
}

/// One global 2-D field: `grid.nlat × grid.nlon` values, row-major (row = latitude).
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    grid: Grid,
    values: Vec<f32>,
}

impl Field {
    /// A field from its values; their number must be the grid's.
    pub fn new(grid: Grid, values: Vec<f32>) -> Result<Self> {
        grid.validate()?;
        if values.len() != grid.len() {
            return Err(TrackError::Grid(format!(
                "{} values for a {} × {} grid",
                values.len(),
                grid.nlat,
                grid.nlon
            )));
        }
        Ok(Self { grid, values })
    }

    /// A field with `f(lat, lon)` at every grid point (longitude in [0, 360)).
    pub fn from_fn(grid: Grid, f: impl Fn(f64, f64) -> f64) -> Result<Self> {
        let mut values = Vec::with_capacity(grid.len());
        for j in 0..grid.nlat {
            let lat = grid.lat(j);
            values.extend((0..grid.nlon).map(|i| f(lat, grid.lon(i)) as f32));
        }
        Self::new(grid, values)
    }

    pub fn grid(&self) -> &Grid {
        &self.grid
    }

    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Value at row `j`, column `i`.
    pub fn get(&self, j: usize, i: usize) -> f32 {
        self.values[self.grid.index(j, i)]
    }

    /// Bilinear interpolation at (`lat`, `lon`): periodic in longitude, clamped at the first and
    /// last rows.
    pub fn interpolate(&self, lat: f64, lon: f64) -> f64 {
        let g = &self.grid;
        let y = g.row_of(lat).clamp(0.0, (g.nlat - 1) as f64);
        let x = g.col_of(lon);
        let (j0, i0) = (y.floor() as usize, x.floor() as usize % g.nlon);
        let j1 = (j0 + 1).min(g.nlat - 1);
        let i1 = (i0 + 1) % g.nlon;
        let (fy, fx) = (y - y.floor(), x - x.floor());
        let v = |j, i| f64::from(self.get(j, i));
        (1.0 - fy) * ((1.0 - fx) * v(j0, i0) + fx * v(j0, i1))
            + fy * ((1.0 - fx) * v(j1, i0) + fx * v(j1, i1))
    }
}

/// Which field: a variable at a level (`None` for a surface variable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldKey {
    pub variable: String,
    /// Level as the store names it (hPa for pressure levels).
    pub level: Option<f64>,
}

impl FieldKey {
    pub fn new(variable: impl Into<String>, level: Option<f64>) -> Self {
        Self {
            variable: variable.into(),
            level,
        }
    }

    fn matches(&self, variable: &str, level: Option<f64>) -> bool {
        self.variable == variable
            && match (self.level, level) {
                (None, None) => true,
                // Levels travel as f64 and as f32 token info; hPa values are whole numbers.
                (Some(a), Some(b)) => (a - b).abs() < 1e-3,
                _ => false,
            }
    }
}

/// The global fields of one time step, all on one grid.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldSnapshot {
    /// Valid time, unix seconds (UTC).
    pub time_unix: i64,
    fields: Vec<(FieldKey, Field)>,
}

impl FieldSnapshot {
    /// A time step without fields yet.
    pub fn new(time_unix: i64) -> Self {
        Self {
            time_unix,
            fields: Vec::new(),
        }
    }

    /// The fields of a time step stitched from tiles on `grid` (the grid the tiles were cut
    /// from).
    pub fn from_stitched(grid: Grid, step: StitchedStep) -> Result<Self> {
        let mut snapshot = Self::new(step.time_unix);
        for plane in step.planes {
            let field = Field::new(grid, plane.values)?;
            snapshot.insert(&plane.field, plane.level, field)?;
        }
        Ok(snapshot)
    }

    /// Adds (or replaces) `variable` at `level`; its grid must be the other fields' grid.
    pub fn insert(&mut self, variable: &str, level: Option<f64>, field: Field) -> Result<()> {
        if let Some(grid) = self.grid()
            && grid != field.grid()
        {
            return Err(TrackError::Grid(format!(
                "`{variable}` at {level:?} is on {:?}, the time step's other fields on {grid:?}",
                field.grid()
            )));
        }
        match self
            .fields
            .iter_mut()
            .find(|(k, _)| k.matches(variable, level))
        {
            Some((_, f)) => *f = field,
            None => self.fields.push((FieldKey::new(variable, level), field)),
        }
        Ok(())
    }

    /// Builder form of [`Self::insert`].
    pub fn with(mut self, variable: &str, level: Option<f64>, field: Field) -> Result<Self> {
        self.insert(variable, level, field)?;
        Ok(self)
    }

    /// `variable` at `level`, if present.
    pub fn get(&self, variable: &str, level: Option<f64>) -> Option<&Field> {
        self.fields
            .iter()
            .find(|(k, _)| k.matches(variable, level))
            .map(|(_, f)| f)
    }

    /// `variable` at pressure level `level`, or the error naming what is missing.
    pub fn require(&self, variable: &str, level: f64) -> Result<&Field> {
        self.get(variable, Some(level))
            .ok_or_else(|| TrackError::MissingField {
                time: format_time(self.time_unix, TimeFormat::Spaced),
                variable: variable.to_string(),
                level,
            })
    }

    /// The grid of the fields (`None` while there are none).
    pub fn grid(&self) -> Option<&Grid> {
        self.fields.first().map(|(_, f)| f.grid())
    }

    /// Which fields the time step holds, in insertion order.
    pub fn keys(&self) -> impl Iterator<Item = &FieldKey> {
        self.fields.iter().map(|(k, _)| k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_grid_wraps_in_longitude() {
        let g = Grid::global(2.0);
        assert_eq!((g.nlat, g.nlon), (91, 180));
        g.validate().unwrap();
        assert_eq!(g.lat(0), 90.0);
        assert_eq!(g.lat(90), -90.0);
        assert_eq!(g.lon(179), 358.0);
        assert_eq!(g.wrap_col(-1), 179);
        assert_eq!(g.wrap_col(180), 0);
        assert_eq!(g.col_of(-2.0), 179.0);
    }

    #[test]
    fn regional_or_broken_grids_are_rejected() {
        let mut g = Grid::global(1.0);
        g.nlon = 100;
        assert!(matches!(g.validate(), Err(TrackError::Grid(m)) if m.contains("360")));
        let mut g = Grid::global(1.0);
        g.lat_first = 95.0;
        assert!(g.validate().is_err());
        assert!(Field::new(Grid::global(10.0), vec![0.0; 3]).is_err());
    }

    #[test]
    fn interpolation_is_exact_on_linear_fields_and_periodic() {
        let g = Grid::global(2.0);
        let f = Field::from_fn(g, |lat, _| 3.0 * lat + 1.0).unwrap();
        assert!((f.interpolate(13.3, 200.0) - (3.0 * 13.3 + 1.0)).abs() < 1e-4);
        // Across the seam, halfway between 358° and 0°.
        let f = Field::from_fn(g, |_, lon| if lon == 0.0 { 10.0 } else { 0.0 }).unwrap();
        assert!((f.interpolate(0.0, 359.0) - 5.0).abs() < 1e-9);
        assert!((f.interpolate(0.0, -1.0) - 5.0).abs() < 1e-9);
    }

    #[test]
    fn snapshot_finds_fields_by_variable_and_level() {
        let g = Grid::global(10.0);
        let zero = Field::from_fn(g, |_, _| 0.0).unwrap();
        let s = FieldSnapshot::new(0)
            .with("vo", Some(850.0), zero.clone())
            .unwrap()
            .with("z", Some(850.0), zero.clone())
            .unwrap();
        assert!(s.get("vo", Some(850.0)).is_some());
        assert!(s.get("vo", Some(500.0)).is_none());
        assert!(s.get("vo", None).is_none());
        let err = s.require("t", 300.0).unwrap_err().to_string();
        assert!(
            err.contains("`t` at 300 hPa") && err.contains("1970-01-01"),
            "{err}"
        );
        let other = Field::from_fn(Grid::global(5.0), |_, _| 0.0).unwrap();
        assert!(s.clone().with("t", Some(300.0), other).is_err());
        assert_eq!(s.keys().count(), 2);
    }

    #[test]
    fn a_stitched_step_becomes_a_snapshot() {
        use atmorep_proto::stitch::StitchedPlane;
        let g = Grid::global(10.0);
        let plane = |field: &str, level, v: f32| StitchedPlane {
            field: field.into(),
            level,
            values: vec![v; g.len()],
        };
        let step = StitchedStep {
            time_index: 3,
            time_unix: 10_800,
            planes: vec![plane("vo", Some(850.0), 1.0), plane("msl", None, 2.0)],
        };
        let s = FieldSnapshot::from_stitched(g, step.clone()).unwrap();
        assert_eq!(s.time_unix, 10_800);
        assert_eq!(s.get("vo", Some(850.0)).unwrap().get(1, 2), 1.0);
        assert_eq!(
            s.get("msl", None).unwrap().values(),
            step.plane("msl", None).unwrap()
        );
        let mut short = step;
        short.planes[1].values.pop();
        assert!(FieldSnapshot::from_stitched(g, short).is_err());
    }
}
