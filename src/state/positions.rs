//! Each job's position: read, moved forward only, or set on purpose.

use rusqlite::{params, OptionalExtension};

use crate::position::Position;

use super::{StateError, Store, NOW};

impl Store {
    /// The stored position of `job`, if any.
    pub async fn position(&self, job: &str) -> Result<Option<Position>, StateError> {
        let (err, job, path) = (self.sqlite(), job.to_string(), self.path.clone());
        self.call(move |c| {
            let text: Option<String> = c
                .query_row(
                    "select position from positions where job = ?1",
                    [&job],
                    |r| r.get(0),
                )
                .optional()
                .map_err(&err)?;
            text.map(|t| serde_json::from_str(&t))
                .transpose()
                .map_err(|source| StateError::Corrupt { path, job, source })
        })
        .await
    }

    /// Store `pos` if it is newer than what is stored (a position never moves backwards).
    /// Returns whether it was written.
    pub async fn advance(&self, job: &str, pos: &Position) -> Result<bool, StateError> {
        self.put(job, pos, false, None).await
    }

    /// `advance`, and set the row count of run `run` in the same transaction (one sync to
    /// disk per batch instead of two).
    pub async fn advance_run(
        &self,
        job: &str,
        pos: &Position,
        run: i64,
        rows: i64,
    ) -> Result<bool, StateError> {
        self.put(job, pos, false, Some((run, rows))).await
    }

    /// Store `pos` whatever is stored: for `reset`, and for recovery from the DWH's copy.
    pub async fn overwrite(&self, job: &str, pos: &Position) -> Result<(), StateError> {
        self.put(job, pos, true, None).await.map(|_| ())
    }

    async fn put(
        &self,
        job: &str,
        pos: &Position,
        force: bool,
        progress: Option<(i64, i64)>,
    ) -> Result<bool, StateError> {
        let job = job.to_string();
        let text = serde_json::to_string(pos).expect("position serializes");
        let seq = pos.seq;
        self.write_tx(move |tx| {
            let sql =
                format!(
                "insert into positions (job, position, seq, updated_at) values (?1, ?2, ?3, {NOW})
                 on conflict (job) do update set position = excluded.position, seq = excluded.seq,
                   updated_at = excluded.updated_at {}",
                if force { "" } else { "where excluded.seq > positions.seq" }
            );
            let n = tx.execute(&sql, params![job, text, seq])?;
            if let Some((run, rows)) = progress {
                super::runs::set_rows(tx, run, rows)?;
            }
            Ok(n > 0)
        })
        .await
    }

    /// Every job with a stored position.
    pub async fn jobs(&self) -> Result<Vec<String>, StateError> {
        let err = self.sqlite();
        self.call(move |c| {
            let mut st = c
                .prepare("select job from positions order by job")
                .map_err(&err)?;
            let rows = st.query_map([], |r| r.get(0)).map_err(&err)?;
            rows.collect::<Result<Vec<String>, _>>().map_err(&err)
        })
        .await
    }
}
