//! The DWH of a run, whichever kind the config names: each call goes to PostgreSQL's or
//! ClickHouse's implementation of [`Dwh`].

use bytes::Bytes;
use futures_util::Stream;
use tokio_postgres::Client;

use super::clickhouse::ClickHouse;
use super::dwh::{Batch, Dwh, WriteError, Written};
use super::{SinkError, TargetState};
use crate::position::Position;
use crate::view::View;

/// The DWH of a run: PostgreSQL or ClickHouse.
pub enum Warehouse {
    Postgres(Client),
    ClickHouse(Box<ClickHouse>),
}

impl Warehouse {
    /// The PostgreSQL session, for what only a PostgreSQL DWH does (`verify`).
    pub fn postgres(&mut self) -> Option<&mut Client> {
        match self {
            Warehouse::Postgres(c) => Some(c),
            Warehouse::ClickHouse(_) => None,
        }
    }
}

macro_rules! each {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            Warehouse::Postgres($d) => $e,
            Warehouse::ClickHouse($d) => $e,
        }
    };
}

impl Dwh for Warehouse {
    async fn lock(&mut self, job: &str) -> Result<bool, SinkError> {
        each!(self, d => d.lock(job).await)
    }

    async fn unlock(&mut self, job: &str) -> Result<(), SinkError> {
        each!(self, d => d.unlock(job).await)
    }

    async fn check_lock(&mut self) -> Result<(), SinkError> {
        each!(self, d => d.check_lock().await)
    }

    async fn prepare_target(&mut self, view: &View) -> Result<TargetState, SinkError> {
        each!(self, d => d.prepare_target(view).await)
    }

    async fn read_position(&mut self, job: &str) -> Result<Option<Position>, SinkError> {
        each!(self, d => d.read_position(job).await)
    }

    async fn store_position(&mut self, job: &str, position: &Position) -> Result<(), SinkError> {
        each!(self, d => d.store_position(job, position).await)
    }

    async fn check_target(&mut self, view: &View) -> Result<Vec<String>, SinkError> {
        each!(self, d => d.check_target(view).await)
    }

    fn copy_sql(&self, view: &View, predicate: &str) -> String {
        each!(self, d => d.copy_sql(view, predicate))
    }

    async fn write<S, E>(
        &mut self,
        view: &View,
        rows: S,
        batch: Batch<'_>,
    ) -> Result<Written, WriteError<E>>
    where
        S: Stream<Item = Result<Bytes, E>>,
    {
        each!(self, d => d.write(view, rows, batch).await)
    }

    async fn key_ceiling(&mut self, view: &View) -> Result<Option<Vec<String>>, SinkError> {
        each!(self, d => d.key_ceiling(view).await)
    }

    async fn write_split<F, S, E>(
        &mut self,
        view: &View,
        fresh: F,
        rest: S,
        batch: Batch<'_>,
    ) -> Result<Written, WriteError<E>>
    where
        F: Stream<Item = Result<Bytes, E>>,
        S: Stream<Item = Result<Bytes, E>>,
    {
        each!(self, d => d.write_split(view, fresh, rest, batch).await)
    }
}
