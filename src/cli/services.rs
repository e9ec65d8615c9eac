//! Connecting to the three services from the command line: each is checked up front, and an
//! unreachable one is one clear line naming it and the URL tried (password masked).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::runtime::worker::{RabbitMqAdapter, RabbitMqAdapterBuilder};
use crate::services::postgres::store::{self, PgPool, RunStore, Tables};
use crate::services::rabbitmq as amqp;
use crate::services::redis::{self as coordination, RedisPool};
use crate::services::url::mask_url;
use crate::{Blueprint, Client};

use super::{fail, ServiceArgs, EXIT_USAGE};

impl ServiceArgs {
    /// Validated table names.
    pub fn tables(&self) -> Result<Tables, i32> {
        Tables::new(
            &self.contexts_table,
            &self.statuses_table,
            &self.webhooks_table,
        )
        .map_err(|e| fail(EXIT_USAGE, e))
    }

    /// A PostgreSQL pool whose first connection worked.
    pub fn postgres(&self, size: u32) -> Result<PgPool, i32> {
        let unreachable = |reason: String| {
            fail(
                EXIT_USAGE,
                format!(
                    "cannot reach PostgreSQL at {}: {reason}",
                    mask_url(&self.postgres_url)
                ),
            )
        };
        // One direct attempt first: a clear reason, fast, and no pool retries logged.
        let mut config: postgres::Config =
            self.postgres_url.parse().map_err(|e: postgres::Error| {
                fail(
                    EXIT_USAGE,
                    format!(
                        "invalid PostgreSQL URL {}: {e}",
                        mask_url(&self.postgres_url)
                    ),
                )
            })?;
        config.connect_timeout(Duration::from_secs(5));
        config
            .connect(postgres::NoTls)
            .map_err(|e| unreachable(e.to_string()))?;
        let pool = store::connect_pool(&self.postgres_url, size)
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(pool)
    }

    /// A Redis pool that answered PING.
    pub fn redis(&self, size: u32) -> Result<RedisPool, i32> {
        let unreachable = |reason: String| {
            fail(
                EXIT_USAGE,
                format!(
                    "cannot reach Redis at {}: {reason}",
                    mask_url(&self.redis_url)
                ),
            )
        };
        let client =
            redis::Client::open(self.redis_url.as_str()).map_err(|e| unreachable(e.to_string()))?;
        let mut conn = client
            .get_connection_with_timeout(Duration::from_secs(5))
            .map_err(|e| unreachable(e.to_string()))?;
        redis::cmd("PING")
            .query::<String>(&mut conn)
            .map_err(|e| unreachable(e.to_string()))?;
        coordination::connect_pool(&self.redis_url, size).map_err(|e| unreachable(e.to_string()))
    }

    /// Checks that RabbitMQ accepts a connection.
    pub fn check_rabbitmq(&self) -> Result<(), i32> {
        match amqp::connect(&self.rabbitmq_url) {
            Ok(conn) => {
                let _ = conn.close();
                Ok(())
            }
            Err(e) => Err(fail(
                EXIT_USAGE,
                format!(
                    "cannot reach RabbitMQ at {}: {}",
                    mask_url(&self.rabbitmq_url),
                    root_cause(&e.to_string())
                ),
            )),
        }
    }

    /// Table names and pools of `pool_size` connections, once every service answered
    /// (stopping at the first that does not, with its one line).
    pub fn connect_all(&self, pool_size: u32) -> Result<(Tables, PgPool, RedisPool), i32> {
        let tables = self.tables()?;
        let pg = self.postgres(pool_size)?;
        let redis = self.redis(pool_size)?;
        self.check_rabbitmq()?;
        Ok((tables, pg, redis))
    }

    /// The run store over a pool of `pool_size`, once the table names are valid and
    /// PostgreSQL answers.
    pub fn run_store(&self, pool_size: u32) -> Result<RunStore, i32> {
        let tables = self.tables()?;
        let pg = self.postgres(pool_size)?;
        RunStore::new(pg, tables).map_err(|e| fail(EXIT_USAGE, e))
    }

    /// A worker builder over these services, queue, tables and Redis prefix.
    pub fn adapter(&self, tables: Tables, pg: PgPool, redis: RedisPool) -> RabbitMqAdapterBuilder {
        RabbitMqAdapter::builder(&self.rabbitmq_url, pg, redis)
            .queue(&self.queue)
            .tables(tables)
            .redis_prefix(&self.redis_prefix)
    }

    /// A client over all three services.
    pub fn client(&self, blueprints: BTreeMap<String, Blueprint>) -> Result<Client, i32> {
        let (tables, pg, redis) = self.connect_all(2)?;
        self.client_over(tables, pg, redis, &self.queue, blueprints.into_values())
    }

    /// A client over these tables and pools, sending to `queue`, knowing `blueprints`.
    pub fn client_over(
        &self,
        tables: Tables,
        pg: PgPool,
        redis: RedisPool,
        queue: &str,
        blueprints: impl IntoIterator<Item = Blueprint>,
    ) -> Result<Client, i32> {
        Client::with_options(
            &self.rabbitmq_url,
            pg,
            redis,
            tables,
            queue,
            &self.redis_prefix,
        )
        .map(|c| c.with_blueprints(blueprints))
        .map_err(|e| fail(EXIT_USAGE, e))
    }
}

/// The last part of a nested error message ("cannot connect …: <reason>").
fn root_cause(message: &str) -> &str {
    message.rsplit(": ").next().unwrap_or(message)
}
