//! How the CLI prints: tables for people, the API's JSON for scripts.

use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::Value;

pub struct Output {
    pub json: bool,
}

impl Output {
    /// Rows of `items` in `columns`.
    pub fn list(&self, items: &[Value], columns: &[&str]) {
        if self.json {
            return print_json(&Value::Array(items.to_vec()));
        }
        let mut table = new_table();
        table.set_header(columns.to_vec());
        for item in items {
            table.add_row(columns.iter().map(|c| cell(&item[*c])).collect::<Vec<_>>());
        }
        println!("{table}");
        println!("{} shown", items.len());
    }

    /// One record as field/value rows.
    pub fn record(&self, record: &Value) {
        if self.json {
            return print_json(record);
        }
        let mut table = new_table();
        if let Some(fields) = record.as_object() {
            for (field, value) in fields {
                table.add_row(vec![field.clone(), cell(value)]);
            }
        }
        println!("{table}");
    }

    /// A delivery, then its attempts as a table.
    pub fn delivery(&self, delivery: &Value) {
        if self.json {
            return print_json(delivery);
        }
        let (summary, attempts) = split_off(delivery, "attempts");
        self.record(&summary);
        println!("attempts:");
        let columns = [
            "attempt",
            "started_at",
            "outcome",
            "status_code",
            "duration_ms",
            "error",
        ];
        self.list(&attempts, &columns);
    }

    /// A playground answer: the outcome first, then the plugin's log.
    pub fn outcome(&self, answer: &Value) {
        if self.json {
            return print_json(answer);
        }
        let (summary, logs) = split_off(answer, "logs");
        self.record(&summary);
        println!("plugin log ({} lines):", logs.len());
        for line in logs {
            println!(
                "  [{}] {}",
                line["level"].as_str().unwrap_or("?"),
                line["message"].as_str().unwrap_or_default()
            );
        }
    }

    /// A one-line confirmation (nothing with `--json` but the record).
    pub fn done(&self, message: &str) {
        if !self.json {
            println!("{message}");
        }
    }

    /// A hint for people, on stderr so stdout stays parseable.
    pub fn note(&self, message: &str) {
        if !self.json {
            eprintln!("{message}");
        }
    }
}

/// `record` without its list `field`, and that list.
fn split_off(record: &Value, field: &str) -> (Value, Vec<Value>) {
    let mut rest = record.clone();
    let list = rest
        .as_object_mut()
        .and_then(|fields| fields.remove(field))
        .and_then(|list| list.as_array().cloned())
        .unwrap_or_default();
    (rest, list)
}

fn new_table() -> Table {
    let mut table = Table::new();
    table.load_style(UTF8_FULL_CONDENSED);
    table
}

/// A value as a table cell: strings bare, null empty, the rest as JSON.
fn cell(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn print_json(value: &Value) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(error) => eprintln!("cannot print JSON: {error}"),
    }
}
