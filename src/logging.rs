//! Logging: `tracing` events to stderr, as text or JSON, filtered by `RUST_LOG` or by
//! `[log] level`.
//!
//! # Secrets never reach a log
//! Flotilla's own code logs no secret: they are [`Secret`](crate::config::Secret)s, whose
//! `Debug` is redacted, and errors are built from cloud answers and names only. Some libraries
//! log whole request and response bodies below `info`: the Docker engine client (bollard) logs
//! every API body at debug and trace, container environments included, and with them the k3s
//! token. Such targets ([`CAPPED_TARGETS`]) are capped at `info` whatever the filter asks, so no
//! level setting, `RUST_LOG=trace` included, can put a secret in a log.

use tracing::{Level, Metadata, Subscriber};
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{FilterExt, filter_fn},
    fmt::MakeWriter,
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
};

use crate::config::LogFormat;

/// Libraries whose debug and trace output carries request or response bodies.
pub const CAPPED_TARGETS: &[&str] = &["bollard"];

fn capped(meta: &Metadata<'_>) -> bool {
    *meta.level() > Level::INFO
        && CAPPED_TARGETS
            .iter()
            .any(|t| meta.target().strip_prefix(t).is_some_and(|rest| rest.is_empty() || rest.starts_with("::")))
}

/// The filter `RUST_LOG` names, or else `level` (a `tracing` filter such as `info` or
/// `flotilla=debug,info`), or else `info`.
pub fn filter(level: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(level)).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// The formatting layer Flotilla logs through, writing to `writer`, with `filter` and the
/// secret-keeping cap applied.
pub fn layer<S, W>(format: LogFormat, filter: EnvFilter, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = filter.and(filter_fn(|meta| !capped(meta)));
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
    }
}

/// Installs the process-wide logger (and the bridge for libraries that use `log`), writing to
/// stderr.
pub fn init(format: LogFormat, level: &str) {
    tracing_subscriber::registry().with(layer(format, filter(level), std::io::stderr)).init();
}
