//! One row codec for both SQL stores: a record becomes a list of [`Column`] values, which
//! SQLite and PostgreSQL each bind in their own way, and a record is rebuilt from any row that
//! is a [`RowSource`]. The mapping of a key or a usage record to its columns is thereby written
//! once (in `auth::store` and `rating::ledger`), so the two stores cannot drift apart.
//!
//! Integers are stored as 64-bit (`INTEGER` in SQLite, `BIGINT` in PostgreSQL) and booleans as
//! SQLite integers or PostgreSQL `BOOLEAN`.

use std::borrow::Cow;
use std::error::Error as StdError;

use bytes::BytesMut;
use postgres::types::{IsNull, ToSql, Type};

/// One value bound to a statement, borrowed from the record it describes.
#[derive(Debug, Clone, PartialEq)]
pub enum Column<'a> {
    Int(Option<i64>),
    Text(Option<Cow<'a, str>>),
    Bool(bool),
    Bytes(&'a [u8]),
}

impl Column<'_> {
    pub fn int(value: i64) -> Column<'static> {
        Column::Int(Some(value))
    }

    pub fn text(value: &str) -> Column<'_> {
        Column::Text(Some(Cow::Borrowed(value)))
    }

    pub fn optional_text(value: Option<&str>) -> Column<'_> {
        Column::Text(value.map(Cow::Borrowed))
    }
}

impl From<String> for Column<'_> {
    fn from(value: String) -> Self {
        Column::Text(Some(Cow::Owned(value)))
    }
}

/// A column's type in the tables, where a statement must name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Text,
    Bool,
}

impl Kind {
    /// The PostgreSQL type of an array of this kind.
    pub fn pg_array(self) -> &'static str {
        match self {
            Kind::Int => "bigint[]",
            Kind::Text => "text[]",
            Kind::Bool => "boolean[]",
        }
    }
}

/// A table's columns by name, as a select or insert list.
pub fn names(columns: &[(&str, Kind)]) -> String {
    columns
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The two stores' SQL differs only in a few spellings; queries written once take the dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The `n`th positional parameter, from 1.
    pub fn param(self, n: usize) -> String {
        match self {
            Dialect::Sqlite => format!("?{n}"),
            Dialect::Postgres => format!("${n}"),
        }
    }

    /// `count` positional parameters from the first.
    pub fn params(self, count: usize) -> String {
        (1..=count)
            .map(|n| self.param(n))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A text parameter that may be NULL: PostgreSQL cannot infer the type of a parameter that
    /// is only compared with NULL.
    pub fn nullable_text(self, n: usize) -> String {
        match self {
            Dialect::Sqlite => self.param(n),
            Dialect::Postgres => format!("${n}::text"),
        }
    }

    /// The sum of a `BIGINT` expression as a `BIGINT`: PostgreSQL widens it to `NUMERIC`, which
    /// the client would not read as an integer (a sum past 2^63 fails there, as in SQLite).
    pub fn sum(self, expression: &str) -> String {
        match self {
            Dialect::Sqlite => format!("SUM({expression})"),
            Dialect::Postgres => format!("SUM({expression})::bigint"),
        }
    }
}

impl rusqlite::ToSql for Column<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Column::Int(value) => rusqlite::ToSql::to_sql(value),
            Column::Text(value) => rusqlite::ToSql::to_sql(value),
            Column::Bool(value) => rusqlite::ToSql::to_sql(value),
            Column::Bytes(value) => rusqlite::ToSql::to_sql(value),
        }
    }
}

type EncodeResult = Result<IsNull, Box<dyn StdError + Sync + Send>>;

/// Each variant is encoded only as its own PostgreSQL type: a statement whose parameter has
/// another type fails instead of sending bytes the server would misread. Arrays of columns
/// (`Vec<Column>`, as bound by the ledger's `UNNEST` insert) encode each element through
/// `to_sql`, so the check is made there, not only in `to_sql_checked`.
impl ToSql for Column<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> EncodeResult {
        match self {
            Column::Int(value) => value.to_sql_checked(ty, out),
            Column::Text(value) => value.as_deref().to_sql_checked(ty, out),
            Column::Bool(value) => value.to_sql_checked(ty, out),
            Column::Bytes(value) => value.to_sql_checked(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <i64 as ToSql>::accepts(ty)
            || <&str as ToSql>::accepts(ty)
            || <bool as ToSql>::accepts(ty)
            || <&[u8] as ToSql>::accepts(ty)
    }

    fn to_sql_checked(&self, ty: &Type, out: &mut BytesMut) -> EncodeResult {
        self.to_sql(ty, out)
    }
}

/// A result row of either store, read by column index in the order of the query's select
/// list. `invalid` reports a value the row holds but the record cannot (an unknown enum name,
/// a number out of range), as the store's own error type.
pub trait RowSource {
    type Error;

    fn int(&self, column: usize) -> Result<Option<i64>, Self::Error>;
    fn text(&self, column: usize) -> Result<Option<String>, Self::Error>;
    fn boolean(&self, column: usize) -> Result<bool, Self::Error>;
    fn bytes(&self, column: usize) -> Result<Vec<u8>, Self::Error>;
    fn invalid(&self, column: usize, what: String) -> Self::Error;

    /// A `NOT NULL` integer column.
    fn required_int(&self, column: usize) -> Result<i64, Self::Error> {
        self.int(column)?
            .ok_or_else(|| self.invalid(column, "NULL in a NOT NULL column".to_owned()))
    }

    /// A `NOT NULL` text column.
    fn required_text(&self, column: usize) -> Result<String, Self::Error> {
        self.text(column)?
            .ok_or_else(|| self.invalid(column, "NULL in a NOT NULL column".to_owned()))
    }

    /// A text column read as a usage record's [`Name`](crate::meter::record::Name).
    fn name(&self, column: usize) -> Result<Option<crate::meter::record::Name>, Self::Error> {
        Ok(self.text(column)?.map(Into::into))
    }

    /// An integer column converted to the record's narrower or unsigned type.
    fn number<T: TryFrom<i64>>(&self, column: usize) -> Result<T, Self::Error> {
        let value = self.required_int(column)?;
        T::try_from(value).map_err(|_| self.invalid(column, format!("{value} is out of range")))
    }

    fn optional_number<T: TryFrom<i64>>(&self, column: usize) -> Result<Option<T>, Self::Error> {
        match self.int(column)? {
            Some(value) => T::try_from(value)
                .map(Some)
                .map_err(|_| self.invalid(column, format!("{value} is out of range"))),
            None => Ok(None),
        }
    }

    /// An enum stored by its serde name.
    fn named<T: serde::de::DeserializeOwned>(&self, column: usize) -> Result<T, Self::Error> {
        use serde::de::IntoDeserializer;
        let text = self.required_text(column)?;
        T::deserialize(text.as_str().into_deserializer())
            .map_err(|error: serde::de::value::Error| self.invalid(column, error.to_string()))
    }
}

impl RowSource for rusqlite::Row<'_> {
    type Error = rusqlite::Error;

    fn int(&self, column: usize) -> rusqlite::Result<Option<i64>> {
        self.get(column)
    }

    fn text(&self, column: usize) -> rusqlite::Result<Option<String>> {
        self.get(column)
    }

    fn boolean(&self, column: usize) -> rusqlite::Result<bool> {
        self.get(column)
    }

    fn bytes(&self, column: usize) -> rusqlite::Result<Vec<u8>> {
        self.get(column)
    }

    fn invalid(&self, column: usize, what: String) -> rusqlite::Error {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, what.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_column_encodes_only_as_its_own_type() {
        let mut out = BytesMut::new();
        assert!(Column::int(7).to_sql(&Type::INT8, &mut out).is_ok());
        assert_eq!(&out[..], &7_i64.to_be_bytes());
        assert!(Column::int(7).to_sql(&Type::TEXT, &mut out).is_err());
        assert!(Column::text("a").to_sql(&Type::INT8, &mut out).is_err());
        assert!(matches!(
            Column::Text(None).to_sql(&Type::TEXT, &mut out),
            Ok(IsNull::Yes)
        ));
    }
}
