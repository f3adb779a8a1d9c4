//! The evaluation's report: the aligned text table (each RMSE and skill with its 95 % bootstrap
//! interval) and the Parquet file of the same rows, written atomically.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType as ArrowType, Field, Schema};
use parquet::arrow::ArrowWriter;

use super::EvalRow;
use crate::bootstrap::Interval;
use crate::ensemble::EnsembleScore;
use crate::error::{Error, Result, io_err};

/// A number for the tables: vorticity and divergence are ~1e-5 s⁻¹, so fixed decimals would
/// print them as zeros.
fn num(x: f64) -> String {
    if x != 0.0 && x.abs() < 1e-2 {
        format!("{x:.3e}")
    } else {
        format!("{x:.4}")
    }
}

/// `value [lo, hi]`.
fn with_ci(value: f64, ci: Interval) -> String {
    format!("{} [{}, {}]", num(value), num(ci[0]), num(ci[1]))
}

/// The report as an aligned text table: each RMSE and skill with its 95 % bootstrap interval.
pub fn table(rows: &[EvalRow]) -> String {
    let mut out = format!(
        "{:<13} {:<6} {:>6} {:<13} {:>8} {:>7} {:>31} {:>31} {:>24}\n",
        "task",
        "field",
        "level",
        "baseline",
        "values",
        "samples",
        "model RMSE [95 % CI]",
        "base RMSE [95 % CI]",
        "skill [95 % CI]"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<13} {:<6} {:>6} {:<13} {:>8} {:>7} {:>31} {:>31} {:>24}\n",
            r.task,
            r.field,
            r.level,
            r.baseline.name(),
            r.values,
            r.samples,
            with_ci(r.model_rmse, r.model_ci),
            with_ci(r.baseline_rmse, r.baseline_ci),
            format!(
                "{:+.3} [{:+.3}, {:+.3}]",
                r.skill(),
                r.skill_ci[0],
                r.skill_ci[1]
            ),
        ));
    }
    let mut ensembles: Vec<(&EvalRow, EnsembleScore)> = rows
        .iter()
        .filter_map(|r| r.ensemble.map(|e| (r, e)))
        .collect();
    ensembles
        .dedup_by(|a, b| (&a.0.task, &a.0.field, a.0.level) == (&b.0.task, &b.0.field, b.0.level));
    if let Some((_, first)) = ensembles.first() {
        out.push_str(&format!(
            "\nensemble of {} members (CRPS: lower is better; spread–skill: 1 when reliable, \
             < 1 overconfident):\n{:<13} {:<6} {:>6} {:>31} {:>12} {:>24}\n",
            first.members,
            "task",
            "field",
            "level",
            "CRPS [95 % CI]",
            "spread",
            "spread–skill [95 % CI]"
        ));
        for (r, e) in ensembles {
            out.push_str(&format!(
                "{:<13} {:<6} {:>6} {:>31} {:>12} {:>24}\n",
                r.task,
                r.field,
                r.level,
                with_ci(e.crps, e.crps_ci),
                num(e.spread),
                format!(
                    "{:.3} [{:.3}, {:.3}]",
                    e.spread_skill, e.spread_skill_ci[0], e.spread_skill_ci[1]
                ),
            ));
        }
    }
    out
}

/// Writes the report as Parquet (temporary file, then rename).
pub fn write_parquet(path: &Path, rows: &[EvalRow]) -> Result<()> {
    let rows: Vec<&EvalRow> = rows.iter().collect();
    let (fields, columns) = eval_row_columns(&rows);
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| parquet_err(path, e))?;
    write_record_batch(path, &batch)
}

/// The columns every table of evaluation rows has (task, field, level, baseline, values,
/// samples, both RMSEs and the skill with their interval bounds, and the ensemble's scores,
/// null for a single-member model), and their schema fields, in that order.
pub(crate) fn eval_row_columns(rows: &[&EvalRow]) -> (Vec<Field>, Vec<ArrayRef>) {
    let strings = |f: fn(&EvalRow) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| f(r))))
    };
    let floats = |f: fn(&EvalRow) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| f(r))))
    };
    let fields = vec![
        Field::new("task", ArrowType::Utf8, false),
        Field::new("field", ArrowType::Utf8, false),
        Field::new("level", ArrowType::Float64, false),
        Field::new("baseline", ArrowType::Utf8, false),
        Field::new("values", ArrowType::UInt64, false),
        Field::new("samples", ArrowType::UInt64, false),
        Field::new("model_rmse", ArrowType::Float64, false),
        Field::new("model_rmse_lo", ArrowType::Float64, false),
        Field::new("model_rmse_hi", ArrowType::Float64, false),
        Field::new("baseline_rmse", ArrowType::Float64, false),
        Field::new("baseline_rmse_lo", ArrowType::Float64, false),
        Field::new("baseline_rmse_hi", ArrowType::Float64, false),
    ];
    let columns = vec![
        strings(|r| &r.task),
        strings(|r| &r.field),
        floats(|r| r.level),
        strings(|r| r.baseline.name()),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.values))),
        Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|r| r.samples),
        )),
        floats(|r| r.model_rmse),
        floats(|r| r.model_ci[0]),
        floats(|r| r.model_ci[1]),
        floats(|r| r.baseline_rmse),
        floats(|r| r.baseline_ci[0]),
        floats(|r| r.baseline_ci[1]),
    ];
    let (mut fields, mut columns) = (fields, columns);
    for (name, column) in [
        ("skill", floats(|r| r.skill())),
        ("skill_lo", floats(|r| r.skill_ci[0])),
        ("skill_hi", floats(|r| r.skill_ci[1])),
    ] {
        fields.push(Field::new(name, ArrowType::Float64, false));
        columns.push(column);
    }
    // The ensemble's scores: null for a single-member model.
    fields.push(Field::new("members", ArrowType::UInt64, true));
    columns.push(Arc::new(UInt64Array::from(
        rows.iter()
            .map(|r| r.ensemble.map(|e| e.members as u64))
            .collect::<Vec<_>>(),
    )));
    let ens = |f: &dyn Fn(&EnsembleScore) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from(
            rows.iter()
                .map(|r| r.ensemble.as_ref().map(f))
                .collect::<Vec<_>>(),
        ))
    };
    for (name, column) in [
        ("crps", ens(&|e| e.crps)),
        ("crps_lo", ens(&|e| e.crps_ci[0])),
        ("crps_hi", ens(&|e| e.crps_ci[1])),
        ("spread", ens(&|e| e.spread)),
        ("spread_skill", ens(&|e| e.spread_skill)),
        ("spread_skill_lo", ens(&|e| e.spread_skill_ci[0])),
        ("spread_skill_hi", ens(&|e| e.spread_skill_ci[1])),
    ] {
        fields.push(Field::new(name, ArrowType::Float64, true));
        columns.push(column);
    }
    (fields, columns)
}

/// Writes one record batch as a Parquet file at `path` (temporary file, fsync, then rename).
pub(crate) fn write_record_batch(path: &Path, batch: &RecordBatch) -> Result<()> {
    let tmp = tmp_path(path);
    let file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let mut writer =
        ArrowWriter::try_new(file, batch.schema(), None).map_err(|e| parquet_err(path, e))?;
    writer.write(batch).map_err(|e| parquet_err(path, e))?;
    let file = writer.into_inner().map_err(|e| parquet_err(path, e))?;
    file.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

pub(crate) fn parquet_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Metrics {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}
