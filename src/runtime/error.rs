//! The runtime's one error type, [`Error`], and its [`Result`] alias.
//!
//! Each service adapter has its own error ([`AmqpError`], [`StoreError`],
//! [`CoordinationError`]) carrying the service's own detail (a PostgreSQL error's SQLSTATE
//! and message, the URL that could not be reached); the runtime wraps them unchanged and adds
//! what it refuses itself, each variant with the names it is about. The worker tells a
//! refusal ([`Error::is_refusal`]: the request cannot succeed as it is) from a failure (a
//! service may answer the next try).

use crate::services::postgres::store::StoreError;
use crate::services::rabbitmq::AmqpError;
use crate::services::redis::CoordinationError;

/// A `Result` whose error is the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in the distributed runtime: a service failed, or a request was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// RabbitMQ failed or could not be reached.
    #[error(transparent)]
    RabbitMq(#[from] AmqpError),
    /// PostgreSQL failed or could not be reached.
    #[error(transparent)]
    Postgres(#[from] StoreError),
    /// Redis failed or could not be reached.
    #[error(transparent)]
    Redis(#[from] CoordinationError),
    /// A blueprint id that no blueprint loaded here has.
    #[error("unknown blueprint '{0}'")]
    UnknownBlueprint(String),
    /// A run whose blueprint is not loaded here.
    #[error("run '{run}' uses blueprint '{blueprint}', which is not loaded here")]
    RunBlueprintNotLoaded {
        /// The run's id.
        run: String,
        /// The blueprint id stamped in the run's context.
        blueprint: String,
    },
    /// A run id without a status or context row.
    #[error("run '{0}' does not exist")]
    UnknownRun(String),
    /// A run with a status row but no context row.
    #[error("run '{0}' has a status row but no context row")]
    MissingContext(String),
    /// A resume of a run that awaits nothing.
    #[error("run '{run}' is not awaiting (status: {status})")]
    NotAwaiting {
        /// The run's id.
        run: String,
        /// The run's status, or `unknown` when it has no status row.
        status: String,
    },
    /// A resume naming a node the run does not await.
    #[error("run '{run}' is not awaiting node '{node}'")]
    NodeNotAwaited {
        /// The run's id.
        run: String,
        /// The node the resume named.
        node: String,
    },
    /// A resume that another resume beat.
    #[error("run '{0}' was resumed by someone else first")]
    AlreadyResumed(String),
    /// A run id that cannot be used (see [`limits`](crate::vocabulary::limits)).
    #[error("invalid run id: {reason}")]
    InvalidRunId {
        /// What is wrong with it.
        reason: String,
    },
    /// A start context or a resume's output that PostgreSQL cannot store (see
    /// [`limits`](crate::vocabulary::limits)); nothing was written.
    #[error("{reason}")]
    Unstorable {
        /// What cannot be stored, and why.
        reason: String,
    },
    /// A start with a run id that a run of another blueprint has.
    #[error("run '{run}' exists already, of blueprint '{blueprint}'")]
    RunExists {
        /// The run id asked for.
        run: String,
        /// The blueprint of the run that has it.
        blueprint: String,
    },
    /// A run was created but its start jobs may not be queued; the next reconciler pass
    /// starts it (its status row looks stalled), or a start with the same run id does.
    #[error("run '{run}' was created but its start jobs may not be queued ({source}); the reconciler's next pass starts it, or start it again with the same run id")]
    StartNotQueued {
        /// The run that was created.
        run: String,
        /// Why its start jobs could not be published.
        #[source]
        source: Box<Error>,
    },
    /// A cancel of a run that has ended.
    #[error("run '{run}' cannot be cancelled: it is {status}")]
    NotCancellable {
        /// The run's id.
        run: String,
        /// The status it ended with.
        status: String,
    },
    /// A worker option out of range.
    #[error("invalid worker options: {0}")]
    InvalidOption(&'static str),
    /// An address that could not be listened on.
    #[error("cannot listen for {what} on {addr}: {source}")]
    Listen {
        /// What would have been served (`webhooks`).
        what: &'static str,
        /// The address asked for.
        addr: String,
        /// Why it could not be bound.
        #[source]
        source: std::io::Error,
    },
    /// A thread the runtime needs could not be started.
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        /// The thread's role, e.g. `consumer`, `heartbeat` or `reconciler`.
        name: String,
        /// The error from spawning it.
        #[source]
        source: std::io::Error,
    },
    /// A worker thread panicked.
    #[error("a worker thread panicked")]
    Panicked,
}

impl Error {
    /// Whether the request was refused for what it asks (an unknown run or blueprint, a
    /// resume of what is not awaited, …): trying again changes nothing. Every other error is
    /// a failure of a service or of this process.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Error::UnknownBlueprint(_)
                | Error::RunBlueprintNotLoaded { .. }
                | Error::UnknownRun(_)
                | Error::MissingContext(_)
                | Error::NotAwaiting { .. }
                | Error::NodeNotAwaited { .. }
                | Error::AlreadyResumed(_)
                | Error::NotCancellable { .. }
                | Error::InvalidRunId { .. }
                | Error::Unstorable { .. }
                | Error::RunExists { .. }
        )
    }

    /// Whether PostgreSQL refused the data itself (see [`StoreError::is_permanent`]): the
    /// same write fails every time.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Error::Postgres(e) if e.is_permanent())
    }

    /// A [`Thread`](Error::Thread) error for the thread `name`.
    pub(crate) fn thread(name: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let name = name.into();
        move |source| Error::Thread { name, source }
    }
}

impl From<amiquip::Error> for Error {
    fn from(e: amiquip::Error) -> Self {
        Error::RabbitMq(AmqpError::from(e))
    }
}
