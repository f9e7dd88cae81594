//! The command line's side of the admin API: authenticated calls to a running gateway and the
//! rendering of their answers as a table, CSV or JSON.

use serde_json::Value;

use crate::cli::{AdminArgs, Format};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no admin token: pass --admin-token or set TOLLGATE_ADMIN_TOKEN")]
    NoToken,
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{status}: {message}")]
    Refused { status: u16, message: String },
}

pub struct AdminClient {
    url: String,
    token: String,
    http: reqwest::Client,
}

impl AdminClient {
    pub fn new(args: &AdminArgs) -> Result<AdminClient, ClientError> {
        Ok(AdminClient {
            url: args.url.trim_end_matches('/').to_owned(),
            token: args.admin_token.clone().ok_or(ClientError::NoToken)?,
            http: reqwest::Client::new(),
        })
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let url = format!("{}{}", self.url, path);
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            url: self.url.clone(),
            reason: e.without_url().to_string(),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let answer: Value = response.json().await.map_err(unreachable)?;
        if status >= 400 {
            let message = answer["error"]["message"]
                .as_str()
                .unwrap_or("request refused")
                .to_owned();
            return Err(ClientError::Refused { status, message });
        }
        Ok(answer)
    }
}

/// Prints rows (JSON objects) with the given columns. JSON output prints `whole` unchanged.
pub fn render(whole: &Value, rows: &[Value], columns: &[&str], format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(whole).unwrap_or_default(),
        Format::Csv => {
            let mut out = columns.join(",");
            out.push('\n');
            for row in rows {
                let cells: Vec<String> = columns.iter().map(|c| csv_cell(&cell(row, c))).collect();
                out.push_str(&cells.join(","));
                out.push('\n');
            }
            out
        }
        Format::Table => {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|row| columns.iter().map(|c| cell(row, c)).collect())
                .collect();
            let widths: Vec<usize> = columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    cells
                        .iter()
                        .map(|r| r[i].chars().count())
                        .chain([c.len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |values: Vec<String>| {
                values
                    .iter()
                    .zip(&widths)
                    .map(|(v, w)| format!("{v:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_owned()
            };
            let mut out = line(columns.iter().map(|c| (*c).to_owned()).collect());
            out.push('\n');
            for row in cells {
                out.push_str(&line(row));
                out.push('\n');
            }
            out
        }
    }
}

fn cell(row: &Value, column: &str) -> String {
    match &row[column] {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

/// Text as a CSV cell (RFC 4180): quoted when it holds a comma, a quote or a line break.
pub(crate) fn csv_cell(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_tables_and_csv() {
        let rows = vec![json!({"id": "k1", "name": "a, b", "rpm": 60})];
        let whole = json!({"data": rows});
        let table = render(&whole, &rows, &["id", "name", "rpm"], Format::Table);
        assert_eq!(table, "id  name  rpm\nk1  a, b  60\n");
        let csv = render(&whole, &rows, &["id", "name", "rpm"], Format::Csv);
        assert_eq!(csv, "id,name,rpm\nk1,\"a, b\",60\n");
    }
}
