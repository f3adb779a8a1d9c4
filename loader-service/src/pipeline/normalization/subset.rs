//! Statistics of a subset of a store: a time range, every K-th step of it, some variables and
//! some levels, so that the statistics of an 80-year hourly archive cost a read of the steps
//! kept rather than a full pass (docs/loader.md, "Statistics of a subset"). What was read is
//! kept beside the statistics as their [`Coverage`], which the service reports.

use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::store::dataset::Dataset;

/// Which part of a store statistics are computed from; the default is all of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatsSubset {
    /// First time step considered (unix seconds); `None`: the store's first.
    pub start: Option<i64>,
    /// Last time step considered (inclusive); `None`: the store's last.
    pub end: Option<i64>,
    /// Read every this many steps from the first one in range; 0 and 1 read every step.
    pub every_steps: usize,
    /// Variables (either ERA5 name); empty: every variable.
    pub variables: Vec<String>,
    /// Levels of the variables that have levels; empty: every level. Surface variables keep
    /// their single plane.
    pub levels: Vec<f64>,
}

impl Default for StatsSubset {
    fn default() -> Self {
        Self {
            start: None,
            end: None,
            every_steps: 1,
            variables: Vec::new(),
            levels: Vec::new(),
        }
    }
}

/// A subset resolved against one store: the store's names, level and time indices.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedSubset {
    /// (store variable name, indices of its levels to read; empty for a surface variable).
    pub variables: Vec<(String, Vec<usize>)>,
    /// Time indices to read, ascending.
    pub steps: Vec<usize>,
}

/// What a statistics table was computed from, as written beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Coverage {
    /// First and last time step read (unix seconds).
    pub first_step: i64,
    pub last_step: i64,
    /// Every this many steps of the store were read (1: all).
    pub every_steps: usize,
    /// Time steps read, and the store's number of time steps.
    pub steps_read: usize,
    pub store_steps: usize,
    /// Variables covered, by the store's names.
    pub variables: Vec<String>,
    /// Levels the subset was restricted to; empty: every level.
    pub levels: Vec<f64>,
}

impl Coverage {
    /// Whether every step of every variable and level was read.
    pub fn is_full(&self, dataset_variables: usize) -> bool {
        self.steps_read == self.store_steps
            && self.levels.is_empty()
            && self.variables.len() == dataset_variables
    }
}

impl std::fmt::Display for Coverage {
    /// `12 of 480 time steps (every 40, 2020-09-01T00:00:00Z … 2020-10-29T00:00:00Z) of t, z`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use atmorep_proto::calendar::{TimeFormat, format_time};
        write!(
            f,
            "{} of {} time steps (every {}, {} … {}) of {}",
            self.steps_read,
            self.store_steps,
            self.every_steps,
            format_time(self.first_step, TimeFormat::Iso),
            format_time(self.last_step, TimeFormat::Iso),
            self.variables.join(", "),
        )?;
        if !self.levels.is_empty() {
            write!(f, " at levels {:?}", self.levels)?;
        }
        Ok(())
    }
}

fn subset_err(dataset: &Dataset, detail: String) -> StoreError {
    StoreError::InvalidSubset {
        url: dataset.url().to_string(),
        detail,
    }
}

impl StatsSubset {
    /// The subset as `dataset` has it; a variable, level or time range it lacks is an error
    /// naming it.
    pub fn resolve(&self, dataset: &Dataset) -> Result<ResolvedSubset> {
        let names: Vec<String> = if self.variables.is_empty() {
            dataset.variables.keys().cloned().collect()
        } else {
            let mut names = Vec::new();
            for name in &self.variables {
                let stored = dataset
                    .resolve_name(name)
                    .map_err(|e| subset_err(dataset, format!("--variables: {e}")))?;
                if !names.iter().any(|n| n == stored) {
                    names.push(stored.to_string());
                }
            }
            names
        };
        for level in &self.levels {
            let somewhere = names.iter().any(|n| {
                dataset
                    .variables
                    .get(n)
                    .is_some_and(|v| v.levels.contains(level))
            });
            if !somewhere {
                return Err(subset_err(
                    dataset,
                    format!("--levels: no variable of the subset has level {level}"),
                ));
            }
        }
        let mut variables = Vec::new();
        for name in names {
            let variable = dataset.variable(&name)?;
            let levels: Vec<usize> = if variable.levels.is_empty() {
                Vec::new()
            } else if self.levels.is_empty() {
                (0..variable.levels.len()).collect()
            } else {
                let mut picked = Vec::new();
                for level in &self.levels {
                    let index =
                        variable
                            .levels
                            .iter()
                            .position(|l| l == level)
                            .ok_or_else(|| {
                                subset_err(
                                    dataset,
                                    format!(
                                        "--levels: `{name}` has no level {level} (it has {:?})",
                                        variable.levels
                                    ),
                                )
                            })?;
                    picked.push(index);
                }
                picked
            };
            variables.push((name, levels));
        }
        let start = self.start.unwrap_or(i64::MIN);
        let end = self.end.unwrap_or(i64::MAX);
        let every = self.every_steps.max(1);
        let steps: Vec<usize> = (0..dataset.times.len())
            .filter(|&i| (start..=end).contains(&dataset.times[i]))
            .step_by(every)
            .collect();
        if steps.is_empty() {
            return Err(subset_err(
                dataset,
                format!(
                    "--start/--end: no time step of the store lies in {} … {}",
                    time_text(self.start),
                    time_text(self.end)
                ),
            ));
        }
        Ok(ResolvedSubset { variables, steps })
    }
}

fn time_text(t: Option<i64>) -> String {
    t.map_or_else(
        || "(open)".to_string(),
        |t| atmorep_proto::calendar::format_time(t, atmorep_proto::calendar::TimeFormat::Iso),
    )
}

impl ResolvedSubset {
    /// The coverage of statistics computed from this subset of `dataset` (asked for with
    /// `subset`).
    pub fn coverage(&self, dataset: &Dataset, subset: &StatsSubset) -> Coverage {
        Coverage {
            first_step: dataset.times[self.steps[0]],
            last_step: dataset.times[self.steps[self.steps.len() - 1]],
            every_steps: subset.every_steps.max(1),
            steps_read: self.steps.len(),
            store_steps: dataset.times.len(),
            variables: self.variables.iter().map(|(n, _)| n.clone()).collect(),
            levels: subset.levels.clone(),
        }
    }
}
