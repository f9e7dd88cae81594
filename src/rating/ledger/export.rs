//! `tollgate export`: a period's raw usage rows, as CSV (the ledger's columns, as stored) or
//! JSON lines (the records as the gateway keeps them), for keeping what the retention of raw
//! rows (`[ledger] raw_retention_days`) will drop.

use std::io::Write;

use super::{sql, LedgerError, LedgerReader};
use crate::store::row::Column;

/// Records read from the store at a time: memory stays flat however long the period.
const PAGE: u32 = 5_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Csv,
    JsonLines,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("writing the export: {0}")]
    Write(#[from] std::io::Error),
    #[error("writing the export: {0}")]
    Json(#[from] serde_json::Error),
}

/// Writes the usage records in `[from_ms, to_ms)` in time order; answers how many.
pub fn export(
    ledger: &dyn LedgerReader,
    from_ms: i64,
    to_ms: i64,
    format: ExportFormat,
    out: &mut dyn Write,
) -> Result<u64, ExportError> {
    if format == ExportFormat::Csv {
        let header: Vec<&str> = sql::USAGE_COLUMNS.iter().map(|(name, _)| *name).collect();
        writeln!(out, "{}", header.join(","))?;
    }
    let mut written = 0;
    let mut after = (from_ms, String::new());
    loop {
        let page = ledger.records_page(from_ms, to_ms, (after.0, &after.1), PAGE)?;
        for record in &page {
            match format {
                ExportFormat::Csv => {
                    let cells: Vec<String> =
                        sql::usage_values(record).iter().map(csv_cell).collect();
                    writeln!(out, "{}", cells.join(","))?;
                }
                ExportFormat::JsonLines => {
                    serde_json::to_writer(&mut *out, record)?;
                    writeln!(out)?;
                }
            }
        }
        written += page.len() as u64;
        match page.last() {
            Some(last) if page.len() == PAGE as usize => {
                after = (last.started_at_ms, last.request_id.clone());
            }
            _ => break,
        }
    }
    out.flush()?;
    Ok(written)
}

/// A value as a CSV cell: NULL is empty and booleans are 1 or 0, as SQLite stores them.
fn csv_cell(value: &Column<'_>) -> String {
    match value {
        Column::Int(value) => value.map(|v| v.to_string()).unwrap_or_default(),
        Column::Bool(value) => u8::from(*value).to_string(),
        Column::Text(text) => text
            .as_deref()
            .map(crate::client::csv_cell)
            .unwrap_or_default(),
        Column::Bytes(bytes) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
    }
}
