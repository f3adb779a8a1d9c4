//! Parquet tables written beside stores (normalization statistics, benchmark figures): one
//! record batch, written to a temporary file and renamed into place so a reader never sees half
//! a table.

use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::Schema;

use crate::error::{Result, StoreError};

/// Writes `columns` under `schema` as the Parquet file `path` (replaced).
pub(crate) fn write_parquet(
    path: &Path,
    schema: Arc<Schema>,
    columns: Vec<ArrayRef>,
) -> Result<()> {
    let batch =
        RecordBatch::try_new(schema.clone(), columns).map_err(|e| StoreError::output(path, e))?;
    let tmp = path.with_extension("parquet.tmp");
    let file = std::fs::File::create(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None)
        .map_err(|e| StoreError::output(path, e))?;
    writer
        .write(&batch)
        .map_err(|e| StoreError::output(path, e))?;
    writer.close().map_err(|e| StoreError::output(path, e))?;
    std::fs::rename(&tmp, path).map_err(|e| StoreError::io(path, e))
}
