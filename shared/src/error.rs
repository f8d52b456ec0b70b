//! The error type of the shared crate.

/// What can go wrong in the shared plumbing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not connect to NATS at {url}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("could not set up JetStream {what} `{name}`: {message}")]
    Topology {
        what: &'static str,
        name: String,
        message: String,
    },
    #[error("JetStream request failed: {0}")]
    JetStream(String),
    #[error(transparent)]
    Publish(#[from] crate::nats::PublishError),
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("start-up was cancelled")]
    Cancelled,
    #[error("the event log's database: {0}")]
    Database(String),
}

impl Error {
    /// Whether trying the same thing again later can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. } | Error::JetStream(_) | Error::Publish(_) | Error::Timeout(_)
        )
    }

    /// Wraps any JetStream error kind in [`Error::JetStream`], keeping its message.
    pub fn jetstream(err: impl std::fmt::Display) -> Self {
        Error::JetStream(err.to_string())
    }
}
