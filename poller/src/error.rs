//! The poller's error type.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Shared(#[from] shared::Error),
    #[error("cannot build the HTTP client")]
    Http(#[source] reqwest::Error),
}

/// Why one poll (a store's cycle, or a backfill) stopped.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// Ecwid refused the token or the store (401, 402, 403, 404): no retry helps until an
    /// operator acts. Shown on the instance; the store backs off.
    #[error("Ecwid answered {status}: {message}")]
    Refused { status: u16, message: String },
    /// 5xx, timeouts, repeated 429s, a bucket or JetStream that did not answer: the next cycle
    /// tries again from the same cursor.
    #[error("{0}")]
    Transient(String),
    #[error("stopped")]
    Cancelled,
}

impl PollError {
    pub fn is_transient(&self) -> bool {
        matches!(self, PollError::Transient(_))
    }
}
