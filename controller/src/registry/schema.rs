//! Adopting a registry that already exists. The migrations only add (columns, indexes); before they
//! run, the columns a database already holds are compared with the ones the migrations would make,
//! and a column the operator could only use by converting its data (another type, or a NOT NULL the
//! operator never fills) refuses the start-up with the table and column named. After they run, any
//! column still missing is refused the same way.
//!
//! What the migrations make is learned from the migrations themselves: they run in a scratch schema
//! inside a transaction that is rolled back, so there is no second list of columns to keep in sync.

use std::collections::BTreeMap;

use sqlx::{AssertSqlSafe, PgPool};

use super::RegistryError;
use super::pg::MIGRATOR;

/// The schema people query.
pub const SCHEMA: &str = "exp_registry";

/// One column as `information_schema.columns` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub data_type: String,
    pub nullable: bool,
    pub has_default: bool,
}

/// Columns by (table, column).
pub type Columns = BTreeMap<(String, String), Column>;

async fn columns(c: &mut sqlx::PgConnection, schema: &str) -> Result<Columns, sqlx::Error> {
    let rows: Vec<(String, String, String, bool, bool)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text, is_nullable = 'YES', column_default IS NOT NULL \
         FROM information_schema.columns WHERE table_schema = $1",
    )
    .bind(schema)
    .fetch_all(&mut *c)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(t, c, data_type, nullable, has_default)| ((t, c), Column { data_type, nullable, has_default }))
        .collect())
}

/// The columns the migrations make, from running them in a scratch schema that is rolled back.
pub async fn expected(pool: &PgPool) -> Result<Columns, RegistryError> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let scratch = format!("ep_expected_{}_{nanos}", std::process::id());
    let mut tx = pool.begin().await?;
    for m in MIGRATOR.iter() {
        let sql = m.sql.as_str().replace(SCHEMA, &scratch);
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *tx).await?;
    }
    let out = columns(&mut tx, &scratch).await?;
    tx.rollback().await?;
    Ok(out)
}

/// The columns the database holds now.
pub async fn actual(pool: &PgPool) -> Result<Columns, RegistryError> {
    let mut c = pool.acquire().await?;
    Ok(columns(&mut c, SCHEMA).await?)
}

/// Types that take the operator's values without converting what is stored.
fn family(t: &str) -> &str {
    match t {
        "smallint" | "integer" | "bigint" => "integer",
        "real" | "double precision" | "numeric" => "float",
        "text" | "character varying" | "character" => "text",
        "timestamp with time zone" | "timestamp without time zone" => "timestamp",
        "json" | "jsonb" => "json",
        other => other,
    }
}

/// Why an existing database cannot be adopted as it is, one line per column; empty when it can.
/// `after`: the migrations ran, so a missing column is a problem too.
pub fn problems(expected: &Columns, actual: &Columns, after: bool) -> Vec<String> {
    let tables: std::collections::BTreeSet<&str> = actual.keys().map(|(t, _)| t.as_str()).collect();
    let mut out = Vec::new();
    for ((table, column), want) in expected {
        match actual.get(&(table.clone(), column.clone())) {
            Some(have) if family(&have.data_type) != family(&want.data_type) => out.push(format!(
                "{SCHEMA}.{table}.{column} is {}; the operator writes {} there. Converting it would rewrite \
                 data, so the operator does not: convert it by hand (ALTER TABLE {SCHEMA}.{table} ALTER COLUMN \
                 {column} TYPE {} USING ...) or point the operator at another database",
                have.data_type, want.data_type, want.data_type
            )),
            None if after && tables.contains(table.as_str()) => out.push(format!(
                "{SCHEMA}.{table} predates the operator and lacks column {column} ({}); no migration adds it",
                want.data_type
            )),
            _ => {}
        }
    }
    for ((table, column), have) in actual {
        let known_table = expected.keys().any(|(t, _)| t == table);
        if known_table
            && !expected.contains_key(&(table.clone(), column.clone()))
            && !have.nullable
            && !have.has_default
        {
            out.push(format!(
                "{SCHEMA}.{table}.{column} is NOT NULL without a default and the operator does not write it: \
                 give it a default or drop NOT NULL"
            ));
        }
    }
    out
}

/// Checks, migrates, checks again.
pub async fn migrate(pool: &PgPool) -> Result<(), RegistryError> {
    let expected = match expected(pool).await {
        Ok(e) => e,
        Err(RegistryError::Database(sqlx::Error::Database(d))) if d.code().as_deref() == Some("42501") => {
            // No right to create a scratch schema: migrate without the comparison.
            tracing::warn!(error = %d, "cannot compare the registry's columns (no CREATE on the database)");
            MIGRATOR.run(pool).await?;
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let before = problems(&expected, &actual(pool).await?, false);
    if !before.is_empty() {
        return Err(RegistryError::SchemaRefused(before.join("; ")));
    }
    MIGRATOR.run(pool).await?;
    let after = problems(&expected, &actual(pool).await?, true);
    if !after.is_empty() {
        return Err(RegistryError::SchemaRefused(after.join("; ")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(t: &str, nullable: bool, has_default: bool) -> Column {
        Column { data_type: t.into(), nullable, has_default }
    }

    fn cols(list: &[(&str, &str, Column)]) -> Columns {
        list.iter().map(|(t, c, col)| ((t.to_string(), c.to_string()), col.clone())).collect()
    }

    #[test]
    fn a_column_of_another_type_is_refused_by_name_and_a_wider_one_is_not() {
        let expected = cols(&[
            ("experiments", "result_f1", col("double precision", true, false)),
            ("experiments", "attempts", col("integer", false, true)),
        ]);
        let actual = cols(&[
            ("experiments", "result_f1", col("text", true, false)),
            ("experiments", "attempts", col("bigint", true, false)),
        ]);
        let p = problems(&expected, &actual, false);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("exp_registry.experiments.result_f1 is text; the operator writes double precision"));
    }

    #[test]
    fn a_required_column_the_operator_never_fills_is_refused_and_missing_ones_only_after() {
        let expected = cols(&[("experiments", "name", col("text", false, false))]);
        let actual = cols(&[
            ("experiments", "owner", col("text", false, false)),
            ("experiments", "note", col("text", false, true)),
            ("pipeline_only", "x", col("text", false, false)),
        ]);
        let p = problems(&expected, &actual, false);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("experiments.owner is NOT NULL without a default"));
        let p = problems(&expected, &actual, true);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.iter().any(|l| l.contains("lacks column name")));
    }
}
