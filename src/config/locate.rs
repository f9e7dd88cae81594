//! Turning a field path such as `models.gpt-4o.upstream` back into `file:line:column`, so that
//! every configuration error names where to look, including errors found after parsing.

use std::ops::Range;

use toml_edit::{Document, Item};

/// 1-based line and column of a byte offset.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let before = &source[..offset.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

/// The span of the deepest part of `path` that exists in the document. Numeric segments index
/// arrays (`router.rules.2.target`); a missing field falls back to its enclosing key.
pub fn span_of(source: &str, path: &[String]) -> Option<Range<usize>> {
    let document = Document::parse(source).ok()?;
    descend(document.as_item(), path, None)
}

fn descend(item: &Item, path: &[String], best: Option<Range<usize>>) -> Option<Range<usize>> {
    let Some((segment, rest)) = path.split_first() else {
        return best;
    };
    let index = segment.parse::<usize>().ok();
    match item {
        Item::Table(table) => match table.get_key_value(segment) {
            Some((key, value)) => descend(value, rest, key.span().or(best)),
            None => best,
        },
        Item::ArrayOfTables(array) => match index.and_then(|i| array.get(i)) {
            Some(table) => descend_table(table, rest, table.span().or(best)),
            None => best,
        },
        Item::Value(value) => descend_value(value, path, best),
        Item::None => best,
    }
}

fn descend_table(
    table: &toml_edit::Table,
    path: &[String],
    best: Option<Range<usize>>,
) -> Option<Range<usize>> {
    match path.split_first() {
        None => best,
        Some((segment, rest)) => match table.get_key_value(segment) {
            Some((key, value)) => descend(value, rest, key.span().or(best)),
            None => best,
        },
    }
}

fn descend_value(
    value: &toml_edit::Value,
    path: &[String],
    best: Option<Range<usize>>,
) -> Option<Range<usize>> {
    let Some((segment, rest)) = path.split_first() else {
        return value.span().or(best);
    };
    match value {
        toml_edit::Value::InlineTable(table) => match table.get_key_value(segment) {
            Some((key, inner)) => descend(inner, rest, key.span().or(best)),
            None => best,
        },
        toml_edit::Value::Array(array) => {
            match segment.parse::<usize>().ok().and_then(|i| array.get(i)) {
                Some(inner) => descend_value(inner, rest, inner.span().or(best)),
                None => best,
            }
        }
        _ => value.span().or(best),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> Vec<String> {
        p.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn finds_nested_fields() {
        let src = "[server]\nlisten = \"x\"\n\n[models.\"gpt-4o\"]\nupstream = \"nope\"\ntier = \"cheap\"\n";
        let span = span_of(src, &path("models.gpt-4o.upstream")).unwrap();
        assert_eq!(line_col(src, span.start), (5, 1));
        let span = span_of(src, &path("models.gpt-4o.missing")).unwrap();
        assert_eq!(line_col(src, span.start).0, 4);
    }

    #[test]
    fn indexes_arrays_of_tables() {
        let src = "[[rules]]\nname = \"a\"\n\n[[rules]]\nname = \"b\"\ntarget = \"x\"\n";
        let span = span_of(src, &path("rules.1.target")).unwrap();
        assert_eq!(line_col(src, span.start), (6, 1));
    }
}
