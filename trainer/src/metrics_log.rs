//! Per-step training metrics: one [`StepRecord`] per optimizer step, recorded with the `metrics`
//! crate (a binary that installs a Prometheus exporter serves them) and written as Parquet.
//!
//! Parquet files are only readable once their footer is written, so a run does not keep one
//! file open: the rows since the last write go into `metrics/steps-FIRST-LAST.parquet` whenever
//! a checkpoint is written and when the run ends (temporary file, then rename). A run killed in
//! between loses the rows after its last checkpoint — exactly the steps a resumed run repeats.
//!
//! After the fixed columns come two nullable columns per field, `loss/FIELD` and
//! `val_loss/FIELD`, in the model's field order; a table written before they existed reads back
//! with no per-field losses.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::Float64Builder;
use arrow_array::{Array, ArrayRef, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{Error, Result, io_err};

/// The folder of the step tables inside a run's output folder.
pub const DIR: &str = "metrics";

/// What one optimizer step did and how long its parts took.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepRecord {
    /// 1-based: the number of optimizer steps taken after this one.
    pub step: u64,
    /// The tasks of its micro-batches, `+`-joined.
    pub tasks: String,
    /// Training loss (mean over micro-batches; normalized units).
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens the model read (all fields, all samples, all micro-batches).
    pub tokens: u64,
    /// Wall time of the whole step.
    pub step_s: f64,
    /// Time blocked waiting for the loader stream.
    pub data_wait_s: f64,
    /// Batch to tensors, forward pass and loss.
    pub forward_s: f64,
    pub backward_s: f64,
    /// Clipping and the AdamW update.
    pub optimizer_s: f64,
    /// Mean validation loss, on the steps after which validation ran.
    pub val_loss: Option<f64>,
    /// Training loss per field, in the model's field order: a field's mean over the step's
    /// micro-batches in which it had masked tokens (a field with none is left out).
    pub field_losses: Vec<(String, f64)>,
    /// Validation loss per field (as `field_losses`), on the steps after which validation ran.
    pub val_field_losses: Vec<(String, f64)>,
}

impl StepRecord {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.step_s.max(1e-12)
    }

    pub fn data_wait_fraction(&self) -> f64 {
        self.data_wait_s / self.step_s.max(1e-12)
    }

    /// Records the step with the `metrics` crate (gauges for the latest values, counters for
    /// totals).
    pub fn record(&self) {
        metrics::counter!("atmorep_train_steps_total").increment(1);
        metrics::counter!("atmorep_train_tokens_total").increment(self.tokens);
        metrics::gauge!("atmorep_train_step").set(self.step as f64);
        metrics::gauge!("atmorep_train_loss").set(self.loss);
        metrics::gauge!("atmorep_train_learning_rate").set(self.lr);
        metrics::gauge!("atmorep_train_grad_norm").set(self.grad_norm);
        metrics::gauge!("atmorep_train_tokens_per_second").set(self.tokens_per_s());
        metrics::gauge!("atmorep_train_data_wait_fraction").set(self.data_wait_fraction());
        for (part, s) in [
            ("data_wait", self.data_wait_s),
            ("forward", self.forward_s),
            ("backward", self.backward_s),
            ("optimizer", self.optimizer_s),
        ] {
            metrics::histogram!("atmorep_train_step_seconds", "part" => part).record(s);
        }
        if let Some(v) = self.val_loss {
            metrics::gauge!("atmorep_train_validation_loss").set(v);
        }
        for (field, v) in &self.field_losses {
            metrics::gauge!("atmorep_train_field_loss", "field" => field.clone()).set(*v);
        }
        for (field, v) in &self.val_field_losses {
            metrics::gauge!("atmorep_train_field_validation_loss", "field" => field.clone())
                .set(*v);
        }
    }
}

/// The prefixes of the per-field columns: training and validation loss.
const FIELD_LOSS: &str = "loss/";
const FIELD_VAL_LOSS: &str = "val_loss/";

/// The fields with a training or validation loss in some of `rows`, in the model's order.
pub fn field_names(rows: &[StepRecord]) -> Vec<String> {
    ordered_names(
        rows.iter()
            .flat_map(|r| [r.field_losses.as_slice(), r.val_field_losses.as_slice()]),
    )
}

/// The fields named in `lists`, each in the order the lists give (a field missing from some
/// steps still lands between its neighbours).
fn ordered_names<'a>(lists: impl Iterator<Item = &'a [(String, f64)]>) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for list in lists {
        let mut at = 0;
        for (name, _) in list {
            match names.iter().position(|n| n == name) {
                Some(i) => at = at.max(i + 1),
                None => {
                    names.insert(at, name.clone());
                    at += 1;
                }
            }
        }
    }
    names
}

/// The fixed columns, then `loss/FIELD` and `val_loss/FIELD` for each of `fields`.
fn schema(fields: &[String]) -> Arc<Schema> {
    let f = |name: &str, dt: DataType| Field::new(name, dt, false);
    let mut columns = vec![
        f("step", DataType::UInt64),
        f("tasks", DataType::Utf8),
        f("loss", DataType::Float64),
        f("lr", DataType::Float64),
        f("grad_norm", DataType::Float64),
        f("tokens", DataType::UInt64),
        f("tokens_per_s", DataType::Float64),
        f("step_s", DataType::Float64),
        f("data_wait_s", DataType::Float64),
        f("data_wait_fraction", DataType::Float64),
        f("forward_s", DataType::Float64),
        f("backward_s", DataType::Float64),
        f("optimizer_s", DataType::Float64),
        Field::new("val_loss", DataType::Float64, true),
    ];
    for prefix in [FIELD_LOSS, FIELD_VAL_LOSS] {
        columns.extend(
            fields
                .iter()
                .map(|name| Field::new(format!("{prefix}{name}"), DataType::Float64, true)),
        );
    }
    Arc::new(Schema::new(columns))
}

fn metrics_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Metrics {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

/// Writes `rows` (at least one) to `out/metrics/steps-FIRST-LAST.parquet` and returns its path.
pub fn write_steps(out: &Path, rows: &[StepRecord]) -> Result<Option<PathBuf>> {
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return Ok(None);
    };
    let dir = out.join(DIR);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let path = dir.join(format!("steps-{:08}-{:08}.parquet", first.step, last.step));
    let f64s = |get: fn(&StepRecord) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(rows.iter().map(get)))
    };
    let mut val = Float64Builder::with_capacity(rows.len());
    for r in rows {
        val.append_option(r.val_loss);
    }
    let fields = field_names(rows);
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.step))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.tasks.as_str()),
        )),
        f64s(|r| r.loss),
        f64s(|r| r.lr),
        f64s(|r| r.grad_norm),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.tokens))),
        f64s(StepRecord::tokens_per_s),
        f64s(|r| r.step_s),
        f64s(|r| r.data_wait_s),
        f64s(StepRecord::data_wait_fraction),
        f64s(|r| r.forward_s),
        f64s(|r| r.backward_s),
        f64s(|r| r.optimizer_s),
        Arc::new(val.finish()),
    ];
    // `loss/FIELD` columns, then `val_loss/FIELD` ones (the schema's order).
    for validation in [false, true] {
        for name in &fields {
            let mut col = Float64Builder::with_capacity(rows.len());
            for r in rows {
                let list = if validation {
                    &r.val_field_losses
                } else {
                    &r.field_losses
                };
                col.append_option(list.iter().find(|(n, _)| n == name).map(|(_, v)| *v));
            }
            columns.push(Arc::new(col.finish()));
        }
    }
    let schema = schema(&fields);
    let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| metrics_err(&path, e))?;
    let tmp = dir.join(format!(".tmp-{}", std::process::id()));
    let file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut writer =
        ArrowWriter::try_new(file, schema, Some(props)).map_err(|e| metrics_err(&path, e))?;
    writer.write(&batch).map_err(|e| metrics_err(&path, e))?;
    let file = writer.into_inner().map_err(|e| metrics_err(&path, e))?;
    file.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(Some(path))
}

/// Reads every `steps-*.parquet` under `out/metrics`, rows sorted by step (a step repeated by
/// a resumed run appears once per file that holds it).
pub fn read_steps(out: &Path) -> Result<Vec<StepRecord>> {
    let dir = out.join(DIR);
    let mut rows = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(io_err(&dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("steps-") && name.ends_with(".parquet")
        })
        .collect();
    paths.sort();
    for path in paths {
        let file = std::fs::File::open(&path).map_err(io_err(&path))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.build())
            .map_err(|e| metrics_err(&path, e))?;
        for batch in reader {
            let batch = batch.map_err(|e| metrics_err(&path, e))?;
            let col = |name: &str| batch.column_by_name(name).expect("schema column");
            let u = |name: &str| col(name).as_any().downcast_ref::<UInt64Array>().cloned();
            let f = |name: &str| col(name).as_any().downcast_ref::<Float64Array>().cloned();
            let bad = || metrics_err(&path, "unexpected column types");
            let (step, tokens) = (u("step").ok_or_else(bad)?, u("tokens").ok_or_else(bad)?);
            let tasks = col("tasks")
                .as_any()
                .downcast_ref::<StringArray>()
                .cloned()
                .ok_or_else(bad)?;
            let [loss, lr, grad, step_s, wait, fwd, bwd, opt, val] = [
                "loss",
                "lr",
                "grad_norm",
                "step_s",
                "data_wait_s",
                "forward_s",
                "backward_s",
                "optimizer_s",
                "val_loss",
            ]
            .map(f);
            let [loss, lr, grad, step_s, wait, fwd, bwd, opt, val] =
                [loss, lr, grad, step_s, wait, fwd, bwd, opt, val].map(|c| c.ok_or_else(bad));
            let (loss, lr, grad, step_s, wait, fwd, bwd, opt, val) =
                (loss?, lr?, grad?, step_s?, wait?, fwd?, bwd?, opt?, val?);
            // The per-field columns, in the table's order (none in older tables).
            let schema = batch.schema();
            let per_field = |prefix: &str| -> Result<Vec<(String, Float64Array)>> {
                schema
                    .fields()
                    .iter()
                    .filter_map(|c| Some((c.name(), c.name().strip_prefix(prefix)?)))
                    .map(|(column, field)| Ok((field.to_string(), f(column).ok_or_else(bad)?)))
                    .collect()
            };
            let (field_loss, field_val) = (per_field(FIELD_LOSS)?, per_field(FIELD_VAL_LOSS)?);
            let at = |cols: &[(String, Float64Array)], i: usize| -> Vec<(String, f64)> {
                cols.iter()
                    .filter(|(_, c)| c.is_valid(i))
                    .map(|(name, c)| (name.clone(), c.value(i)))
                    .collect()
            };
            for i in 0..batch.num_rows() {
                rows.push(StepRecord {
                    step: step.value(i),
                    tasks: tasks.value(i).to_string(),
                    loss: loss.value(i),
                    lr: lr.value(i),
                    grad_norm: grad.value(i),
                    tokens: tokens.value(i),
                    step_s: step_s.value(i),
                    data_wait_s: wait.value(i),
                    forward_s: fwd.value(i),
                    backward_s: bwd.value(i),
                    optimizer_s: opt.value(i),
                    val_loss: val.is_valid(i).then(|| val.value(i)),
                    field_losses: at(&field_loss, i),
                    val_field_losses: at(&field_val, i),
                });
            }
        }
    }
    rows.sort_by_key(|r| r.step);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(step: u64, val: Option<f64>) -> StepRecord {
        StepRecord {
            step,
            tasks: "bert".into(),
            loss: 1.0 / step as f64,
            lr: 1e-3,
            grad_norm: 0.5,
            tokens: 256,
            step_s: 0.01,
            data_wait_s: 0.001,
            forward_s: 0.004,
            backward_s: 0.004,
            optimizer_s: 0.001,
            val_loss: val,
            field_losses: Vec::new(),
            val_field_losses: Vec::new(),
        }
    }

    fn losses(pairs: &[(&str, f64)]) -> Vec<(String, f64)> {
        pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect()
    }

    fn columns(path: &Path) -> Vec<String> {
        let file = std::fs::File::open(path).unwrap();
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        builder
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect()
    }

    #[test]
    fn parquet_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let a: Vec<_> = (1..=3).map(|s| row(s, None)).collect();
        let b = vec![row(4, Some(0.7)), row(5, None)];
        let p = write_steps(dir.path(), &a).unwrap().unwrap();
        assert!(p.ends_with("metrics/steps-00000001-00000003.parquet"));
        write_steps(dir.path(), &b).unwrap();
        assert!(write_steps(dir.path(), &[]).unwrap().is_none());
        let back = read_steps(dir.path()).unwrap();
        assert_eq!(back, [a, b].concat());
        assert!((back[0].tokens_per_s() - 25_600.0).abs() < 1e-6);
        assert!((back[0].data_wait_fraction() - 0.1).abs() < 1e-12);
    }

    #[test]
    fn per_field_losses_round_trip_as_nullable_columns() {
        let dir = tempfile::tempdir().unwrap();
        // A log of the time before per-field columns: the fixed columns only.
        let old: Vec<_> = (1..=2).map(|s| row(s, None)).collect();
        let p = write_steps(dir.path(), &old).unwrap().unwrap();
        assert_eq!(columns(&p).len(), 14);
        assert!(!columns(&p).iter().any(|c| c.contains('/')));

        // Fields in the model's order; `t` unmasked in step 4, `z` only in step 5 (it still
        // lands between `vo` and `t`); validation per field on step 4 only.
        let mut new: Vec<_> = (3..=5).map(|s| row(s, None)).collect();
        new[0].field_losses = losses(&[("vo", 0.5), ("t", 0.25)]);
        new[1].field_losses = losses(&[("vo", 0.4)]);
        new[1].val_loss = Some(0.3);
        new[1].val_field_losses = losses(&[("vo", 0.35), ("t", 0.2)]);
        new[2].field_losses = losses(&[("vo", 0.3), ("z", 1.5), ("t", 0.125)]);
        let p = write_steps(dir.path(), &new).unwrap().unwrap();
        let cols = columns(&p);
        assert_eq!(
            cols[14..],
            [
                "loss/vo",
                "loss/z",
                "loss/t",
                "val_loss/vo",
                "val_loss/z",
                "val_loss/t"
            ]
        );

        let back = read_steps(dir.path()).unwrap();
        assert_eq!(back, [old, new].concat());
        assert!(back[..2].iter().all(|r| r.field_losses.is_empty()));
        assert!(back[3].field_losses.iter().all(|(n, _)| n != "t"));
    }

    #[test]
    fn field_names_keep_every_lists_order() {
        let l = |names: &[&str]| -> Vec<(String, f64)> {
            names.iter().map(|n| (n.to_string(), 0.0)).collect()
        };
        let lists = [
            l(&["b", "d"]),
            l(&[]),
            l(&["a", "b", "c", "d"]),
            l(&["d", "e"]),
        ];
        let names = ordered_names(lists.iter().map(Vec::as_slice));
        assert_eq!(names, ["a", "b", "c", "d", "e"]);
        // Validation lists count too.
        let mut rows = vec![row(1, None), row(2, Some(1.0))];
        rows[0].field_losses = l(&["b"]);
        rows[1].val_field_losses = l(&["a", "b"]);
        assert_eq!(field_names(&rows), ["a", "b"]);
        assert!(field_names(&[row(1, None)]).is_empty());
    }
}
