//! The ClickHouse type of each view column, and the source expression that prints its value as
//! ClickHouse reads it in `TabSeparated` (the source's `copy ... to stdout` text format escapes
//! tabs, newlines and backslashes exactly as `TabSeparated` does, and writes NULL as `\N`).
//!
//! | source type                         | ClickHouse                                   |
//! |-------------------------------------|----------------------------------------------|
//! | smallint, integer, bigint           | Int16, Int32, Int64                          |
//! | real, double precision              | Float32, Float64                             |
//! | numeric(p,s), p <= 38               | Decimal(p,s)                                 |
//! | numeric without precision, p > 38   | String (the exact decimal text)              |
//! | boolean                             | UInt8 (0, 1)                                 |
//! | date                                | Date                                         |
//! | timestamp with(out) time zone       | DateTime64(6, 'UTC') (20.1+), else DateTime('UTC') |
//! | uuid                                | UUID                                         |
//! | text, varchar, char, enums, json(b) | String                                       |
//! | one-dimensional arrays of the above | Array(Nullable(T)); a NULL array is `[]`     |
//! | anything else                       | String (the source's text form)              |
//!
//! A column the view can hold NULL in becomes `Nullable(T)`, except key columns and arrays.

use crate::view::ViewColumn;

/// How one view column is written to ClickHouse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChColumn {
    pub name: String,
    /// The full ClickHouse type, `Nullable(...)` included.
    pub ch_type: String,
    /// The source expression printing the value for that type.
    pub select: String,
}

/// The scalar kinds pgtide maps; everything else is text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scalar {
    Int(&'static str),
    Float(&'static str),
    Decimal(u32, u32),
    Bool,
    Date,
    Timestamp { zoned: bool },
    Uuid,
    Text,
}

fn scalar(pg: &str) -> Scalar {
    let pg = pg.trim();
    match pg {
        "smallint" => Scalar::Int("Int16"),
        "integer" => Scalar::Int("Int32"),
        "bigint" => Scalar::Int("Int64"),
        "real" => Scalar::Float("Float32"),
        "double precision" => Scalar::Float("Float64"),
        "boolean" => Scalar::Bool,
        "date" => Scalar::Date,
        "uuid" => Scalar::Uuid,
        _ if pg.starts_with("timestamp") => Scalar::Timestamp {
            zoned: pg.ends_with("with time zone"),
        },
        _ if pg.starts_with("numeric(") => {
            let inner = pg.trim_start_matches("numeric(").trim_end_matches(')');
            let mut parts = inner.split(',').map(|p| p.trim().parse::<u32>());
            match (parts.next(), parts.next()) {
                (Some(Ok(p)), Some(Ok(s))) if p <= 38 => Scalar::Decimal(p, s),
                (Some(Ok(p)), None) if p <= 38 => Scalar::Decimal(p, 0),
                _ => Scalar::Text,
            }
        }
        _ => Scalar::Text,
    }
}

impl Scalar {
    fn ch_type(self, datetime64: bool) -> String {
        match self {
            Scalar::Int(t) | Scalar::Float(t) => t.into(),
            Scalar::Decimal(p, s) => format!("Decimal({p}, {s})"),
            Scalar::Bool => "UInt8".into(),
            Scalar::Date => "Date".into(),
            Scalar::Timestamp { .. } if datetime64 => "DateTime64(6, 'UTC')".into(),
            Scalar::Timestamp { .. } => "DateTime('UTC')".into(),
            Scalar::Uuid => "UUID".into(),
            Scalar::Text => "String".into(),
        }
    }

    /// `e` (a source value of this kind) printed as ClickHouse reads it; `fraction` keeps
    /// microseconds of timestamps.
    fn print(self, e: &str, fraction: bool) -> String {
        let format = if fraction {
            "YYYY-MM-DD HH24:MI:SS.US"
        } else {
            "YYYY-MM-DD HH24:MI:SS"
        };
        match self {
            Scalar::Int(_) | Scalar::Decimal(..) => format!("({e})"),
            // As text: an array's elements are quoted with `replace`, which takes text.
            Scalar::Uuid => format!("({e})::text"),
            // ClickHouse reads nan, inf and -inf.
            Scalar::Float(_) => format!("replace(lower(({e})::text), 'infinity', 'inf')"),
            Scalar::Bool => format!("({e})::int"),
            Scalar::Date => finite(e, format!("to_char({e}, 'YYYY-MM-DD')")),
            Scalar::Timestamp { zoned: true } => {
                finite(e, format!("to_char(({e}) at time zone 'UTC', '{format}')"))
            }
            Scalar::Timestamp { zoned: false } => finite(e, format!("to_char({e}, '{format}')")),
            Scalar::Text => format!("({e})::text"),
        }
    }

    /// Whether an array element of this kind is written quoted.
    fn quoted(self) -> bool {
        matches!(
            self,
            Scalar::Date | Scalar::Timestamp { .. } | Scalar::Uuid | Scalar::Text
        )
    }
}

/// `printed` (the text of date or timestamp `e`) where `e` is finite or NULL; an infinite one
/// fails the batch with a message saying so and showing it (`to_char` would print nothing, a
/// NULL or a dropped array element in ClickHouse).
fn finite(e: &str, printed: String) -> String {
    format!(
        "case when isfinite({e}) is not false then {printed} \
         else ('pgtide: ' || ({e})::text || ' has no ClickHouse value (an infinite date or timestamp)')::int::text end"
    )
}

/// The element type of a one-dimensional array type (`integer[]` -> `integer`).
fn element(pg: &str) -> Option<&str> {
    let base = pg.strip_suffix("[]")?;
    (!base.ends_with("[]")).then_some(base)
}

/// A source array printed as a ClickHouse array literal, `['a',NULL,'b''c']`.
fn print_array(e: &str, el: Scalar, fraction: bool) -> String {
    let item = el.print("x", fraction);
    // Quotes are doubled; the text COPY escapes backslashes and control characters the way
    // ClickHouse's quoted strings read them.
    let item = if el.quoted() {
        format!("'''' || replace({item}, '''', '''''') || ''''")
    } else {
        format!("({item})::text")
    };
    format!(
        "case when ({e}) is null then '[]' else '[' || array_to_string(array(select case when x is null then 'NULL' else {item} end from unnest({e}) x), ',') || ']' end"
    )
}

/// How `c` is written: its ClickHouse type (the one the job names, else the mapped one) and
/// the expression printing it. `datetime64` tells whether the server has `DateTime64`.
pub fn column(c: &ViewColumn, key: bool, datetime64: bool) -> ChColumn {
    let e = c.expr.as_str();
    let pg = c.target_type.as_str();
    let array = element(pg).map(scalar);
    let (mapped, select) = match array {
        Some(el) => (
            format!("Array(Nullable({}))", el.ch_type(datetime64)),
            print_array(e, el, datetime64),
        ),
        None => {
            let s = scalar(pg);
            let t = s.ch_type(datetime64);
            let t = if c.nullable && !key {
                format!("Nullable({t})")
            } else {
                t
            };
            (t, s.print(e, datetime64))
        }
    };
    match &c.dwh_type {
        None => ChColumn {
            name: c.name.clone(),
            ch_type: mapped,
            select,
        },
        Some(named) => {
            // The named type decides whether timestamps keep their fraction.
            let fraction = named.contains("DateTime64");
            let select = match array {
                Some(el) => print_array(e, el, fraction),
                None => scalar(pg).print(e, fraction),
            };
            ChColumn {
                name: c.name.clone(),
                ch_type: named.clone(),
                select,
            }
        }
    }
}

/// Whether the server version has `DateTime64` (ClickHouse 20.1 and later).
pub fn has_datetime64(version: (u32, u32)) -> bool {
    version >= (20, 1)
}

/// Whether a target column of type `existing` takes the values the job writes as `wanted`:
/// the same type, or the `Nullable` of it.
pub fn compatible(existing: &str, wanted: &str) -> bool {
    let norm = |t: &str| t.replace(' ', "");
    let (e, w) = (norm(existing), norm(wanted));
    e == w || e == format!("Nullable({w})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(ty: &str, nullable: bool) -> ViewColumn {
        ViewColumn {
            name: "c".into(),
            expr: "o.c".into(),
            target_type: ty.into(),
            stage_type: ty.into(),
            load: None,
            origin: String::new(),
            nullable,
            dwh_type: None,
        }
    }

    #[test]
    fn source_types_map_to_clickhouse_types() {
        let t = |ty: &str, n: bool| column(&col(ty, n), false, false).ch_type;
        assert_eq!(t("bigint", false), "Int64");
        assert_eq!(t("bigint", true), "Nullable(Int64)");
        assert_eq!(t("smallint", false), "Int16");
        assert_eq!(t("numeric(12,3)", false), "Decimal(12, 3)");
        assert_eq!(t("numeric(40,3)", false), "String");
        assert_eq!(t("numeric", false), "String");
        assert_eq!(t("boolean", true), "Nullable(UInt8)");
        assert_eq!(t("timestamp with time zone", false), "DateTime('UTC')");
        assert_eq!(
            column(&col("timestamp(3) with time zone", false), false, true).ch_type,
            "DateTime64(6, 'UTC')"
        );
        assert_eq!(t("uuid", false), "UUID");
        assert_eq!(t("jsonb", true), "Nullable(String)");
        assert_eq!(t("integer[]", true), "Array(Nullable(Int32))");
        assert_eq!(t("text[]", false), "Array(Nullable(String))");
        assert_eq!(t("integer[][]", false), "String");
        assert_eq!(t("interval", false), "String");
        // Keys are never Nullable: ClickHouse orders by them.
        assert_eq!(column(&col("bigint", true), true, false).ch_type, "Int64");
    }

    #[test]
    fn a_named_type_is_taken_as_it_is() {
        let mut c = col("timestamp with time zone", true);
        c.dwh_type = Some("DateTime64(3)".into());
        let m = column(&c, false, false);
        assert_eq!(m.ch_type, "DateTime64(3)");
        assert!(m.select.contains(".US"), "{}", m.select);
    }

    #[test]
    fn values_are_printed_for_tab_separated() {
        let s = |ty: &str| column(&col(ty, false), false, false).select;
        assert_eq!(s("boolean"), "(o.c)::int");
        let ts = s("timestamp with time zone");
        assert!(
            ts.starts_with(
                "case when isfinite(o.c) is not false then to_char((o.c) at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS') else"
            ),
            "{ts}"
        );
        assert!(ts.contains("::int::text end"), "{ts}");
        assert!(s("uuid[]").contains("replace((x)::text"), "{}", s("uuid[]"));
        assert!(s("text[]").contains("replace((x)::text"), "{}", s("text[]"));
    }

    #[test]
    fn nullable_of_the_same_type_is_compatible() {
        assert!(compatible("Nullable(Int64)", "Int64"));
        assert!(compatible("Decimal(12,3)", "Decimal(12, 3)"));
        assert!(!compatible("Int32", "Int64"));
        assert!(!compatible("Int64", "Nullable(Int64)"));
    }
}
